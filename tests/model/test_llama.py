"""The hand-written Llama against transformers' LlamaForCausalLM (the independent reference).

Live comparisons need transformers and skip cleanly without it; the saved fixtures
(tests/model/make_fixtures.py) keep the same check running everywhere.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anita.model import KVCache, Llama, LlamaConfig, from_pretrained
from anita.model.llama import attention_mask_4d, rope_inv_freq
from tests.conftest import TINY_VARIANTS, tiny_config, tiny_model
from tests.model.make_fixtures import INPUT, PAD_MASK

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_saved_transformers_logits(variant):
    expected = load_file(FIXTURES / "hf_tiny_logits.safetensors")
    model = tiny_model(variant)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT), expected[f"{variant}.logits"], atol=1e-4, rtol=0)
        pos = (PAD_MASK.cumsum(-1) - 1).clamp(min=0)
        got = model(INPUT, attention_mask=PAD_MASK, position_ids=pos)
    keep = PAD_MASK.bool()  # logits at padded positions are never used and may differ
    torch.testing.assert_close(got[keep], expected[f"{variant}.padded"][keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_live_transformers(variant, padding, tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoint(variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = from_pretrained(path)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :5], mask[2, :2] = 0, 0
    elif padding == "right":
        mask[0, -5:], mask[2, -1:] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)


def test_rope_scaling_bands():
    """Llama 3.1 scaling by hand: with original length L=64, low=1, high=4, factor=8, wavelengths
    above 64 are slowed 8x, below 16 kept, and in between interpolated; the highest frequency
    (θ_0 = 1, wavelength 2π < 16) is untouched."""
    config = tiny_config("llama3.1")
    plain, scaled = rope_inv_freq(tiny_config("llama3")), rope_inv_freq(config)
    wavelen = 2 * math.pi / plain
    assert scaled[0] == plain[0] == 1.0
    torch.testing.assert_close(scaled[wavelen > 64], plain[wavelen > 64] / 8)
    torch.testing.assert_close(scaled[wavelen < 16], plain[wavelen < 16])
    band = (wavelen >= 16) & (wavelen <= 64)
    assert band.any()
    assert ((scaled[band] <= plain[band]) & (scaled[band] >= plain[band] / 8)).all()


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_model("llama3.2")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=9)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 9


def test_block_diagonal_mask_isolates_packed_sequences():
    """Two sequences packed into one row with restarting positions give the same logits as
    each sequence on its own (the mask form the SFT packer uses)."""
    model = tiny_model()
    a, b = torch.tensor([[3, 9, 27, 81]]), torch.tensor([[5, 25, 125]])
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    mask = seg[:, :, None] == seg[:, None, :]  # (1, T, T)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        got = model(packed, attention_mask=mask, position_ids=pos)
        torch.testing.assert_close(got[:, :4], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 4:], model(b), atol=1e-5, rtol=0)


def test_attention_mask_never_leaves_a_row_empty():
    mask = attention_mask_4d(torch.tensor([[0, 0, 1]]), T=3, S=3, device="cpu")[0, 0]
    assert mask.any(-1).all()
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_activation_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    grads = []
    for mode in ("off", "full"):
        model = tiny_model().train()
        model.checkpointing = mode
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_tied_embeddings_share_one_parameter():
    model = tiny_model("llama3.2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_presets_have_the_published_shapes():
    c = LlamaConfig.preset("llama-3.1-8b")
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.rope_scaling["factor"]) == (32, 4096, 14336, 32, 8, 128, 8.0)
    assert LlamaConfig.preset("llama-3.2-1b").tie_word_embeddings
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(LlamaConfig.preset("llama-3-8b")).parameters())
    assert 8.0e9 < n < 8.1e9  # "8B": 8,030,261,248 parameters


def test_real_smollm2_matches_saved_transformers_generation(smollm2):
    """anita's converted SmolLM2 against transformers' GGUF-loaded one (hf_smollm2.json, same
    GGUF file): top-20 last-position logits (within 1e-4) and 24 greedy tokens of a chat prompt."""
    import json

    from anita.model import generate

    ref = json.loads((FIXTURES / "hf_smollm2.json").read_text())
    with torch.no_grad():
        logits = smollm2(torch.tensor([ref["prompt_ids"]]))[0, -1]
    assert logits.topk(20).indices.tolist() == ref["last_logits_top"]
    torch.testing.assert_close(logits.topk(20).values, torch.tensor(ref["last_logits_top_values"]), atol=1e-4, rtol=0)
    out = generate(smollm2, ref["prompt_ids"], max_new_tokens=len(ref["greedy_ids"]), stop_ids=[2])
    assert out == ref["greedy_ids"]


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """A bf16 copy of θ_i is off by ~0.4%: several radians of phase by position 8k."""
    model = tiny_model().to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.rope_inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rope_inv_freq, rope_inv_freq(model.config), rtol=0, atol=0)


def test_generation_runs_no_forward_after_the_last_token():
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    from anita.model import generate

    out = generate(model, [1, 2, 3], max_new_tokens=4)
    assert len(out) == 4 and len(calls) == 3  # 4 tokens: 3 forwards of (one) new token; prefill uses hidden_states
