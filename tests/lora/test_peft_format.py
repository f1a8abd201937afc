"""Adapter files in PEFT's format: anita <-> PEFT round trips (LoRA, rsLoRA, DoRA) on tiny models and
the real SmolLM2, saved PEFT fixtures that keep a check alive without peft, and bad input."""

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anita.errors import AnitaError
from anita.lora import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
from anita.model import from_pretrained
from tests.conftest import tiny_model
from tests.lora.test_model import X, _randomize_adapters

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("lora", "rslora", "dora")  # plain LoRA, rsLoRA with all linears, DoRA on a tied model


def _case(kind):
    """(variant, anita LoraConfig kwargs) for `kind`, built afresh on every call: a test may edit
    what it gets (rename alpha, append to target_modules) without changing what the next test sees."""
    return {
        "lora": ("llama3", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        "rslora": ("llama3.1", dict(r=4, alpha=8, use_rslora=True, target_modules="all-linear")),
        "dora": ("llama3.2", dict(r=2, alpha=4, use_dora=True)),
    }[kind]


def _adapted(variant, seed=1, **config):
    model = tiny_model(variant)
    apply_lora(model, LoraConfig(**config))
    _randomize_adapters(model, seed)
    return model


def _hf(checkpoint_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()


# -------------------------------------------------------------------------- file contents
def test_files_use_peft_names_and_round_trip_in_anita(tmp_path):
    model = _adapted("llama3.2", r=2, alpha=4, use_dora=True, use_rslora=True)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "bias",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "use_rslora": True,
        "use_dora": True, "bias": "none", "base_model_name_or_path": "tiny"}
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 14 * 3
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 2)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"].shape == (32,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    again = tiny_model("llama3.2")
    report = load_adapter(again, tmp_path)
    assert report.wrapped == list(lora_layers(model))
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_partial_targets_are_written_as_full_names(tmp_path):
    """Only layer 0's q_proj adapted: "q_proj" would select layer 1's too, so full names are written."""
    model = _adapted("llama3", r=2, target_modules=["layers.0.self_attn.q_proj"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


# ------------------------------------------------------------------- saved PEFT fixtures
@pytest.mark.parametrize("name, variant", [("peft_rslora", "llama3.1"), ("peft_dora", "llama3.2")])
def test_adapters_written_by_peft_give_peft_logits(name, variant):
    """Adapters and logits written by PEFT (tests/lora/make_fixtures.py) for the same tiny checkpoint."""
    model = tiny_model(variant)
    report = load_adapter(model, FIXTURES / name)
    assert len(report.wrapped) == (6 if name == "peft_rslora" else 14)
    expected = load_file(FIXTURES / "peft_logits.safetensors")[name]
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, atol=1e-4, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scale == (8 / 2 if name == "peft_rslora" else 4 / 2)  # alpha/√r resp. alpha/r


# ------------------------------------------------------------------------ PEFT as oracle
@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_what_anita_saves(kind, tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    variant, config = _case(kind)
    model = _adapted(variant, **config)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == config["alpha"]
    hf = peft.PeftModel.from_pretrained(_hf(tiny_checkpoint(variant)), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, model(X), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_anita_loads_what_peft_saves(kind, tiny_checkpoint, tmp_path):
    pytest.importorskip("peft")
    from tests.lora.make_fixtures import peft_model

    variant, config = _case(kind)
    lora = {("lora_alpha" if k == "alpha" else k): v for k, v in config.items()}  # PEFT's name for alpha
    peft_lm = peft_model(tiny_checkpoint(variant), **lora)
    peft_lm.save_pretrained(tmp_path)
    model = from_pretrained(tiny_checkpoint(variant))
    load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(X), peft_lm(X).logits, atol=1e-4, rtol=0)


def test_dora_with_dropout_in_training_equals_peft_layer():
    """One DoRA layer in training mode with dropout 0.3: PEFT's `lora.Linear` and anita's draw the
    same mask from the same seed; outputs and the gradients of A, B and m must agree."""
    peft = pytest.importorskip("peft")
    from anita.lora import LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7, bias=False).requires_grad_(False)
    ours = LoraLinear(base, LoraConfig(r=3, alpha=5, dropout=0.3, use_dora=True)).train()
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        ours.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 7))
    config = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.3, use_dora=True, target_modules=["base"])
    theirs = peft.tuners.lora.Linear(copy.deepcopy(base), "default", config, r=3, lora_alpha=5,
                                     lora_dropout=0.3, use_dora=True).train()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x, g = torch.randn(2, 5, 12), torch.randn(2, 5, 7)
    torch.manual_seed(3)
    y_ours = ours(x)
    torch.manual_seed(3)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-6, rtol=1e-6)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    for a, b in [(ours.lora_A.weight, theirs.lora_A["default"].weight), (ours.lora_B.weight, theirs.lora_B["default"].weight),
                 (ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)]:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_real_smollm2_round_trips_with_peft(smollm2, smollm2_dir, tmp_path):
    """SmolLM2-135M, rsLoRA + DoRA on q, v, down: an adapter PEFT made loads into anita with PEFT's
    logits; re-randomised in anita and saved, it loads back into PEFT with anita's logits."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from tests.lora.make_fixtures import peft_model

    ids = torch.tensor([[1, 504, 3458, 282, 260, 1789, 314, 5646, 30]])
    lora = dict(r=8, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft_model(smollm2_dir, **lora)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(smollm2)  # the session fixture must stay unchanged
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        first = ours(ids)
        torch.testing.assert_close(first, theirs(ids).logits, atol=1e-4, rtol=0)
        _randomize_adapters(ours)
        save_adapter(ours, tmp_path / "anita")
        again = PeftModel.from_pretrained(_hf(smollm2_dir), tmp_path / "anita").eval()
        second = ours(ids)
        # fp32 logits of a 30-layer model summed in two libraries' orders: up to 1.4e-4 apart on an AVX2 CPU
        torch.testing.assert_close(again(ids).logits, second, atol=3e-4, rtol=0)
    assert (second - first).abs().max() > 1e-3  # the second adapter really differs


# ------------------------------------------------------------------------------ bad input
def _saved(tmp_path, variant="llama3", **config):
    model = _adapted(variant, **({"r": 4} | config))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
NAN, INF = float("nan"), float("inf")


def _edit_config(adapter, **fields):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def _edit_tensors(adapter, edit):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


BAD = {
    "missing dir": (lambda a: a.rename(a.parent / "gone"), "no such adapter directory"),
    "missing config": (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json: adapter config not found"),
    "missing weights": (lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
                        "adapter weights not found .only safetensors"),
    "corrupt weights": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                        "cannot read safetensors file"),
    "not json": (lambda a: (a / "adapter_config.json").write_text("{r: 4"), "not valid JSON"),
    "not lora": (lambda a: _edit_config(a, peft_type="IA3"), "peft_type is 'IA3', expected 'LORA'"),
    "rank pattern": (lambda a: _edit_config(a, rank_pattern={"q_proj": 8}), "rank_pattern=.* is not supported"),
    "bias": (lambda a: _edit_config(a, bias="all"), "bias='all' is not supported"),
    "bad alpha": (lambda a: _edit_config(a, lora_alpha=-1), "adapter_config.json: lora_alpha must be a finite number > 0"),
    "rank mismatch": (lambda a: _edit_config(a, r=8), r"lora_A.weight' has shape \(4, (\d+)\), expected \(8, \1\) \(r=8"),
    "dora without flag": (lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)})),
        "DoRA magnitudes for 'model.layers.0.self_attn.q_proj' but adapter_config.json says use_dora=false"),
    "missing B": (lambda a: _edit_tensors(a, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")),
                  "missing tensor 'base_model.model.model.layers.1.mlp.up_proj.lora_B.weight'"),
    "embedding adapter": (lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 256)})),
        "'base_model.model.model.embed_tokens.lora_embedding_A' is not a LoRA tensor anita can load"),
    "non-linear target": (lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.model.norm.lora_A.weight": torch.ones(4, 64)})),
        "targets 'model.norm': a RMSNorm, not a linear"),
    # issue 18: each of these loaded, and merged to NaN or to a model PEFT would not build
    "nan alpha": (lambda a: _edit_config(a, lora_alpha=NAN), "lora_alpha must be a finite number > 0, got nan"),
    "inf alpha": (lambda a: _edit_config(a, lora_alpha=INF), "lora_alpha must be a finite number > 0, got inf"),
    "nan dropout": (lambda a: _edit_config(a, lora_dropout=NAN), "lora_dropout must be a finite number in"),
    "nan tensor": (lambda a: _edit_tensors(a, lambda t: t[Q0_A].__setitem__((0, 0), NAN)),
                   rf"adapter_model.safetensors: tensor '{Q0_A}' holds 1 non-finite value\(s\)"),
    "inf tensor": (lambda a: _edit_tensors(a, lambda t: t[Q0_A].fill_(-INF)), f"tensor '{Q0_A}' holds 256 non"),
    "int tensor": (lambda a: _edit_tensors(a, lambda t: t.update({Q0_A: t[Q0_A].long()})), "dtype int64, expected"),
    "target nope": (lambda a: _edit_config(a, target_modules=["q_proj", "nope_proj"]),
                    "adapter_config.json: target_modules: 'nope_proj' matches no module of this model; its linears are "
                    "named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "target regex nope": (lambda a: _edit_config(a, target_modules=".*nope"), r"target_modules '.\*nope' \(a regular"),
    "target not selecting": (lambda a: _edit_config(a, target_modules=["q_proj"]),
                             "has tensors for 'model.layers.0.mlp.down_proj', which target_modules=.'q_proj'. in "
                             "adapter_config.json does not select"),
    "target bad regex": (lambda a: _edit_config(a, target_modules="(q_proj"), "not a valid regular expression"),
    "target number": (lambda a: _edit_config(a, target_modules=3), "must be a non-empty list of module names or a str"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_a_clear_error_and_the_model_is_unchanged(case, tmp_path):
    adapter = _saved(tmp_path)
    damage, message = BAD[case]
    damage(adapter)
    model = tiny_model("llama3")
    with pytest.raises(AnitaError, match=message):
        load_adapter(model, adapter)
    assert not lora_layers(model)
    assert torch.equal(model(X), tiny_model("llama3")(X))


@pytest.mark.parametrize("other, message", [
    (dict(hidden_size=32), r"lora_[AB].weight' has shape \((4, 32|32, 4)\), expected \((4, 64|64, 4)\)"),
    (dict(num_hidden_layers=3), r"targets 'model.layers.2.\w+.\w+_proj': no such module in this model"),
])
def test_adapter_for_another_architecture_is_refused(other, message, tmp_path):
    source = tiny_model("llama3", **other)
    apply_lora(source, LoraConfig(r=4))
    save_adapter(source, tmp_path)
    model = tiny_model("llama3")
    with pytest.raises(AnitaError, match=message):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_loading_into_a_model_with_lora_and_saving_without_are_refused(tmp_path):
    adapter = _saved(tmp_path)
    model = _adapted("llama3", r=4)
    with pytest.raises(AnitaError, match="already has LoRA layers"):
        load_adapter(model, adapter)
    with pytest.raises(AnitaError, match="has no LoRA layers"):
        save_adapter(tiny_model("llama3"), tmp_path / "empty")


@pytest.mark.parametrize("init, accepted", [(True, True), (False, True), ("gaussian", True), ("eva", True),
                                            ("orthogonal", True), ("pissa", False), ("pissa_niter_16", False),
                                            ("olora", False), ("loftq", False), ("corda", False)])
def test_init_lora_weights_anita_cannot_reproduce_is_refused(init, accepted, tmp_path):
    """PEFT's true / false / "gaussian" / "eva" / "orthogonal" only choose a new adapter's start,
    which the loaded weights replace; PiSSA, OLoRA, LoftQ, CorDA also rewrite the base weights, so
    such an adapter does not compute base + BA over anita's base and is refused by name."""
    adapter = _saved(tmp_path)
    _edit_config(adapter, init_lora_weights=init)
    model = tiny_model("llama3")
    if accepted:
        load_adapter(model, adapter)
        assert lora_layers(model)
    else:
        with pytest.raises(AnitaError, match=f"init_lora_weights='{init}' is not supported"):
            load_adapter(model, adapter)
        assert not lora_layers(model)


