"""Multiple-choice scoring on hand-checkable cases: the harness's whitespace rule, byte-length
normalisation, multi-token choices, few-shot formatting and sampling, batching, truncation."""

import json
import math
import random

import pytest
import torch

from anita.errors import AnitaError
from anita.eval.mc import (Question, aggregate, choice_loglikelihoods, encode_pair, evaluate_mc, fewshot_contexts,
                           mean_stderr, question_metrics, read_questions)
from tests.eval.make_fixtures import SAMPLE
from tests.eval.tiny import VOCAB_SIZE, tiny_mc_model, tiny_tokenizer


def direct_loglikelihood(model, context_ids, continuation_ids):
    """Σ log p over the continuation from one plain forward of the whole sequence (no cache)."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).float().log_softmax(-1)[0]  # (T, V)
    return sum(logprobs[len(context_ids) + i - 1, t].item() for i, t in enumerate(continuation_ids))


# ------------------------------------------------------------------------------ tokenizing
def test_trailing_whitespace_moves_to_the_continuation():
    """"Q: " + "casa" is scored as "Q:" + " casa": the continuation is [Ġca, sa], cut from the
    tokenization of "Q: casa", not [c, a, sa] (casa alone) after a lone [Ġ] (what encoding the two
    strings apart gives)."""
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Q: ", "casa")
    assert ctx == tok.encode("Q:", add_special_tokens=False)
    assert cont == tok.encode(" casa", add_special_tokens=False)
    assert [tok.decode([t]) for t in cont] == [" ca", "sa"]
    assert ctx + cont != tok.encode("Q: ", add_special_tokens=False) + tok.encode("casa", add_special_tokens=False)


def test_continuation_is_cut_from_the_whole_tokenization():
    """With no trailing space, the continuation ids are encode(ctx + cont)[len(encode(ctx)):]."""
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Q:", " casa")
    whole = tok.encode("Q: casa", add_special_tokens=False)
    assert ctx == whole[:2] and cont == whole[2:] and len(cont) == 2


def test_special_tokens_only_when_asked():
    """Off by default (harness add_bos_token=False); on, the context starts with <s> and the
    continuation is unchanged."""
    tok = tiny_tokenizer()
    plain = encode_pair(tok, "Q:", " casa")
    with_bos = encode_pair(tok, "Q:", " casa", add_special_tokens=True)
    assert plain[0][0] != tok.bos_id
    assert with_bos == ([tok.bos_id] + plain[0], plain[1])


def test_empty_context_is_bos():
    model, tok = tiny_mc_model(), tiny_tokenizer()
    q = Question("", (" casa", "z"), 0)
    ctx, cont = encode_pair(tok, "", " casa")
    assert ctx == [tok.bos_id] and cont == tok.encode(" casa", add_special_tokens=False)
    [lls] = choice_loglikelihoods(model, tok, [q], [""])
    assert lls[0] == pytest.approx(direct_loglikelihood(model, ctx, cont), abs=1e-5)


# ---------------------------------------------------------------------------------- scores
def test_uniform_model_hand_derived_scores():
    """With the output head zeroed every token has log p = −ln V. " casa" is 2 tokens and 5 bytes,
    "z" 1 token and 1 byte: sums −2 ln V and −ln V, so acc picks "z" (wrong), while per character
    (= per byte here) −0.4 ln V beats −ln V and acc_norm and acc_bytes pick " casa" (right)."""
    model, tok = tiny_mc_model(), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    q = Question("Q:", (" casa", "z"), 0)
    [lls] = choice_loglikelihoods(model, tok, [q], [q.context])
    assert lls == pytest.approx([-2 * math.log(VOCAB_SIZE), -math.log(VOCAB_SIZE)], abs=1e-4)
    assert question_metrics(lls, q) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}


def test_byte_and_character_normalisation_disagree_on_accents():
    """" è" is 2 characters but 3 UTF-8 bytes, " ab" 3 of each. lls −1.0 and −1.4: per byte
    −0.333 > −0.467 (choice 0), per character −0.5 < −0.467 (choice 1); raw sums pick 0. The
    harness's names: acc_norm is per character (right here), acc_bytes per byte (wrong)."""
    q = Question("x", (" è", " ab"), 1)
    assert question_metrics([-1.0, -1.4], q) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0}


