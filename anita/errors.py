"""The one exception type anita raises for bad user input.

Every message names the thing that is wrong (file, line, tensor, field) and what was expected.
The CLI turns an `AnitaError` into a one-line message and exit code 2, never a traceback.
"""


class AnitaError(Exception):
    """A problem with the user's input (a file, a tensor, a config field, a flag)."""