# ------------------------------------------------------------------------ target_modules
# What PEFT 0.21 wraps when an adapter holding all 14 linears of the tiny model says these target_modules
# (None: PEFT refuses, "not found in the base model"); checked live by the test after this one. anita loads
# an adapter exactly when PEFT would use every tensor in it: a name that selects nothing is a typo, and
# tensors PEFT would silently leave out give a different model from the same file.
PEFT_WRAPS = {
    "['q_proj', 'nope_proj']": 2, "['nope_proj']": None, "'.*nope'": None, "['q_proj']": 2,
    r"'.*\\.(q|v)_proj'": 4, "'all-linear'": 14, "'.*_proj'": 14,
    "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']": 14,
}


@pytest.mark.parametrize("target_modules", list(PEFT_WRAPS))
def test_an_adapter_loads_exactly_when_peft_would_use_all_its_tensors(target_modules, tmp_path):
    adapter = _saved(tmp_path)
    _edit_config(adapter, target_modules=ast.literal_eval(target_modules))
    model = tiny_model("llama3")
    if PEFT_WRAPS[target_modules] == 14:
        assert len(load_adapter(model, adapter).wrapped) == 14
    else:
        with pytest.raises(AnitaError, match="target_modules"):
            load_adapter(model, adapter)
        assert not lora_layers(model)


def test_peft_wraps_what_the_table_says(tiny_checkpoint, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    adapter = _saved(tmp_path)
    for target_modules, wraps in PEFT_WRAPS.items():
        _edit_config(adapter, target_modules=ast.literal_eval(target_modules))
        try:
            peft = PeftModel.from_pretrained(_hf(tiny_checkpoint("llama3")), adapter)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError
            assert wraps is None and "not found in the base model" in str(e), target_modules
            continue
        assert sum(name.endswith("lora_A") for name, _ in peft.named_modules()) == wraps, target_modules
