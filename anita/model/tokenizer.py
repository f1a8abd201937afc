"""The tokenizer (Hugging Face `tokenizers`, reading `tokenizer.json`) and chat formats.

Two chat formats:
- "llama3", written out here (Meta's Llama 3 model card; docs/recipe.md):
  `<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
  the content stripped of surrounding whitespace as Meta's template does; a generation prompt
  ends with `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
- "template": the Jinja chat template the checkpoint ships (tokenizer_config.json `chat_template`
  or `chat_template.jinja`), rendered the way transformers renders it (e.g. SmolLM2's ChatML).
"auto" picks the shipped template when there is one, else "llama3" when the vocabulary has
Llama 3's header tokens.

A chat is rendered to a string and then tokenized as a whole (as transformers does), and the
assistant-token mask for SFT is read off the tokens' character offsets.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from anita.errors import AnitaError
from anita.hub import resolve_model_dir

LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# End-of-turn markers of the common chat formats; generation stops on any that the vocab has.
END_OF_TURN = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where a continued message ends


def render_llama3(messages: list[dict], add_generation_prompt: bool, bos_token: str = "<|begin_of_text|>") -> str:
    """The Llama 3 chat format as one string."""
    text = bos_token
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
    if add_generation_prompt:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text


def _jinja_renderer(template: str, source: str):
    """Compile a chat template in a sandbox, with the helpers transformers provides to templates."""
    def raise_exception(message):
        raise AnitaError(f"chat template ({source}): {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise AnitaError(f"chat template ({source}) does not compile: {e}") from None


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise AnitaError("chat: expected a non-empty list of {'role': ..., 'content': ...} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise AnitaError(f"chat: message {i} must be a dict with string 'role' and 'content', got {m!r}")


class Tokenizer:
    """Text <-> ids, special tokens and the chat format of one checkpoint."""

    def __init__(self, backend, config: dict | None = None, chat_template: str | None = None,
                 chat_format: str = "auto", source: str = "tokenizer"):
        self.backend, self.source = backend, source
        config = config or {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.chat_template = chat_template
        if chat_format == "auto":
            chat_format = "template" if chat_template else "llama3" if self._has_llama3_tokens() else None
        if chat_format == "llama3" and not self._has_llama3_tokens():
            raise AnitaError(f"{source}: chat_format='llama3' but the vocabulary lacks Llama 3's header tokens")
        if chat_format == "template" and not chat_template:
            raise AnitaError(f"{source}: chat_format='template' but the checkpoint ships no chat template")
        if chat_format not in ("llama3", "template", None):
            raise AnitaError(f"unknown chat_format {chat_format!r}; expected auto, llama3 or template")
        self.chat_format = chat_format
        self._template = _jinja_renderer(chat_template, source) if chat_format == "template" else None

    @classmethod
    def from_pretrained(cls, path, chat_format: str = "auto") -> "Tokenizer":
        """Read `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) from a model dir or Hub id."""
        model_dir = resolve_model_dir(path)
        file = model_dir / "tokenizer.json"
        if not file.is_file():
            raise AnitaError(f"{model_dir}: no tokenizer.json")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception type
            raise AnitaError(f"{file}: cannot read tokenizer ({e})") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates; the default one is used
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        return cls(backend, config, template, chat_format, source=str(model_dir))

    # --------------------------------------------------------------------------- basics
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. With
        `add_special_tokens` the tokenizer's post-processor adds what the checkpoint asks for
        (Llama 3: `<|begin_of_text|>` in front), exactly as transformers' `encode` does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The padding id (never trained on or attended to): pad token, else eos, else 0."""
        for token in (self.pad_token, self.eos_token):
            if self.token_to_id(token) is not None:
                return self.token_to_id(token)
        return 0

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer: eos plus the chat format's end-of-turn markers."""
        ids = [self.eos_id] + [self.token_to_id(t) for t in END_OF_TURN]
        return sorted({i for i in ids if i is not None})

    def _has_llama3_tokens(self) -> bool:
        return all(self.backend.token_to_id(t) is not None for t in LLAMA3_SPECIAL)

    # ------------------------------------------------------------------------------ chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    continue_final_message: bool = False) -> str:
        """The chat as one string. `continue_final_message`: cut right after the last message's
        content (no end-of-turn marker), so the model continues it — transformers' rule: the content
        is tagged, rendered, and the text cut where the tag starts (and stripped of trailing
        whitespace when the template trims the content)."""
        check_messages(messages)
        if self.chat_format is None:
            raise AnitaError(f"{self.source}: no chat template shipped and not a Llama 3 vocabulary")
        if continue_final_message:
            if add_generation_prompt:
                raise AnitaError("chat: continue_final_message and add_generation_prompt exclude each other")
            tagged = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + CONTINUE_TAG}]
            text = self.render_chat(tagged)
            at = text.rfind(CONTINUE_TAG.strip())
            if at < 0 or messages[-1]["content"].strip() not in text:
                raise AnitaError(f"chat template ({self.source}) drops the final message, which cannot be continued")
            return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()
        if self.chat_format == "llama3":
            return render_llama3(messages, add_generation_prompt, self.bos_token or "<|begin_of_text|>")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise AnitaError(f"chat template ({self.source}) fails on these messages: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            return_assistant_mask: bool = False):
        """Token ids of the rendered chat; with `return_assistant_mask` also a 0/1 list marking the
        tokens of assistant turns (their content and end-of-turn marker), for SFT loss masks."""
        text = self.render_chat(messages, add_generation_prompt)
        enc = self.backend.encode(text, add_special_tokens=False)
        if not return_assistant_mask:
            return enc.ids
        spans = self._assistant_spans(messages, text)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
        return enc.ids, mask

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of assistant turns: what rendering message i adds after the
        generation prompt of messages[:i]."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render_chat(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise AnitaError(f"{self.source}: chat template is not prefix-stable; cannot locate assistant turn {i}")
            spans.append((len(before), len(upto)))
        return spans


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share: where a completion starts in the ids of prompt +
    completion, read against the ids of the prompt alone (TRL's rule for SFT and DPO rows)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _token_text(token) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnitaError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
