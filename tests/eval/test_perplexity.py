"""Perplexity with a strided window: hand-checkable windows, a uniform model, and the Hugging Face
guide's sliding-window loop written out independently."""

import json
import math

import pytest
import torch

from anita.errors import AnitaError
from anita.eval.perplexity import evaluate_perplexity, read_texts, windows
from tests.eval.tiny import VOCAB_SIZE, tiny_mc_model, tiny_tokenizer

TEXT = "La casa è rossa. Roma sa di sole e di sale; il sasso cade in mare."


def test_windows_score_every_token_once():
    """10 tokens, window 4, stride 2: windows read [0,4) [2,6) [4,8) [6,10) and score [1,4) [4,6)
    [6,8) [8,10) — tokens 1..9 once each, every later one after window − stride = 2 tokens."""
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert windows(3, 8, 4) == [(0, 3, 1)]
    assert windows(1, 8, 4) == []


def test_uniform_model_has_perplexity_v():
    """Output head zeroed: every token has p = 1/V, so perplexity is exactly V and bits per byte
    is tokens · log2 V / bytes."""
    model, tok = tiny_mc_model(), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    out = evaluate_perplexity(model, tok, [TEXT], window=24, stride=7)
    assert out["perplexity"] == pytest.approx(VOCAB_SIZE, rel=1e-4)
    assert out["tokens"] == len(tok.encode(TEXT, add_special_tokens=False))
    assert out["bits_per_byte"] == pytest.approx(out["tokens"] * math.log2(VOCAB_SIZE) / len(TEXT.encode()), rel=1e-4)


def hf_guide_nll(model, ids, max_length, stride):
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide: window [begin, end),
    only the last end − prev_end tokens labelled, mean loss × labelled count."""
    nll, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(window).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += loss.item()
        prev_end = end
        if end == len(ids):
            break
    return nll


@pytest.mark.parametrize("window, stride", [(512, 256), (16, 8), (16, 15), (9, 3)])
def test_matches_the_hf_guide_loop(window, stride):
    model, tok = tiny_mc_model(), tiny_tokenizer()
    ids = [tok.bos_id] + tok.encode(TEXT, add_special_tokens=False)
    out = evaluate_perplexity(model, tok, [TEXT], window=window, stride=stride)
    assert out["nll_per_token"] * out["tokens"] == pytest.approx(hf_guide_nll(model, ids, window, stride), rel=1e-5)


def test_documents_are_scored_apart_and_token_weighted(tmp_path):
    model, tok = tiny_mc_model(), tiny_tokenizer()
    docs = ["Roma sa di sole.", TEXT]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert read_texts(path) == docs
    both = evaluate_perplexity(model, tok, docs, window=32, stride=16)
    parts = [evaluate_perplexity(model, tok, [d], window=32, stride=16) for d in docs]
    nll = sum(p["nll_per_token"] * p["tokens"] for p in parts)
    assert both["tokens"] == sum(p["tokens"] for p in parts) and both["documents"] == 2
    assert both["perplexity"] == pytest.approx(math.exp(nll / both["tokens"]), rel=1e-6)


def test_bad_input(tmp_path):
    model, tok = tiny_mc_model(max_position_embeddings=64), tiny_tokenizer()
    with pytest.raises(AnitaError, match="window must be between 2 and the model's 64"):
        evaluate_perplexity(model, tok, [TEXT], window=65)
    with pytest.raises(AnitaError, match="stride must be .* smaller than the window"):
        evaluate_perplexity(model, tok, [TEXT], window=16, stride=16)
    with pytest.raises(AnitaError, match="no tokens"):
        evaluate_perplexity(model, tok, [""])
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"testo": "no"}\n')
    with pytest.raises(AnitaError, match=r"docs.jsonl:2: expected an object with a string \"text\""):
        read_texts(path)
    text = tmp_path / "pagina.txt"
    text.write_text('{"text": "a plain text file is one document"}\n\nsecond line\n')
    assert read_texts(text) == [text.read_text()]


def test_harness_windows_by_hand():
    """max_length 4 over BOS + 10 tokens (11 ids): the harness reads BOS 0 1 2 and predicts tokens
    0-3 (ids 1-4), then reads 3 4 5 6 predicting ids 5-8, then — sliding back to a full window —
    5 6 7 8 predicting only ids 9-10 (lm-eval `LM.loglikelihood_rolling`'s docstring example)."""
    from anita.eval.perplexity import harness_windows, window_requests

    assert harness_windows(11, 4) == [(0, 5, 1), (4, 9, 5), (6, 11, 9)]
    ids = list(range(100, 111))
    assert window_requests(ids, harness_windows(11, 4)) == [([100], [101, 102, 103, 104]),
                                                            ([104], [105, 106, 107, 108]),
                                                            ([106, 107, 108], [109, 110])]


@pytest.mark.parametrize("n_tokens, max_length", [(1, 4), (4, 4), (5, 4), (10, 4), (23, 7), (64, 16)])
def test_harness_windows_match_lm_eval(n_tokens, max_length):
    """The same (context, continuation) pairs as lm-eval's get_rolling_token_windows +
    make_disjoint_window (context_len 1), read by the model as (context + continuation)[:-1]."""
    utils = pytest.importorskip("lm_eval.utils")
    from anita.eval.perplexity import harness_windows, window_requests

    tokens = list(range(1000, 1000 + n_tokens))
    want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=7, max_seq_len=max_length, context_len=1)]
    got = window_requests([7] + tokens, harness_windows(n_tokens + 1, max_length))
    assert [(list(c), list(t)) for c, t in want] == got
    assert all(len(c) + len(t) - 1 <= max_length for c, t in got)
