"""Generation: greedy equals transformers, batches with left padding, sampling rules, streaming."""

import subprocess
import sys

import pytest
import torch

from anita.cli import main
from anita.errors import AnitaError
from anita.model import generate, sample_next, stream_generate
from tests.conftest import tiny_model


def test_greedy_equals_transformers_on_real_checkpoint(smollm2, smollm2_dir, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Scrivi una frase sulla pizza napoletana."}], add_generation_prompt=True)
    ours = generate(smollm2, prompt, max_new_tokens=32, stop_ids=smollm2_tokenizer.stop_ids)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(theirs) if t in smollm2_tokenizer.stop_ids), len(theirs))
    assert ours == theirs[:stop]


def test_left_padded_batch_equals_one_by_one():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batch = generate(model, prompts, max_new_tokens=8)
    assert batch == [generate(model, p, max_new_tokens=8) for p in prompts]


def test_stop_ids_end_each_sequence_independently():
    model = tiny_model()
    free = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6)
    stop = free[0][2]  # the third token of the first answer becomes a stop token
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, stop_ids=[stop])
    assert out[0] == free[0][:2]
    cut = free[1].index(stop) if stop in free[1] else 6
    assert out[1] == free[1][:cut]


def test_streaming_yields_tokens_in_order():
    model = tiny_model()
    seen = []
    out = generate(model, [1, 2, 3], max_new_tokens=5, on_token=lambda i, t: seen.append((i, t)))
    assert seen == [(0, t) for t in out] and len(out) == 5
    steps = list(stream_generate(model, [[1, 2, 3]], max_new_tokens=5))
    assert [s[0] for s in steps] == out


def test_sampling_rules_by_hand():
    """probs ∝ exp(logits) = [0.5, 0.3, 0.15, 0.05]: top-k=1 and top-p=0.4 leave only token 0;
    top-p=0.7 keeps {0, 1} (0.5 < 0.7 ≤ 0.8); temperature 0 is argmax."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 0
    assert all(sample_next(logits, 1.0, top_k=1, generator=gen).item() == 0 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.4, generator=gen).item() == 0 for _ in range(20))
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=gen).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, generator=gen).item() for _ in range(400)}
    assert draws == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    a = generate(model, [1, 2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    b = generate(model, [1, 2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    assert a == b


def test_cli_generate_streams_a_chat_answer(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "anita.cli", "generate", "--model", str(smollm2_dir), "--chat",
                          "--prompt", "What is the capital of France?", "--max-new-tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0.9"], "--top-p: only when sampling; --temperature 0.0 is greedy"),
    (["--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p: only when sampling"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got '0'"),
])
def test_cli_refuses_flags_greedy_decoding_would_ignore(flags, message, capsys):
    """Refused before any model is loaded (the model path does not even exist)."""
    assert main(["generate", "--model", "/nonexistent", "--prompt", "Ciao", *flags]) == 2
    assert message in capsys.readouterr().err


# issue 18: each of these sampled something other than asked (top_p 0 is greedy, a negative top_k
# or temperature silently meant "off"), or printed nothing after minutes (a prompt past the context).
@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be a finite number in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=2.0), r"top_p must be a finite number in \(0, 1\], got 2.0"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be a finite number in \(0, 1\], got nan"),
    (dict(temperature=1.0, top_k=-3), "top_k must be an integer >= 1, got -3"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 1, got -1"),
])
def test_generate_refuses_sampling_settings_before_any_forward_pass(kwargs, message):
    with pytest.raises(AnitaError, match=f"generate: {message}"):
        generate(tiny_model(), [1, 2, 3], **kwargs)
    if "max_new_tokens" not in kwargs:
        with pytest.raises(AnitaError, match=f"generate: {message}"):
            sample_next(torch.zeros(1, 8), **kwargs)


def test_a_prompt_that_fills_the_context_is_refused_and_generation_stops_at_its_end():
    model = tiny_model()  # max_position_embeddings 512
    with pytest.raises(AnitaError, match="the prompt is 512 tokens, but the model's context .max_position_embed"
                                         "dings. is 512; shorten it to at most 511 tokens"):
        generate(model, [5] * 512, max_new_tokens=4)
    assert len(generate(model, [5] * 509, max_new_tokens=10)) == 3  # positions 509, 510, 511: the last three
    assert len(generate(model, [[5] * 509, [6] * 3], max_new_tokens=10)[1]) == 3  # the longest prompt decides
