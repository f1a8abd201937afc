"""Row formats, recognised from column names, and their conversion to the forms the readers use.

The formats are TRL's dataset conventions (huggingface.co/docs/trl/dataset_formats) plus the two
instruction layouts most Hub data sets still use:

  SFT and continued pre-training
    messages            {"messages": [{"role", "content"}, ...]}           (UltraChat-200k)
    sharegpt            {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
    alpaca              {"instruction", "input" (may be empty or absent), "output"}
    prompt-completion   {"prompt", "completion"}: strings, or lists of messages
    text                {"text"}, or the column named by --text-field       (mC4)
  preference (DPO, ORPO, SimPO)
    explicit prompt     {"prompt", "chosen", "rejected"}
    implicit prompt     {"chosen", "rejected"} holding the whole conversation (UltraFeedback-binarized,
                        orpo-dpo-mix-40k): the prompt is their common prefix, as TRL's `extract_prompt`
  unpaired (KTO)        {"prompt", "completion", "label"}

The first format whose columns a row has is its format, in the order above (UltraChat's rows hold
`prompt` and `messages`: they are "messages"). Other columns are ignored. `--columns
prompt=question,chosen=good` renames a source's columns to these names first. ShareGPT turns become
messages (human -> user, gpt -> assistant), and an Alpaca row the chat [user: instruction, then a
blank line and the input if there is one; assistant: output].

Which preference rows have an implicit prompt follows TRL's `maybe_extract_prompt`: those without a
prompt, and those whose prompt is a string while chosen and rejected are message lists that start
with the user's turn (a prompt string beside lists of assistant messages is an explicit prompt, as
anita always read it). The common prefix is taken message by message, or character by character for strings
(then a space just before the first difference is left to the answers, as TRL does). A `prompt`
string beside message lists must equal the prefix's last user message: anything else is a bad row.
"""

from __future__ import annotations

from anita.errors import AnitaError

SFT_FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
               "prompt-completion": ("prompt", "completion"), "text": ("text",)}
PREFERENCE_FORMATS = {"preference": ("chosen", "rejected")}
UNPAIRED_FORMATS = {"unpaired": ("prompt", "completion", "label"), "preference": ("chosen", "rejected")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
COLUMN_NAMES = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
                "chosen", "rejected", "label", "context", "choices", "gold")


class FormatError(ValueError):
    """A row that fits no format; the message names its columns and the formats expected."""


def parse_columns(spec) -> dict[str, str]:
    """`--columns prompt=question,chosen=good` (a string or a list of `name=column`) -> {name: column}."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec or []) if s.strip()]
    mapping = {}
    for item in items:
        name, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not name or not column:
            raise AnitaError(f"--columns: {item!r} must be NAME=COLUMN, e.g. prompt=question")
        if name not in COLUMN_NAMES:
            raise AnitaError(f"--columns: {name!r} is not a column anita reads; expected one of {', '.join(COLUMN_NAMES)}")
        mapping[name] = column
    return mapping


def rename(row: dict, columns: dict[str, str]) -> dict:
    """The row with its columns renamed as `columns` ({name: source column}) says."""
    if not columns:
        return row
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources and k not in columns}
    out.update((name, row[column]) for name, column in columns.items() if column in row)
    return out


def recognise(row: dict, formats: dict[str, tuple[str, ...]], hint: str = "") -> str:
    """The first format whose columns the row holds; FormatError naming the columns found otherwise."""
    for name, needed in formats.items():
        if all(c in row for c in needed):
            return name
    for name, needed in formats.items():
        if any(c in row for c in needed) or len(formats) == 1:  # a near miss: name what it lacks
            missing = next(c for c in needed if c not in row)
            raise FormatError(f"missing field {missing!r} (a {name} row needs {', '.join(needed)}; columns found: "
                              f"{', '.join(map(str, row))})")
    expected = "; ".join(f"{name} ({', '.join(needed)})" for name, needed in formats.items())
    raise FormatError(f"columns {', '.join(map(str, row)) or '(none)'} fit no format; expected {expected}{hint} "
                      "(rename columns with --columns NAME=COLUMN)")


# ------------------------------------------------------------------------------ SFT rows
def sft_row(row: dict, text_field: str | None = None) -> tuple[str, dict]:
    """(format, row in the reader's own form): sharegpt and alpaca become messages; --text-field text."""
    if text_field is not None:
        if text_field not in row:
            raise FormatError(f"no column {text_field!r} (--text-field); columns found: {', '.join(map(str, row))}")
        return "text", {"text": row[text_field]}
    fmt = recognise(row, SFT_FORMATS, hint=", or any column with --text-field")
    if fmt == "sharegpt":
        return fmt, {"messages": sharegpt_messages(row["conversations"])}
    if fmt == "alpaca":
        return fmt, {"messages": alpaca_messages(row)}
    return fmt, row


def sharegpt_messages(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise ValueError(f"conversations[{i}] must be {{'from': human|gpt|system, 'value': str}}, got {t!r:.80}")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return messages


def alpaca_messages(row: dict) -> list[dict]:
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ----------------------------------------------------------------------- preference rows
def is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def preference_parts(row: dict) -> tuple[object, object, object, bool]:
    """(prompt, chosen, rejected, implicit) of a preference row, the prompt extracted when implicit."""
    recognise(row, PREFERENCE_FORMATS)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    whole = is_chat(chosen) and is_chat(rejected) and chosen[0].get("role") != "assistant"
    if "prompt" in row and not (isinstance(prompt, str) and whole):
        return prompt, chosen, rejected, False
    common, chosen, rejected = extract_prompt(chosen, rejected)
    if isinstance(prompt, str) and is_chat(common):
        users = [m.get("content") for m in common if m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or users[-1].strip() != prompt.strip():
            raise ValueError(f"field 'prompt' ({prompt!r:.40}) is not the last user message of the prefix that "
                             "'chosen' and 'rejected' share")
    return common, chosen, rejected, True


def extract_prompt(chosen, rejected):
    """(common prefix, chosen rest, rejected rest): by message for message lists, by character for strings."""
    if not (isinstance(chosen, (str, list)) and type(chosen) is type(rejected)):
        raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists, with the prompt "
                         "in a 'prompt' field or as their common beginning")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1  # the space before the answers belongs to them (TRL's rule)
    if n == 0:
        raise ValueError("'chosen' and 'rejected' share no beginning, so there is no implicit prompt; "
                         "give the prompt in a 'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]
