"""GGUF export: read back by anita's importer (round trip), by transformers' own GGUF loader and by
llama.cpp itself (oracles that anita did not write)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants
from safetensors.torch import load_file

from anita.cli import main
from anita.export import GGUF_TYPES, export_gguf, permute_qk
from anita.model import Tokenizer, from_pretrained, generate, save_pretrained
from anita.model.gguf import convert_gguf, unpermute_qk
from tests.conftest import tiny_model
from tests.eval.tiny import CONFIG, VOCAB_SIZE, tiny_backend

CHAT = [{"role": "user", "content": "Qual è la capitale d'Italia? Rispondi in 12 parole."}]


def tiny_dir(path: Path, variant: str) -> Path:
    ids = dict(bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1)  # <s>, </s> of the tiny tokenizer
    save_pretrained(tiny_model(variant, seed=1, vocab_size=VOCAB_SIZE + 2, **ids), path)  # 2 unused ids: [PAD]s
    tiny_backend().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(CONFIG))
    return path


def test_permute_is_the_inverse_of_the_import():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    # one head, E=4: rotate-half rows [a, b, c, d] are stored interleaved [a, c, b, d]
    assert permute_qk(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("variant", ["llama3", "llama3.1", "llama3.2"])
def test_round_trip_f32_is_exact(tmp_path, variant):
    src = tiny_dir(tmp_path / "src", variant)
    assert main(["export-gguf", str(src), str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for field in ("rope_scaling", "tie_word_embeddings", "num_key_value_heads", "rope_theta", "vocab_size",
                  "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg_a[field] == cfg_b[field], field
    tok, back = Tokenizer.from_pretrained(src), Tokenizer.from_pretrained(tmp_path / "back")
    assert back.encode("Roma casa 123", add_special_tokens=False) == tok.encode("Roma casa 123", add_special_tokens=False)


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_round_trip_within_the_types_rounding(tmp_path, qtype):
    """Each matrix comes back as the gguf package's own quantize->dequantize of the source; vectors exact."""
    src = tiny_dir(tmp_path / "src", "llama3.1")
    export_gguf(src, tmp_path / "m.gguf", qtype)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    t = GGUF_TYPES[qtype]
    for k, w in a.items():
        if w.ndim == 1:
            assert torch.equal(w, b[k]), k
            continue
        want = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), t), t).astype(np.float32))
        if k.endswith(("q_proj.weight", "k_proj.weight")):  # rows are quantized in llama.cpp's order
            n = 4 if "q_proj" in k else 2
            want = unpermute_qk(torch.from_numpy(quants.dequantize(quants.quantize(permute_qk(w, n).numpy(), t), t)), n)
        torch.testing.assert_close(b[k], want.float(), rtol=0, atol=0, msg=k)


def test_metadata_and_tokenizer_fields(tmp_path):
    src = tiny_dir(tmp_path / "src", "llama3.1")
    export_gguf(src, tmp_path / "m.gguf", "q8_0")
    r = GGUFReader(str(tmp_path / "m.gguf"))
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert f("general.architecture") == "llama" and f("llama.context_length") == 512
    assert (f("llama.attention.head_count"), f("llama.attention.head_count_kv")) == (4, 2)
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB_SIZE + 2 and tokens[-1] == f"[PAD{VOCAB_SIZE + 1}]" and types[-1] == 5
    assert tokens[f("tokenizer.ggml.bos_token_id")] == "<s>" and tokens[f("tokenizer.ggml.eos_token_id")] == "</s>"
    assert types[tokens.index("<s>")] == 3 and f("tokenizer.ggml.add_bos_token") is True
    assert "rope_freqs.weight" in {t.name for t in r.tensors}


