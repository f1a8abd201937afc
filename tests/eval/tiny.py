"""A tiny model with a tiny byte-level BPE tokenizer, built in code, for hand-checkable MC tests;
and chat checkpoints for the harness's --apply_chat_template.

The tokenizer has the 256 byte symbols plus a few merges chosen so that the harness's
whitespace rule shows: " casa" is two tokens [Ġca, sa], but "casa" on its own is [c, a, sa] and
"Q: " ends in a lone [Ġ]. `<s>` is the BOS the post-processor adds with special tokens on.

- `save_tiny(path, chat_template=TINY_CHAT_TEMPLATE)`: the same with a ChatML-like template that
  writes no BOS (the tokenizer adds it) and keeps the content's whitespace.
- `save_tiny_llama3(path, template)`: a tiny random model over the real Llama 3 vocabulary and
  tokenizer, with Meta's Llama 3 chat template in tokenizer_config.json (`template=True`) or none
  (anita then writes the Llama 3 format out itself; transformers has no template to render).
"""

import json
import shutil

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


def save_tiny(path, chat_template: str | None = None):
    """Write the tiny model and tokenizer as an HF-layout directory (loadable by anita and transformers)."""
    save_pretrained(tiny_mc_model(), path)
    tiny_backend().save(str(path / "tokenizer.json"))
    config = CONFIG if chat_template is None else {**CONFIG, "chat_template": chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's chat template (as tests/model/test_tokenizer.py checks anita's format against).
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def save_tiny_llama3(path, template: bool = True):
    """A tiny random Llama (untied head: a tied one repeats the header's "\\n\\n") over the real Llama 3 tokenizer, ending generations at
    <|end_of_text|> and <|eot_id|> as Llama 3 Instruct does."""
    from anita.assets import llama3_tokenizer_dir

    model = tiny_model("llama3.1", seed=0, vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128009])
    save_pretrained(model, path)
    source = llama3_tokenizer_dir()
    shutil.copy2(source / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    if template:
        config["chat_template"] = LLAMA3_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
