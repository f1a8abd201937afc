"""The tokenizer as GGUF stores it (`tokenizer.ggml.*`), read off a `tokenizer.json`, and the chat
template (Jinja) that goes with it.

Token types follow llama.cpp's converter for byte-level BPE: special added tokens are CONTROL,
other added tokens USER_DEFINED, vocabulary entries NORMAL, and ids beyond the tokenizer up to the
model's vocab_size are `[PAD{id}]` UNUSED. The pre-tokenizer is named the way llama.cpp (and
`anita.model.gguf`) names the split rules: `llama-bpe` (Llama 3), `smollm` (digits one by one,
then GPT-2's regex), `gpt-2`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from anita.errors import AnitaError
from anita.model import Tokenizer
from anita.model.gguf import CONTROL, LLAMA3_SPLIT, USER_DEFINED

NORMAL, UNUSED = 1, 5
END_OF_TURN = ("<|eot_id|>", "<|im_end|>")  # the EOT of the two chat formats anita exports
# Meta's Llama 3 chat format (anita.model.tokenizer.render_llama3) as a Jinja chat template, for
# checkpoints that ship none: the BOS, then each message's header, stripped content and <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@dataclass
class TokenizerMetadata:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    add_bos: bool


def pre_tokenizer_name(pre: dict | None, source: str) -> str:
    """llama.cpp's name for the split rules of a `tokenizer.json` pre_tokenizer."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and not parts[1].get("use_regex", True)):
        return "llama-bpe"
    raise AnitaError(f"{source}: pre_tokenizer {kinds} is not one llama.cpp knows by name "
                     "(expected Llama 3's, SmolLM2's or GPT-2's byte-level rules)")


def tokenizer_metadata(tok: Tokenizer, vocab_size: int, source: str) -> TokenizerMetadata:
    """Tokens (padded to `vocab_size`), types, merges and special ids of a byte-level BPE tokenizer."""
    raw = json.loads(tok.backend.to_str())
    model = raw["model"]
    if model.get("type") != "BPE" or (raw.get("decoder") or {}).get("type") != "ByteLevel":
        raise AnitaError(f"{source}: only byte-level BPE tokenizers can be exported (model {model.get('type')!r})")
    pre = pre_tokenizer_name(raw.get("pre_tokenizer"), source)
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    n = tok.vocab_size
    if n > vocab_size:
        raise AnitaError(f"{source}: the tokenizer has {n} tokens but config.json vocab_size is {vocab_size}")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL if i in by_id else UNUSED
             for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eot = next((tok.token_to_id(t) for t in END_OF_TURN if tok.token_to_id(t) is not None), None)
    bos = tok.bos_id
    add_bos = bos is not None and tok.encode("a")[:1] == [bos]  # what the post-processor does
    pad = tok.token_to_id(tok.pad_token)
    return TokenizerMetadata(pre, tokens, types, merges, bos, tok.eos_id, eot, pad, add_bos)


def chat_template(tok: Tokenizer) -> str | None:
    """The Jinja template to ship: the checkpoint's own, else Llama 3's when it chats in that format."""
    if tok.chat_template:
        return tok.chat_template
    return LLAMA3_TEMPLATE if tok.chat_format == "llama3" else None
