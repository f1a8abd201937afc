"""`anita merge`: base + adapter -> an HF-layout model with the logits of base + adapter, in anita and
in transformers; tokenizer files copied; a non-empty output directory refused."""

import json
import shutil

import pytest
import torch

from anita.cli import main
from anita.lora import LoraConfig, apply_lora, save_adapter
from anita.model import from_pretrained
from tests.conftest import tiny_model
from tests.lora.test_model import X, _randomize_adapters


@pytest.fixture
def base_and_adapter(tiny_checkpoint, tmp_path):
    """A tiny llama3.2 checkpoint with tokenizer files beside it, a DoRA adapter, and its logits."""
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint("llama3.2"), base)
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (base / "generation_config.json").write_text('{"do_sample": false}')
    model = tiny_model("llama3.2")
    apply_lora(model, LoraConfig(r=4, alpha=8, use_dora=True, use_rslora=True))
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        return base, tmp_path / "adapter", model(X)


def test_merge_writes_a_model_with_the_adapted_logits(base_and_adapter, tmp_path, capsys):
    base, adapter, expected = base_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert "merged 14 LoRA layers" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(out)(X), expected, atol=1e-5, rtol=0)


def test_transformers_loads_the_merged_model_with_the_adapted_logits(base_and_adapter, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, adapter, expected = base_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, expected, atol=1e-4, rtol=0)


def test_merge_in_bf16_writes_bf16(base_and_adapter, tmp_path):
    base, adapter, expected = base_and_adapter
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out),
                 "--dtype", "bfloat16"]) == 0
    merged = from_pretrained(out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with torch.no_grad():
        assert (merged(X).float() - expected).abs().max() < 0.05  # bf16 weights and activations


def test_merge_refuses_a_non_empty_output_and_bad_adapters(base_and_adapter, tmp_path, capsys):
    base, adapter, _ = base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 2
    assert "output directory exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (adapter / "adapter_model.safetensors").unlink()
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "new")]) == 2
    assert "adapter weights not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_merge_given_a_run_directory_points_to_its_adapter(base_and_adapter, tmp_path, capsys):
    """`--adapter RUN_DIR` (the training run, not its adapter/): the error names the adapter to use."""
    base, adapter, _ = base_and_adapter
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "metrics.jsonl").write_text("")
    assert main(["merge", "--model", str(base), "--adapter", str(run), "--output", str(tmp_path / "m")]) == 2
    assert f"a training run's directory, not an adapter; its final adapter is {run / 'adapter'}" in \
        capsys.readouterr().err