def test_ties_go_to_the_first_choice():
    assert question_metrics([-2.0, -2.0], Question("x", (" a", " b"), 0))["acc"] == 1.0


def test_multi_token_choices_sum_every_token():
    """The cached, batched score of each choice equals the sum of its tokens' log-probs read off
    one plain forward of context + choice."""
    model, tok = tiny_mc_model(), tiny_tokenizer()
    q = Question("Domanda: la casa è", (" rossa e grande.", " sa", " casa casa casa"), 0)
    [lls] = choice_loglikelihoods(model, tok, [q], [q.context], batch_size=3)
    for choice, ll in zip(q.choices, lls):
        ctx, cont = encode_pair(tok, q.context, choice)
        assert len(cont) >= 2
        assert ll == pytest.approx(direct_loglikelihood(model, ctx, cont), abs=1e-4)


def test_batched_equals_unbatched():
    model, tok = tiny_mc_model(), tiny_tokenizer()
    questions = read_questions(SAMPLE)[:3]
    contexts = fewshot_contexts(questions, 1)
    one = choice_loglikelihoods(model, tok, questions, contexts, batch_size=1)
    for batch_size in (2, 16):
        many = choice_loglikelihoods(model, tok, questions, contexts, batch_size=batch_size)
        for a, b in zip(one, many):
            assert a == pytest.approx(b, abs=1e-5)


def test_long_pairs_are_cut_from_the_left_as_the_harness_does():
    """max_position_embeddings 16: the model reads (ctx + cont)[-17:][:-1] and scores the last
    len(cont) positions."""
    model, tok = tiny_mc_model(max_position_embeddings=16), tiny_tokenizer()
    q = Question("Una frase lunga, molto più lunga di sedici token:", (" casa", " sa"), 0)
    [lls] = choice_loglikelihoods(model, tok, [q], [q.context])
    for choice, ll in zip(q.choices, lls):
        ctx, cont = encode_pair(tok, q.context, choice)
        kept = (ctx + cont)[-17:]
        assert len(ctx + cont) > 17
        assert ll == pytest.approx(direct_loglikelihood(model, kept[:-len(cont)], cont), abs=1e-4)


def test_mean_stderr_by_hand():
    """[1, 0, 1, 1]: mean 0.75, sample std √((3·0.25² + 0.75²)/3) = 0.5, stderr 0.5/√4 = 0.25."""
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)
    assert mean_stderr([1.0]) is None
    out = aggregate([{"acc": a, "acc_norm": 1.0, "acc_bytes": 0.0} for a in (1.0, 0.0, 1.0, 1.0)])
    assert out["acc"] == 0.75 and out["acc_stderr"] == pytest.approx(0.25)
    assert out["acc_norm_stderr"] == 0.0 and out["n"] == 4


def test_evaluate_mc_limit_and_metrics():
    model, tok = tiny_mc_model(), tiny_tokenizer()
    questions = read_questions(SAMPLE)
    out = evaluate_mc(model, tok, questions, limit=3)
    lls = choice_loglikelihoods(model, tok, questions[:3], [q.context for q in questions[:3]])
    want = aggregate([question_metrics(ll, q) for ll, q in zip(lls, questions)])
    assert out == {**want, "num_fewshot": 0} and out["n"] == 3


# -------------------------------------------------------------------------------- few-shot
POOL = [Question(f"Domanda {i}:", (f" sì {i}", f" no {i}"), i % 2) for i in range(10)]


def test_fewshot_format_exact_string():
    pool = [Question("Capitale della Francia:", (" Lione", " Parigi"), 1)]
    q = Question("Capitale d'Italia:", (" Roma", " Milano"), 0)
    assert fewshot_contexts([q], 1, seed=0, pool=pool) == ["Capitale della Francia: Parigi\n\nCapitale d'Italia:"]
    assert fewshot_contexts([q], 0) == ["Capitale d'Italia:"]


