"""Tests for anita/train/metrics.py's MetricsLog: a last line cut short by a kill or a full disk
during an append (what `--resume` then found, and failed on with a JSONDecodeError) is dropped
with a notice; any other unreadable line is one error naming file:line."""

import pytest

from anita.errors import AnitaError
from anita.train.metrics import MetricsLog

GOOD = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'


@pytest.mark.parametrize("tail", [
    b'{"step": 3, "loss": 2.1, "l',  # cut inside a record
    b'{"step": 3, "loss": 2.1, "lr": 0.001\n',  # cut before its closing brace
    b"\x00\x00\x00",  # a file system's zero fill after a crash
    b'{"step": 3, "loss": 2.1}\n\n\n{"st',  # blank lines before the torn record
    b'{"step": 3, "loss": 2.\xe2\x82',  # cut inside a UTF-8 character
])
def test_a_torn_last_line_is_dropped_and_said(tmp_path, capsys, tail):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_bytes(GOOD.encode() + tail)
    log.truncate_after(2)  # what --resume from step 2 does
    assert "dropped its last line, cut short by an interrupted append" in capsys.readouterr().out
    assert log.path.read_text() == GOOD
    log.append({"step": 3, "loss": 2.0})
    assert [r["step"] for r in log.read()] == [1, 2, 3]


@pytest.mark.parametrize("text, line", [
    ('{"step": 1}\n{"step": 2\n{"step": 3}\n', 2),  # a torn record that is not the last line
    ('[1, 2]\n{"step": 2}\n', 1),  # not an object
    ('{"loss": 1.0}\n{"step": 2}\n', 1),  # no step
    ('{"step": "1"}\n{"step": 2}\n', 1),  # a step that is not an integer
])
def test_an_unreadable_line_before_the_last_is_one_error_naming_file_and_line(tmp_path, text, line):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text(text)
    with pytest.raises(AnitaError, match=rf"metrics.jsonl:{line}: not a metrics record"):
        log.read()