@pytest.mark.parametrize("problem", ["type", "tokenizer", "config"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, problem):
    src = tiny_dir(tmp_path / "src", "llama3")
    args = ["export-gguf", str(src), str(tmp_path / "m.gguf")]
    if problem == "type":
        args += ["--type", "q5_k"]
    elif problem == "tokenizer":
        (src / "tokenizer.json").unlink()
    else:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and {"type": "q5_k", "tokenizer": "tokenizer.json", "config": "mistral"}[problem] in err
    assert os.listdir(tmp_path) == ["src"]


def test_adapter_is_merged_into_the_fp32_weights(tmp_path):
    from anita.lora import LoraConfig, apply_lora, merge_to_directory, save_adapter

    src = tiny_dir(tmp_path / "src", "llama3")
    model = from_pretrained(src)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    save_adapter(model, tmp_path / "adapter")
    merge_to_directory(src, tmp_path / "adapter", tmp_path / "merged")
    export_gguf(src, tmp_path / "m.gguf", "f32", adapter=tmp_path / "adapter")
    convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           load_file(src / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


# ----------------------------------------------------------------- the real SmolLM2, read by transformers
@pytest.fixture(scope="module")
def smollm2_exports(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-gguf")
    for t in ("f16", "q8_0"):
        export_gguf(smollm2_dir, out / f"smollm2-{t}.gguf", t)
    return out


def mean_kl(ref_logits, logits) -> float:
    p, q = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("qtype,bound", [("f16", 1e-3), ("q8_0", 2e-2)])
def test_transformers_gguf_loader_reads_the_export(smollm2, smollm2_tokenizer, smollm2_exports, qtype, bound):
    transformers = pytest.importorskip("transformers")
    name = f"smollm2-{qtype}.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_exports, gguf_file=name, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_exports, gguf_file=name)
    ids = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    hf_ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == ids
    assert hf_tok.eos_token_id == smollm2_tokenizer.eos_id == hf.config.eos_token_id == 2
    x = torch.tensor([ids])
    with torch.no_grad():
        assert mean_kl(smollm2(x), hf(x).logits) <= bound


LLAMA_CPP_SCRIPT = """
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False, n_threads=2)
ids = json.loads(sys.argv[2])
out = []
for t in m.generate(ids, temp=0.0, top_k=1, reset=True):
    out.append(t)
    if len(out) == 12:
        break
print(json.dumps({"ids": out, "eos": m.token_eos(), "prompt": m.tokenize(sys.argv[3].encode(), add_bos=False, special=True)}))
"""


LLAMA_CPP_FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp_smollm2_f16.json"


def llama_cpp_answer(gguf: Path, ids: list[int], text: str) -> dict | None:
    """llama.cpp's prompt ids, EOS id and 12 greedy tokens on `gguf` (llama-cpp-python, built in its own
    venv: $ANITA_LLAMA_CPP_PYTHON, default /tmp/llcpp/bin/python), or None where it is not built."""
    python = os.environ.get("ANITA_LLAMA_CPP_PYTHON", "/tmp/llcpp/bin/python")
    if not Path(python).is_file():
        return None
    run = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, str(gguf), json.dumps(ids), text],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_against_llama_cpp(got: dict, smollm2, tokenizer, ids: list[int]) -> None:
    assert got["prompt"] == ids and got["eos"] == tokenizer.eos_id
    assert got["ids"] == generate(smollm2, ids, max_new_tokens=12, stop_ids=[], temperature=0.0)


def test_llama_cpp_greedy_tokens_equal_anitas(smollm2, smollm2_tokenizer, smollm2_exports):
    """llama.cpp on the f16 export tokenizes the chat prompt to anita's ids, has anita's EOS, and
    decodes the same 12 greedy tokens as anita on the source model; the saved answer is current."""
    ids = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    got = llama_cpp_answer(smollm2_exports / "smollm2-f16.gguf", ids,
                           smollm2_tokenizer.render_chat(CHAT, add_generation_prompt=True))
    if got is None:
        pytest.skip("llama-cpp-python not built (set ANITA_LLAMA_CPP_PYTHON)")
    check_against_llama_cpp(got, smollm2, smollm2_tokenizer, ids)
    if os.environ.get("ANITA_WRITE_FIXTURES"):
        LLAMA_CPP_FIXTURE.parent.mkdir(exist_ok=True)
        LLAMA_CPP_FIXTURE.write_text(json.dumps(got) + "\n")
    assert json.loads(LLAMA_CPP_FIXTURE.read_text()) == got


def test_saved_llama_cpp_answer_equals_anitas(smollm2, smollm2_tokenizer):
    """The same check without llama.cpp, against its answer saved by
    `ANITA_WRITE_FIXTURES=1 python -m pytest tests/export -k llama_cpp` where it is built."""
    ids = smollm2_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    check_against_llama_cpp(json.loads(LLAMA_CPP_FIXTURE.read_text()), smollm2, smollm2_tokenizer, ids)