def test_fewshot_sampling_follows_the_harness_rng():
    """One random.Random(seed) for the run, rng.sample(pool, K) per question in order (sampling
    positions of a list, the same for any list of that size)."""
    questions = [Question("A:", (" x", " y"), 0), Question("B:", (" x", " y"), 1)]
    rng = random.Random(1234)
    want = []
    for q in questions:
        shots = [POOL[i] for i in rng.sample(range(len(POOL)), 3)]
        want.append("".join(f"{s.context}{s.choices[s.gold]}\n\n" for s in shots) + q.context)
    got = fewshot_contexts(questions, 3, seed=1234, pool=POOL)
    assert got == want and got[0] != got[1]
    assert fewshot_contexts(questions, 3, seed=1234, pool=POOL) == got
    assert fewshot_contexts(questions, 3, seed=1, pool=POOL) != got


def test_fewshot_from_the_task_never_uses_the_question_itself():
    """Three questions, 2-shot from the task: 3 are drawn, the question removed, so each gets
    exactly the other two."""
    questions = POOL[:3]
    for q, ctx in zip(questions, fewshot_contexts(questions, 2, seed=7)):
        others = [o for o in questions if o != q]
        assert ctx.endswith("\n\n" + q.context) and f"{q.context}{q.choices[q.gold]}" not in ctx
        assert all(f"{o.context}{o.choices[o.gold]}\n\n" in ctx for o in others)


def test_fewshot_needs_enough_examples():
    with pytest.raises(AnitaError, match="needs at least 3 examples, the task has 2"):
        fewshot_contexts(POOL[:2], 2)
    with pytest.raises(AnitaError, match="few-shot file has 1"):
        fewshot_contexts(POOL[:2], 2, pool=POOL[:1])


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("row, message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"choices": [" a", " b"], "gold": 0}', '"context" must be a string'),
    ('{"context": "x", "choices": " a", "gold": 0}', '"choices" must be a list'),
    ('{"context": "x", "choices": [" a"], "gold": 0}', "at least 2"),
    ('{"context": "x", "choices": [" a", ""], "gold": 0}', "non-empty strings"),
    ('{"context": "x", "choices": [" a", " b"], "gold": 2}', r"index into \"choices\" \(0..1\), got 2"),
    ('{"context": "x", "choices": [" a", " b"], "gold": true}', "got True"),
    ('{"context": "x", "choices": [" a", " b"]}', "got None"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    good = json.dumps({"context": "x", "choices": [" a", " b"], "gold": 0})
    path = tmp_path / "task.jsonl"
    path.write_text(f"{good}\n\n{row}\n")
    with pytest.raises(AnitaError, match=f"task.jsonl:3: .*{message}"):
        read_questions(path)


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b'{"context": "\xe8", "choices": [" a", " b"], "gold": 0}\n')
    with pytest.raises(AnitaError, match="task.jsonl:1: not UTF-8"):
        read_questions(path)
    path.write_text("\n\n")
    with pytest.raises(AnitaError, match="no questions"):
        read_questions(path)


def test_choice_that_adds_no_token_is_an_error():
    """"s" + "a" tokenizes to the single token "sa": nothing is left to score for the choice."""
    model, tok = tiny_mc_model(), tiny_tokenizer()
    q = Question("s", ("a", " casa"), 0, where="t.jsonl:4")
    with pytest.raises(AnitaError, match="t.jsonl:4: choice 0 'a' adds no token"):
        choice_loglikelihoods(model, tok, [q], [q.context])


def test_padded_pairs_equal_the_shared_context_path():
    """scoring.py's two paths give the same log-likelihoods and is_greedy flags: each pair as a row
    of a right-padded batch, and the pairs of one context against its KV cache."""
    from anita.eval.scoring import score_continuations, score_pairs

    model, tok = tiny_mc_model(), tiny_tokenizer()
    context = tok.encode("Domanda: la casa è", add_special_tokens=False)
    continuations = [tok.encode(c, add_special_tokens=False) for c in (" rossa e grande.", " sa", " casa casa")]
    plain = score_pairs(model, [(context, c) for c in continuations], greedy=True)
    shared = score_continuations(model, context, continuations, batch_size=2, greedy=True)
    for p, s in zip(plain, shared):
        assert p.logprob == pytest.approx(s.logprob, abs=1e-5) and p.greedy == s.greedy
    greedy = [int(model(torch.tensor([context])).argmax(-1)[0, -1])]  # the model's own next token
    [hit] = score_pairs(model, [(context, greedy)], greedy=True)
    assert hit.greedy is True and not all(s.greedy for s in plain)
