"""quantize_model, loading a checkpoint straight into NF4 (`from_pretrained(quantize="nf4")`,
tensor by tensor through `Linear4bit.load_checkpoint_tensor`), and memory_report.

Oracles: the same model quantized after a full-precision load (must be bit-identical),
transformers + bitsandbytes quantizing the same checkpoint to NF4 (identical packed weights, the
same logits, and so the same error against the full-precision model: the error bounds below are
bitsandbytes' measured error, not anita's), and the storages the process really holds
(memory_report's byte counts). Tiny Llama: D=64, F=128.

The transformers + bitsandbytes side (tests/quant/make_fixtures.py) runs live where both import;
elsewhere its measurements come from tests/quant/fixtures/bnb_oracle.json, written by
`python tests/quant/make_fixtures.py`.
"""

import json

import pytest
import torch
from torch import nn

from anita.errors import AnitaError
from anita.model import Llama, from_pretrained
from anita.quant import Linear4bit, format_memory_report, memory_report, quantize_model
from tests.conftest import tiny_config, tiny_model
from tests.quant import make_fixtures as oracle_lib
from tests.quant.make_fixtures import FIXTURE, SMOLLM2_TEXT, error_stats
from tests.quant.make_fixtures import TINY_IDS as IDS

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# How far anita's NF4 error may be from bitsandbytes' (relative). Live, on one machine, the two
# are equal (the logits are identical); the margin only covers a saved oracle measured on a
# machine whose matmuls round differently: 0.1% for the fp32 tiny models (still fine enough to
# notice double quantization switched off: max |Δ| moves 0.5%), 2% for SmolLM2 in bf16.
RTOL_FP32, RTOL_BF16 = 1e-3, 0.02


def _logits(model):
    with torch.no_grad():
        return model(IDS)  # (2, 12, 256)


@pytest.fixture(scope="module")
def oracle():
    """Factory: oracle(case, checkpoint_dir, ids) -> dict with bitsandbytes' error_stats for the
    case of make_fixtures.CASES, its "source" (live or the fixture file), and, live, its quantized
    "model" and "logits". Live results are cached for the module."""
    cache = {}

    def get(case, checkpoint_dir, ids):
        if case not in cache:
            if oracle_lib.available():
                quantized = oracle_lib.bnb_nf4_model(checkpoint_dir, **oracle_lib.CASES[case])
                stats, logits = oracle_lib.measure(oracle_lib.hf_model(checkpoint_dir), quantized, ids)
                cache[case] = dict(stats, source="live", model=quantized, logits=logits, ids=ids.tolist())
            else:
                cache[case] = dict(json.loads(FIXTURE.read_text())[case], source=FIXTURE.name)
        assert cache[case]["ids"] == ids.tolist(), f"{case}: the oracle was measured on other inputs"
        return cache[case]

    return get


def _assert_error_equals_oracle(ours, theirs, rtol, positions):
    """anita's error_stats equal bitsandbytes' to `rtol` (top-1 agreement to one position)."""
    for key in ("rel_error", "max_abs_error", "kl"):
        assert ours[key] == pytest.approx(theirs[key], rel=rtol), (key, ours[key], theirs[key], theirs["source"])
    assert ours["top1"] >= theirs["top1"] - 1 / positions - 1e-6, (ours["top1"], theirs["top1"], theirs["source"])


