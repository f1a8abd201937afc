"""GGUF import: the q/k row order, the real SmolLM2 file against transformers' own GGUF loader."""

import subprocess
import sys

import pytest
import torch

from anita.errors import AnitaError
from anita.model import Tokenizer
from anita.model.gguf import convert_gguf, hf_name, unpermute_qk


def test_unpermute_undoes_llama_cpp_permute():
    """llama.cpp's converter interleaves each head's two halves: rows (0..E/2-1 | E/2..E-1) become
    (0, E/2, 1, E/2+1, ...). With E=4 and one head, rows [a, b, c, d] are stored [a, c, b, d]."""
    stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_qk(stored, n_heads=1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    w = torch.randn(3 * 8, 5)  # 3 heads of E=8
    permuted = w.reshape(3, 2, 4, 5).transpose(1, 2).reshape(24, 5)  # what llama.cpp does
    assert torch.equal(unpermute_qk(permuted, 3), w)


def test_tensor_names():
    assert hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(AnitaError, match="unsupported GGUF tensor 'blk.0.attn_qkv.weight'"):
        hf_name("blk.0.attn_qkv.weight")


def test_real_smollm2_conversion_equals_transformers_gguf_loader(smollm2, smollm2_tokenizer):
    """transformers dequantizes the same GGUF independently; both must give identical logits."""
    transformers = pytest.importorskip("transformers")
    from anita.assets import smollm2_gguf

    gguf = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Roma è la capitale d'Italia dal 1871; ha 2.8 milioni di abitanti."
    assert smollm2_tokenizer.encode(text) == hf_tok.encode(text)
    ids = torch.tensor([smollm2_tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(smollm2(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert smollm2.config.tie_word_embeddings and smollm2.config.num_key_value_heads == 3


def test_converted_directory_is_complete(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert Tokenizer.from_pretrained(smollm2_dir).chat_template.startswith("{% for message in messages %}")


def test_bad_inputs(tmp_path):
    with pytest.raises(AnitaError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(AnitaError, match="junk.gguf: not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(AnitaError, match="not empty"):
        convert_gguf(junk, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_convert_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "anita.cli", "convert-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "x.gguf" in out.stderr
