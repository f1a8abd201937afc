"""Tests for anita/train/trainer_state.py: optimizer and scheduler state through safetensors +
JSON (no pickle) continue exactly as the optimizer that never left memory (the oracle), for
torch AdamW and bitsandbytes' 8-bit AdamW (whose block-quantized states need their absmax scales
and quantization maps); RNG states round-trip as uint8 tensors; and no module of anita reads a
file with torch.load (a pickle)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from anita.errors import AnitaError
from anita.train.optim import build_optimizer, build_scheduler
from anita.train.trainer_state import (check_optimizer_state, from_tree, rng_tensors, set_rng_tensors,
                                       to_tree)


def _params():
    """One parameter bitsandbytes quantizes (>= 4096 elements) and one it keeps in 32 bits."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]


def _step(params, optimizer, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    scheduler.step()


def _through_files(state: dict, tmp_path) -> dict:
    tensors: dict = {}
    tree = to_tree(state, tensors, "optimizer")
    save_file(tensors, tmp_path / "optimizer.safetensors")
    (tmp_path / "trainer_state.json").write_text(json.dumps(tree))
    return from_tree(json.loads((tmp_path / "trainer_state.json").read_text()),
                     load_file(tmp_path / "optimizer.safetensors"), "trainer_state.json")


@pytest.mark.parametrize("name, quantized", [("adamw", []), ("adamw_8bit", ["state1", "qmap1", "absmax1", "qmap2"])])
def test_optimizer_state_through_files_continues_bit_for_bit(tmp_path, name, quantized):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    params, twins = _params(), _params()
    optimizer, twin = build_optimizer(params, name, 1e-2, 0.01), build_optimizer(twins, name, 1e-2, 0.01)
    scheduler, twin_scheduler = build_scheduler(optimizer, 2, 10, "cosine"), build_scheduler(twin, 2, 10, "cosine")
    for seed in range(3):
        _step(params, optimizer, scheduler, seed)
        _step(twins, twin, twin_scheduler, seed)
    loaded = _through_files({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp_path)
    stored = load_file(tmp_path / "optimizer.safetensors")
    for state in quantized:  # 8-bit states and their quantization maps are stored as tensors
        assert any(k.endswith(f"/0/__bnb_optimizer_quant_state__/{state}") for k in stored), sorted(stored)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = build_optimizer(fresh, name, 1e-2, 0.01)
    resumed_scheduler = build_scheduler(resumed, 2, 10, "cosine")
    check_optimizer_state(loaded["optimizer"], resumed, "trainer_state.json")
    resumed.load_state_dict(loaded["optimizer"])
    resumed_scheduler.load_state_dict(loaded["scheduler"])
    for seed in range(3, 6):
        _step(fresh, resumed, resumed_scheduler, seed)
        _step(twins, twin, twin_scheduler, seed)
    assert all(torch.equal(a, b) for a, b in zip(fresh, twins))
    assert resumed_scheduler.get_last_lr() == twin_scheduler.get_last_lr()


@pytest.mark.parametrize("tree, message", [
    ({"dict": {"state": {"tensor": "nope"}}}, "names tensor 'nope'"),
    ({"int_dict": {"x": 1}}, "an int_dict with a key that is not an integer"),
    ({"pickle": "cos\nsystem"}, "unknown tag 'pickle'"),
    ({"dict": {}, "tuple": []}, "expected a one-key tag"),
])
def test_a_malformed_tree_is_one_error_naming_the_file(tree, message):
    with pytest.raises(AnitaError, match=f"^trainer_state.json: {message}"):
        from_tree(tree, {}, "trainer_state.json")


def test_to_tree_keeps_tuples_int_keys_and_shared_tensors():
    shared = torch.arange(4.0)
    state = {"state": {0: {"q": shared}, 1: {"q": shared}}, "betas": (0.9, 0.99), "params": [0, 1], "x": None}
    tensors: dict = {}
    back = from_tree(json.loads(json.dumps(to_tree(state, tensors))), tensors, "f")
    assert len(tensors) == 1 and back["betas"] == (0.9, 0.99) and back["params"] == [0, 1] and back["x"] is None
    assert back["state"][0]["q"] is back["state"][1]["q"]  # stored once, shared again


def test_rng_states_round_trip_as_uint8_tensors():
    state = rng_tensors()
    assert state["torch"].dtype == torch.uint8
    want = torch.rand(5)
    set_rng_tensors(state, "rng-rank0.safetensors")
    assert torch.equal(torch.rand(5), want)
    with pytest.raises(AnitaError, match="rng-rank0.safetensors: RNG state 'torch' must be a 1-D uint8 tensor"):
        set_rng_tensors({"torch": state["torch"].float()}, "rng-rank0.safetensors")


def test_no_module_of_anita_unpickles():
    """`git grep "torch.load"` in anita/ finds nothing, nor pickle.load(s)."""
    root = Path(__file__).resolve().parents[2] / "anita"
    found = [f"{p}:{n}" for p in root.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"torch\.load\b|pickle\.loads?\(|import pickle", line)]
    assert found == []
