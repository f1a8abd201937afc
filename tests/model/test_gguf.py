"""GGUF import: the q/k row order, the real SmolLM2 file against transformers' own GGUF loader.

anita's conversion of SmolLM2 (the `smollm2_dir` fixture) is compared with what transformers'
GGUF loader makes of the same file: live where transformers is installed, and everywhere through
the saved hf_gguf_smollm2.{json,safetensors} (tests/model/make_fixtures.py), which never saw
anita's converter.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from anita.errors import AnitaError
from anita.model import Tokenizer
from anita.model.gguf import convert_gguf, hf_name, unpermute_qk
from tests.model.make_fixtures import CONFIG_FIELDS, GGUF_JSON, GGUF_TENSORS, checksums, merges_digest, vocab_digest

SAVED = json.loads(GGUF_JSON.read_text())


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    """Every tensor of anita's converted model.safetensors, by name."""
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


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


def test_real_smollm2_conversion_equals_transformers_gguf_loader(smollm2, smollm2_tokenizer, transformers_smollm2):
    """transformers dequantizes the same GGUF independently; both must give identical logits."""
    hf, hf_tok = transformers_smollm2
    text = "Roma è la capitale d'Italia dal 1871; ha 2.8 milioni di abitanti."
    assert smollm2_tokenizer.encode(text) == hf_tok.encode(text)
    ids = torch.tensor([smollm2_tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(smollm2(ids), hf(ids).logits, atol=1e-4, rtol=0)
    assert smollm2.config.tie_word_embeddings and smollm2.config.num_key_value_heads == 3


def test_converted_tensors_match_saved_transformers_gguf_tensors(converted):
    """Every tensor transformers' GGUF loader produces (tied lm_head once, as the embedding): same
    names and shapes in anita's file, 18 values at fixed flat indices bit-exact, and the float64
    plain and position-weighted sums (the latter sees any reordering) within 1e-6."""
    saved = load_file(GGUF_TENSORS)
    names = list(SAVED["tensors"])
    assert sorted(converted) == names and len(names) == 272
    for i, name in enumerate(names):
        w = converted[name]
        assert list(w.shape) == SAVED["tensors"][name] and w.dtype == torch.float32, name
        torch.testing.assert_close(w.flatten()[saved["index"][i]], saved["values"][i], rtol=0, atol=0, msg=name)
        got = torch.tensor(checksums(w), dtype=torch.float64)
        want = torch.stack([saved["sum"][i], saved["weighted_sum"][i]])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_converted_qk_rows_match_saved_transformers_gguf_rows(converted):
    """The q/k un-permutation: full rows of one layer's q_proj and k_proj (both sides of each
    head's half boundary and of head boundaries) bit-exact, and every row's float64 sum, i.e.
    the whole row order of both matrices, against transformers' GGUF loader."""
    saved, layer = load_file(GGUF_TENSORS), SAVED["qk_layer"]
    q = converted[f"model.layers.{layer}.self_attn.q_proj.weight"]
    k = converted[f"model.layers.{layer}.self_attn.k_proj.weight"]
    torch.testing.assert_close(q[SAVED["q_rows"]], saved["q_rows"], rtol=0, atol=0)
    torch.testing.assert_close(k[SAVED["k_rows"]], saved["k_rows"], rtol=0, atol=0)
    torch.testing.assert_close(q.double().sum(-1), saved["q_row_sums"], rtol=0, atol=1e-9)
    torch.testing.assert_close(k.double().sum(-1), saved["k_row_sums"], rtol=0, atol=1e-9)
    assert not torch.equal(saved["q_rows"][0], saved["q_rows"][4])  # rows 0 and 32 differ: a swap would show


def test_converted_config_matches_saved_transformers_gguf_config(smollm2_dir, converted):
    """config.json fields against transformers' config from the GGUF metadata; its tied head
    (lm_head is embed_tokens) is anita's tie_word_embeddings with no lm_head tensor stored."""
    want = SAVED["config"]
    got = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: got[k] for k in CONFIG_FIELDS} == {k: want[k] for k in CONFIG_FIELDS}
    assert got["rope_theta"] == want["rope_theta"] and want["rope_type"] == "default" and got["rope_scaling"] is None
    assert want["lm_head_is_embed_tokens"] and got["tie_word_embeddings"] and "lm_head.weight" not in converted


def test_converted_tokenizer_matches_saved_transformers_gguf_tokenizer(smollm2_tokenizer):
    """Ids of Italian with accents, digits, punctuation and whitespace, code with an emoji and a
    rendered chat (special tokens inside the text), their decoding, the chat template's output,
    the special tokens, and the whole vocabulary and merge list (sha256), all against
    transformers' GGUF tokenizer."""
    want = SAVED["tokenizer"]
    tok = smollm2_tokenizer
    assert [tok.encode(t) for t in want["texts"]] == want["ids"]
    assert [tok.decode(ids) for ids in want["ids"]] == want["decoded"] == want["texts"]
    assert tok.render_chat(want["chat"], add_generation_prompt=True) == want["chat_text"] == want["texts"][-1]
    assert want["ids"][-1].count(want["special"]["bos"][1]) == 5  # <|im_start|> is one token, not split
    assert {"bos": [tok.bos_token, tok.bos_id], "eos": [tok.eos_token, tok.eos_id],
            "pad": [tok.pad_token, tok.pad_id]} == want["special"]
    assert tok.vocab_size == want["vocab_size"]
    assert vocab_digest(tok.backend.get_vocab(with_added_tokens=True)) == want["vocab_sha256"]
    assert merges_digest(json.loads(tok.backend.to_str())["model"]["merges"]) == want["merges_sha256"]


def test_dequantization_by_hand(converted):
    """Both sides use the gguf package's dequantizers, so decode a few rows from the raw bytes
    here. Q4_1 (20-byte blocks of 32): fp16 scale d, fp16 min m, 16 bytes whose low nibbles are
    elements 0-15 and high nibbles 16-31, x = d*q + m. Q8_0 (34-byte blocks): fp16 d, 32 int8,
    x = d*q. q_proj rows also check the un-permutation: row h*64 + r is stored row h*64 + 2r for
    r < 32 and h*64 + 2(r-32) + 1 above."""
    from gguf import GGUFReader

    from anita.assets import smollm2_gguf

    raw = {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in GGUFReader(str(smollm2_gguf())).tensors}

    def q4_1(row):
        blocks = torch.from_numpy(row.reshape(-1, 20).copy())
        d, m = (blocks[:, a:a + 2].contiguous().view(torch.float16).float() for a in (0, 2))
        qs = blocks[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        return (d * q + m).flatten()

    def q8_0(row):
        blocks = torch.from_numpy(row.reshape(-1, 34).copy())
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).flatten()

    kind, v = raw["blk.0.attn_v.weight"]
    assert kind == "Q4_1"
    for r in (0, 77, 191):
        torch.testing.assert_close(converted["model.layers.0.self_attn.v_proj.weight"][r], q4_1(v[r]), rtol=0, atol=0)
    kind, q = raw["blk.3.attn_q.weight"]
    for hf_row, stored in [(0, 0), (1, 2), (32, 1), (33, 3), (63, 63), (65, 66), (96, 65), (575, 575)]:
        torch.testing.assert_close(converted["model.layers.3.self_attn.q_proj.weight"][hf_row], q4_1(q[stored]),
                                   rtol=0, atol=0)
    kind, e = raw["token_embd.weight"]
    assert kind == "Q8_0"
    for r in (0, 1, 12345, 49151):
        torch.testing.assert_close(converted["model.embed_tokens.weight"][r], q8_0(e[r]), rtol=0, atol=0)


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
