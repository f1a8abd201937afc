"""batch_size="auto" / "auto:N" (anita.eval.batch_size) and its use by the harness model: the values
accepted and refused, the halving search, the CPU memory estimate, and answers that do not depend
on the batch size (the saved harness requests answered at batch 1, auto and auto:3 alike)."""

import json
import math

import pytest
import torch

from anita.errors import AnitaError
from anita.eval import batch_size as bs
from anita.eval.harness import HarnessRequests, generation_stop_ids
from anita.lora import load_for_inference
from tests.conftest import tiny_config, tiny_model
from tests.eval.harness_oracle import FIXTURE
from tests.eval.tiny import save_tiny


@pytest.mark.parametrize("value, want", [(8, (8, None)), ("8", (8, None)), ("auto", (None, 1)),
                                         ("auto:4", (None, 4)), (" auto:2 ", (None, 2))])
def test_batch_size_values(value, want):
    assert bs.parse_batch_size(value) == want


@pytest.mark.parametrize("value, message", [(v, r"must be a whole number >= 1, auto or auto:N")
                                            for v in ["foo", "auto:x", "auto:0", "auto:", "8.5", True, None]]
                         + [("0", "must be at least 1, got 0"), ("-1", "must be at least 1, got -1")])
def test_bad_batch_size_is_one_line_naming_the_flag(value, message):
    with pytest.raises(AnitaError, match=rf"^--batch-size {message}") as e:
        bs.parse_batch_size(value, "--batch-size")
    assert "\n" not in str(e.value)


def test_largest_batch_halves_from_the_maximum():
    tried = []

    def fits(rows):
        tried.append(rows)
        return rows <= 20

    assert bs.largest_batch(fits, 64) == 16 and tried == [64, 32, 16]
    assert bs.largest_batch(lambda rows: False, 48) == 1
    assert bs.largest_batch(lambda rows: True, 48) == 48


def test_cpu_estimate_counts_activations_scores_and_cache():
    """The tiny config (D 64, I 128, H 4, K 2, E 16, L 2), 3 rows of 10 tokens in fp32: per token
    6·64 + 3·128 + 4·10 + 2·2·2·16 = 384 + 384 + 40 + 128 = 936 values, × 30 tokens × 4 bytes."""
    config = tiny_config()
    assert bs.estimated_bytes(config, 3, 10, torch.float32) == 936 * 30 * 4
    assert bs.estimated_bytes(config, 3, 10, torch.bfloat16) == 936 * 30 * 2


def test_auto_on_cpu_takes_the_largest_batch_within_half_the_available_memory(monkeypatch):
    model = tiny_model()
    need = bs.estimated_bytes(model.config, 8, 100, model.dtype)
    monkeypatch.setattr(bs, "available_memory", lambda: 2 * need)  # 8 rows fit in half of it, 16 do not
    assert bs.auto_batch_size(model, 100, 64) == 8
    monkeypatch.setattr(bs, "available_memory", lambda: 10**15)
    assert bs.auto_batch_size(model, 100, 64) == 64  # the maximum, when everything fits


def test_the_cuda_try_retries_smaller_on_out_of_memory(monkeypatch):
    """The CUDA path's try, run here on the CPU model with the scoring forward failing above 8 rows
    as a GPU out of memory fails (tests/test_cuda.py tries it on a GPU)."""
    tried = []

    def forward(model, pairs, greedy=False):
        tried.append(len(pairs))
        if len(pairs) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return []

    monkeypatch.setattr(bs, "score_pairs", forward)
    model = tiny_model()
    assert bs.largest_batch(lambda rows: bs.cuda_fits(model, rows, 16), 64) == 8 and tried == [64, 32, 16, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = save_tiny(tmp_path_factory.mktemp("batch-tiny"))
    model, tokenizer = load_for_inference(model_dir)
    return model, tokenizer, generation_stop_ids(model_dir, model.config)


def answers(tiny, batch_size) -> tuple[dict, dict]:
    """The saved tiny harness requests (all four request kinds) answered at `batch_size`."""
    saved = json.loads(FIXTURE.read_text())["tiny"]["arguments"]
    flat = {task: [tuple(a) for doc in docs for a in doc] for task, docs in saved.items()}
    requests = HarnessRequests(*tiny, batch_size=batch_size, max_length=32, max_batch_size=16)
    got = {"mc": requests.loglikelihood(flat["anita_mc_it"] + flat["anita_cloze_it"]),
           "ppl": requests.loglikelihood_rolling([a[0] for a in flat["anita_ppl_it"]]),
           "gen": requests.generate_until(flat["anita_gen_it"])}
    return got, requests.batch_sizes


def test_answers_do_not_depend_on_the_batch_size(tiny):
    one, found = answers(tiny, 1)
    assert found == {}  # a given number is used as is
    for batch_size in ("auto", "auto:3", 3):
        got, found = answers(tiny, batch_size)
        assert got["gen"] == one["gen"]
        for (g, g_greedy), (w, w_greedy) in zip(got["mc"], one["mc"], strict=True):
            assert math.isclose(g, w, rel_tol=1e-5) and g_greedy == w_greedy
        for g, w in zip(got["ppl"], one["ppl"], strict=True):
            assert math.isclose(g, w, rel_tol=1e-5)
        if batch_size == "auto:3":
            assert sorted(found) == ["generate_until", "loglikelihood 0", "loglikelihood 1", "loglikelihood 2",
                                     "loglikelihood_rolling"]
            assert all(size == 16 for size in found.values())  # the tiny model fits the maximum


def test_auto_parts_are_longest_first_and_keep_a_context_together(tiny):
    requests = HarnessRequests(*tiny, batch_size="auto:2")
    a, b, c = [1, 2, 3, 4, 5], [1, 2], [7, 8, 9]
    pairs = [(b, [1]), (a, [1]), (c, [1]), (a, [2, 3]), (b, [4, 5, 6, 7, 8]), (c, [2])]
    # Longest request per context: b 2 + 5, a 5 + 2 (a tie: first seen first), c 3 + 1; parts of 3.
    assert requests.parts(pairs) == [[0, 4, 1, 3], [2, 5]]
    assert HarnessRequests(*tiny, batch_size="auto").parts(pairs) == [list(range(6))]
