"""The one exception type anita raises for bad user input.

Every message names the thing that is wrong (file, line, tensor, field) and what was expected.
The CLI turns an `AnitaError` into a one-line message and exit code 2, never a traceback.
"""


class AnitaError(Exception):
    """A problem with the user's input (a file, a tensor, a config field, a flag)."""


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after saving what it had (see `anita.train.signals`).

    The CLI prints the message and exits with 128 + the signal's number (143 for SIGTERM, 130 for
    SIGINT), the code a shell reports for a process ended by that signal, so a scheduler or a
    script sees that the run did not finish."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
