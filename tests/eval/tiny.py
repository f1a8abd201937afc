"""A tiny model with a tiny byte-level BPE tokenizer, built in code, for hand-checkable MC tests.

The tokenizer has the 256 byte symbols plus a few merges chosen so that the harness's
whitespace rule shows: " casa" is two tokens [Ġca, sa], but "casa" on its own is [c, a, sa] and
"Q: " ends in a lone [Ġ]. `<s>` is the BOS the post-processor adds with special tokens on.
"""

import json

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors

from anita.model import Tokenizer, save_pretrained
from tests.conftest import tiny_model

MERGES = [("Ġ", "c"), ("Ġc", "a"), ("s", "a"), ("Ġ", "R"), ("o", "m"), ("Ġ", "s")]
SPECIALS = ["<s>", "</s>"]


def tiny_backend() -> Backend:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    for s in SPECIALS:
        vocab[s] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return backend


VOCAB_SIZE = tiny_backend().get_vocab_size(with_added_tokens=True)  # 256 bytes + 6 merges + 2 specials
CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(tiny_backend(), CONFIG)


def tiny_mc_model(**overrides):
    """A random tiny Llama (untied head) whose vocabulary matches the tiny tokenizer."""
    return tiny_model("llama3.1", seed=0, vocab_size=VOCAB_SIZE, **overrides)


def save_tiny(path):
    """Write the tiny model and tokenizer as an HF-layout directory (loadable by anita and transformers)."""
    save_pretrained(tiny_mc_model(), path)
    tiny_backend().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return path
