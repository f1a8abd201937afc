"""One line of a JSONL data file -> a dict, or a `ValueError` saying what is wrong.

Every reader of JSONL (training rows, preference pairs, shipped data, multiple-choice tasks,
perplexity texts) starts here and adds its own file:line and field checks.
"""

from __future__ import annotations

import json


def parse_object(line: str, expected: str = "a JSON object") -> dict:
    """Decode `line`; it must hold a JSON object (`expected` names it in the error)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # e.g. 100,000 "[": the parser's depth is bounded by Python's recursion limit
        raise ValueError("not usable JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected {expected}, got {type(row).__name__}")
    return row