# ------------------------------------------------------------------------ quantize_model
def test_replaces_the_seven_projections_and_nothing_else(oracle, tiny_checkpoint):
    """2 layers x 7 projections = 14 Linear4bit (the linears transformers' BitsAndBytesConfig
    quantizes); embeddings, norms and lm_head stay full precision. NF4's error in the logits of
    the random-init tiny model (weights N(0, 0.02)), fp32 compute, blocksize 64, double
    quantization, equals transformers + bitsandbytes' on the same checkpoint and inputs: both
    measure ||Δ||/||logits|| = 0.1142, max |Δ| = 0.0671 (logit std 0.16), mean KL 1.67e-4 nats,
    top-1 kept at 21 of 24 positions; live, the two models' logits are identical."""
    full = tiny_model("llama3.1")
    q = quantize_model(tiny_model("llama3.1"), compute_dtype=torch.float32)
    quantized = {n for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == {f"model.layers.{i}.{p}.{t}" for i in range(2) for p, ts in PROJECTIONS.items() for t in ts}
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens) is nn.Embedding
    theirs = oracle("tiny", tiny_checkpoint("llama3.1"), IDS)
    a, b = _logits(full), _logits(q)
    _assert_error_equals_oracle(error_stats(a, b), theirs, RTOL_FP32, positions=24)
    if theirs["source"] == "live":
        import bitsandbytes as bnb

        assert quantized == {n for n, m in theirs["model"].named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        torch.testing.assert_close(b, theirs["logits"], atol=1e-5, rtol=0)  # measured: equal


def test_custom_targets_and_untied_lm_head():
    q = quantize_model(tiny_model("llama3"), targets=("q_proj", "lm_head"), backend="torch")
    assert isinstance(q.lm_head, Linear4bit) and isinstance(q.model.layers[1].self_attn.q_proj, Linear4bit)
    assert type(q.model.layers[1].self_attn.k_proj) is nn.Linear
    q = quantize_model(tiny_model("llama3"), targets="down_proj", backend="torch")
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 2


@pytest.mark.parametrize("variant, targets, message", [
    ("llama3", ("q_prj",), "target 'q_prj' matches no nn.Linear in the model; linear names end with: "
                           "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("llama3", ("embed_tokens",), "names model.embed_tokens (Embedding), not an nn.Linear"),
    ("llama3.2", ("lm_head",), "lm_head.weight is shared with another module (tied embeddings)"),
    ("llama3", (), "targets is empty"),
])
def test_bad_targets_raise(variant, targets, message):
    with pytest.raises(AnitaError) as e:
        quantize_model(tiny_model(variant), targets=targets)
    assert message in str(e.value)


def test_meta_model_gets_empty_layers_with_the_checkpoint_shapes():
    """On meta, the quantized model's state_dict has the same keys and shapes as the plain one:
    what the loader checks the checkpoint against."""
    with torch.device("meta"):
        plain, model = Llama(tiny_config()), Llama(tiny_config())
    quantize_model(model, backend="torch")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear4bit) and not layer.is_loaded
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


# ----------------------------------------------------------------------- loading into 4 bits
@pytest.mark.parametrize("variant", ["llama3.1", "llama3.2"])
def test_from_pretrained_nf4_equals_quantizing_after_a_full_load(tiny_checkpoint, variant):
    """Streaming the checkpoint into empty 4-bit layers gives the very same model, bit for bit,
    as loading it in fp32 and calling quantize_model; the tied llama3.2 head stays tied."""
    path = tiny_checkpoint(variant)
    q = from_pretrained(path, quantize="nf4")
    ref = quantize_model(from_pretrained(path))
    for (name, a), (_, b) in zip(q.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(m.is_loaded and m.weight.device.type == "cpu" for m in q.modules() if isinstance(m, Linear4bit))
    assert (q.lm_head.weight is q.model.embed_tokens.weight) == (variant == "llama3.2")
    assert torch.equal(_logits(q), _logits(ref))


def test_from_pretrained_passes_quantize_kwargs(oracle, tiny_checkpoint):
    """blocksize 32 without double quantization, fp32 compute, the torch backend reach every
    layer, and quantize as bitsandbytes does with those settings (its nn.Linear4bit in the same
    linears of transformers' model): the same dequantized weights, the same logits, the same
    error against the fp32 model, measured ||Δ||/||logits|| = 0.1013, max |Δ| = 0.0712, KL
    1.32e-4, top-1 kept everywhere. (Blocksize 32, not 128: the projections have 64 inputs, and
    bitsandbytes' CPU dequantization is wrong for blocks that span two rows.)"""
    path = tiny_checkpoint("llama3.1")
    kwargs = dict(blocksize=32, double_quant=False, compute_dtype=torch.float32, backend="torch")
    q = from_pretrained(path, quantize="nf4", quantize_kwargs=kwargs)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    assert {(m.blocksize, m.double_quant, m.compute_dtype, m.backend) for m in layers.values()} == {
        (32, False, torch.float32, "torch")}
    theirs = oracle("tiny_blocksize32", path, IDS)
    b = _logits(q)
    _assert_error_equals_oracle(error_stats(_logits(from_pretrained(path)), b), theirs, RTOL_FP32, positions=24)
    if theirs["source"] == "live":
        import bitsandbytes as bnb

        hf_modules = dict(theirs["model"].named_modules())
        for name, layer in layers.items():
            w = hf_modules[name].weight
            theirs_w = bnb.functional.dequantize_4bit(w.data, w.quant_state)  # exact here: 32 divides I
            assert torch.equal(layer.dequantize(torch.float32), theirs_w), name
        torch.testing.assert_close(b, theirs["logits"], atol=1e-5, rtol=0)  # measured: equal


def test_weights_equal_transformers_bitsandbytes_4bit_load(oracle, tiny_checkpoint):
    """transformers + bitsandbytes loading the same checkpoint with NF4 + double quantization
    store the same packed bytes, absmax codes, absmax scales and offset in every quantized
    linear (anita's side read from its state_dict), and dequantize to the same weights."""
    if not oracle_lib.available():
        pytest.skip("needs transformers and bitsandbytes")
    import bitsandbytes as bnb

    path = tiny_checkpoint("llama3.1")
    hf_modules = dict(oracle("tiny", path, IDS)["model"].named_modules())
    ours = from_pretrained(path, quantize="nf4")
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    for name, layer in layers:
        sd, theirs = layer.state_dict(), hf_modules[name].weight
        qs = theirs.quant_state
        assert torch.equal(sd["weight"].view(-1), theirs.data.view(-1)), name
        assert torch.equal(sd["weight_absmax"], qs.absmax), name
        assert torch.equal(sd["weight_absmax_scale"], qs.state2.absmax), name
        assert torch.equal(sd["weight_absmax_offset"].view(-1), qs.offset.view(-1)), name
        assert torch.equal(layer.dequantize(torch.float32), bnb.functional.dequantize_4bit(theirs.data, qs)), name


def test_saved_oracle_is_what_transformers_bitsandbytes_measure(oracle, tiny_checkpoint):
    """fixtures/bnb_oracle.json (the numbers used where transformers or bitsandbytes is missing)
    holds what the live oracle measures here, on the same inputs: regenerate it with
    `python tests/quant/make_fixtures.py` when this fails after an upgrade."""
    if not oracle_lib.available():
        pytest.skip("needs transformers and bitsandbytes")
    saved = json.loads(FIXTURE.read_text())
    for case in ("tiny", "tiny_blocksize32"):
        live = oracle(case, tiny_checkpoint("llama3.1"), IDS)
        assert saved[case]["ids"] == live["ids"]
        for key in ("rel_error", "max_abs_error", "kl", "top1"):
            assert saved[case][key] == pytest.approx(live[key], rel=RTOL_FP32), (case, key)


# ---------------------------------------------------------------------------- memory
def test_memory_report_bits_per_weight_by_hand():
    """A 4096 x 1024 layer, N = 4,194,304 weights, blocksize 64 (65,536 blocks):
    double quant: packed N/2 = 2,097,152 B + absmax codes 65,536 B + 256 scales·4 = 1,024 B
    + offset 4 B + NF4 code 64 B + dynamic code 1,024 B = 2,164,804 B, i.e. 4.1290 bits per weight
    (QLoRA's 4 + 8/64 + 32/16384 = 4.1270 plus the code books); without: 2,097,152 + 65,536·4 + 64
    = 2,359,360 B = 4.5001 bits per weight. (A saved state_dict adds the 32-byte `weight_meta`.)"""
    for double_quant, nbytes in ((True, 2_164_804), (False, 2_359_360)):
        model = nn.Sequential(Linear4bit.from_linear(nn.Linear(1024, 4096, bias=False), double_quant=double_quant,
                                                     backend="torch"))
        q = memory_report(model)["quantized"]
        assert (q["modules"], q["params"], q["bytes"]) == (1, 4_194_304, nbytes)
        assert q["bits_per_param"] == pytest.approx(4.1290 if double_quant else 4.5001, abs=1e-4)


@pytest.mark.parametrize("variant", ["llama3.1", "llama3.2"])
def test_memory_report_matches_the_storages_the_model_holds(variant):
    """Totals equal the bytes of the distinct storages behind every parameter, buffer and 4-bit
    layer's NF4State tensor (a tied head counted once); full-precision params = embeddings + 5 norms (+ the untied head);
    quantized = per layer q, o (D·D) + k, v (D·K·E = 64·32) + gate, up, down (D·F = 64·128):
    2·(2·4096 + 2·2048 + 3·8192) = 73,728."""
    model = quantize_model(tiny_model(variant), backend="torch")
    report = memory_report(model)
    states = [v for m in model.modules() if isinstance(m, Linear4bit) for v in vars(m.state).values()
              if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers(), *states]}
    assert report["total"]["bytes"] == sum(storages.values())
    V, D = 256, 64
    head = 0 if variant == "llama3.2" else V * D
    assert report["full_precision"]["params"] == V * D + 5 * D + head
    assert report["quantized"]["params"] == 73_728
    text = format_memory_report(report)
    assert "4-bit linears" in text and "14 4-bit linears" in text


# ---------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_quantized_smollm2_answers_and_stays_close(oracle, smollm2_dir, smollm2, smollm2_tokenizer):
    """SmolLM2-135M-Instruct loaded straight into NF4 (bf16 compute) still answers correctly, and
    its next-token distributions differ from the fp32 model's exactly as much as those of
    transformers + bitsandbytes' NF4 load of the same checkpoint (double quantization, bf16
    compute). Both measure, on make_fixtures.SMOLLM2_TEXT (25 tokens): mean KL(fp32 || nf4) = 0.484
    nats, top-1 agreement 84%, relative logit error ||Δ||/||logits|| = 0.364, max |Δ| = 15.2;
    live, the two models' logits are identical. Large for NF4 because this checkpoint is itself
    dequantized from a 4-bit GGUF (Q4_1), so its weights sit on another 4-bit grid, and a 135M
    model has little redundancy. (bitsandbytes' AVX512-BF16 CPU fast path, off in the oracle,
    measures KL 0.488, top-1 84%, 0.359: it rounds the block scales to bf16.)"""
    from anita.model import generate

    tok = smollm2_tokenizer
    q = from_pretrained(smollm2_dir, quantize="nf4")
    assert sum(isinstance(m, Linear4bit) for m in q.modules()) == 30 * 7
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    answer = tok.decode(generate(q, prompt, max_new_tokens=8, stop_ids=tok.stop_ids))
    assert "Paris" in answer
    ids = torch.tensor([tok.encode(SMOLLM2_TEXT)])  # "The quick brown fox ... capital of France." (25 tokens)
    with torch.no_grad():
        a, b = smollm2(ids), q(ids)  # (1, 25, V)
    theirs = oracle("smollm2", smollm2_dir, ids)
    _assert_error_equals_oracle(error_stats(a, b), theirs, RTOL_BF16, positions=25)
    if theirs["source"] == "live":
        torch.testing.assert_close(b, theirs["logits"], atol=1e-4, rtol=0)  # measured: equal
        saved = json.loads(FIXTURE.read_text())["smollm2"]
        assert saved["ids"] == theirs["ids"]
        for key in ("rel_error", "max_abs_error", "kl", "top1"):
            assert saved[key] == pytest.approx(theirs[key], rel=RTOL_BF16), key
