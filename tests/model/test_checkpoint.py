"""Checkpoint I/O: HF layout in and out, sharding, the Hub cache offline, and clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from anita.errors import AnitaError
from anita.hub import resolve_model_dir
from anita.model import from_pretrained, save_pretrained
from tests.conftest import tiny_model
from tests.train.conftest import write_byte_tokenizer


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_roundtrip_in_bf16_and_dtype_cast(tiny_checkpoint, tmp_path):
    model = from_pretrained(tiny_checkpoint("llama3.2"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")  # tied: stored once
    again = from_pretrained(tmp_path / "out", dtype="bfloat16")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model = tiny_model("llama3")
    save_pretrained(model, tmp_path, max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path)(x), model(x))


def test_transformers_loads_what_anita_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model("llama3.2")
    save_pretrained(model, tmp_path, max_shard_size=40_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_hub_repo_id_resolves_from_the_local_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    """A repo id is looked up through huggingface-hub; with HF_HUB_OFFLINE=1 only the cache is used."""
    snapshot = tmp_path / "hub" / "models--anita--tiny" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    _copy_checkpoint(tiny_checkpoint("llama3"), snapshot)
    (tmp_path / "hub" / "models--anita--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--anita--tiny" / "refs" / "main").write_text("a" * 40)
    code = ("from anita.model import from_pretrained; m = from_pretrained('anita/tiny'); print(m.config.num_hidden_layers)\n"
            "from anita.errors import AnitaError\n"
            "try: from_pretrained('anita/not-cached')\n"
            "except AnitaError as e: print('ERR', e)")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1].startswith("ERR anita/not-cached") and "HF_HUB_OFFLINE" in lines[1]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(AnitaError, match="no such model directory"):
        resolve_model_dir(tmp_path / "nope")


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing tensor.*model.layers.1.mlp.up_proj.weight"),
    ("extra", "unexpected tensor 'model.layers.9.mlp.up_proj.weight'"),
    ("shape", r"'model.layers.0.self_attn.q_proj.weight' has shape \(64, 32\), expected \(64, 64\)"),
    ("truncated", "cannot read safetensors file"),
    ("no-weights", "no model.safetensors"),
    ("config-field", "config.json: missing required field.*num_hidden_layers"),
    ("config-json", "config.json: not valid JSON"),
])
def test_damaged_checkpoints_name_the_file_and_tensor(tiny_checkpoint, tmp_path, damage, message):
    path = _copy_checkpoint(tiny_checkpoint("llama3"), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    state = load_file(weights)
    if damage == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
    elif damage == "extra":
        state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    elif damage == "shape":
        state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    if damage in ("missing", "extra", "shape"):
        save_file(state, str(weights))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "config-field":
        config = json.loads((path / "config.json").read_text())
        del config["num_hidden_layers"]
        (path / "config.json").write_text(json.dumps(config))
    elif damage == "config-json":
        (path / "config.json").write_text("{\n  oops")
    with pytest.raises(AnitaError, match=message) as err:
        from_pretrained(path)
    assert str(path) in str(err.value)


def test_cli_reports_bad_checkpoint_without_traceback(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint("llama3"), tmp_path / "ckpt")
    write_byte_tokenizer(path)  # generate reads the tokenizer (to check the prompt fits) before the weights
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    out = subprocess.run([sys.executable, "-m", "anita.cli", "generate", "--model", str(path), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "model.safetensors" in out.stderr
