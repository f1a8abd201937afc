"""anita's few-shot contexts and MC scores against lm-evaluation-harness and transformers.

Few-shot contexts are compared with the ones lm-evaluation-harness itself builds
(`make_fixtures.harness_contexts`: the sample as a harness task, seed 1234). The scores'
reference (`make_fixtures.hf_choice_loglikelihoods`) re-states the harness's scoring plainly on
transformers' model and tokenizer (SmolLM2 through transformers' own GGUF loader): one uncached
forward per choice, on the harness's 1-shot contexts, never anita's. Live comparisons skip
without lm-eval / transformers; the saved fixture (tests/eval/fixtures/hf_mc.json, regenerated
by make_fixtures.py) keeps the same checks running everywhere. Scores: per-choice
log-likelihoods (within 1e-4) and the acc / acc_norm decisions.
"""

import json

import pytest

from anita.eval.mc import choice_loglikelihoods, question_metrics
from tests.eval.make_fixtures import (FEWSHOT, FIXTURE, anita_contexts, harness_contexts, hf_choice_loglikelihoods,
                                      hf_load, sample_contexts)
from tests.eval.tiny import save_tiny, tiny_mc_model, tiny_tokenizer

TOL = 1e-4
FEWSHOT_SETTINGS = list(FEWSHOT)


def assert_same_scores(got, want, questions):
    assert len(got) == len(want) == len(questions)
    for q, g, w in zip(questions, got, want):
        assert g == pytest.approx(w, abs=TOL), q.where
        assert question_metrics(g, q) == question_metrics(w, q), q.where


@pytest.fixture(scope="module")
def tiny_scores():
    questions, contexts = sample_contexts("tiny")
    return questions, contexts, choice_loglikelihoods(tiny_mc_model(), tiny_tokenizer(), questions, contexts,
                                                      batch_size=2)


@pytest.fixture(scope="module")
def smollm2_scores(smollm2, smollm2_tokenizer):
    questions, contexts = sample_contexts("smollm2")
    return questions, contexts, choice_loglikelihoods(smollm2, smollm2_tokenizer, questions, contexts, batch_size=4)


@pytest.mark.parametrize("name", FEWSHOT_SETTINGS)
def test_fewshot_contexts_match_saved_harness_contexts(name):
    """anita's `fewshot_contexts` (seed 1234) equal, string for string, the contexts
    lm-evaluation-harness built for the same questions, K and pool (saved in hf_mc.json)."""
    saved = json.loads(FIXTURE.read_text())["fewshot"][name]
    assert {key: saved[key] for key in FEWSHOT[name]} == FEWSHOT[name]
    assert len(saved["contexts"]) == FEWSHOT[name]["questions"][1] - FEWSHOT[name]["questions"][0]
    assert anita_contexts(name) == saved["contexts"]


@pytest.mark.parametrize("name", FEWSHOT_SETTINGS)
def test_fewshot_contexts_match_live_harness(name):
    """The same against lm-evaluation-harness run now (skips without lm-eval)."""
    pytest.importorskip("lm_eval")
    assert anita_contexts(name) == harness_contexts(**FEWSHOT[name])


def test_tiny_matches_live_transformers(tiny_scores, tmp_path):
    pytest.importorskip("transformers")
    questions, contexts, got = tiny_scores
    want = hf_choice_loglikelihoods(*hf_load(save_tiny(tmp_path)), questions, contexts)
    assert_same_scores(got, want, questions)


def test_tiny_matches_saved_transformers_scores(tiny_scores):
    questions, _, got = tiny_scores
    assert_same_scores(got, json.loads(FIXTURE.read_text())["tiny"], questions)


@pytest.mark.slow
def test_smollm2_matches_live_transformers(smollm2_scores, transformers_smollm2):
    """anita's converted SmolLM2 against transformers' GGUF-loaded one on the same file."""
    questions, contexts, got = smollm2_scores
    assert_same_scores(got, hf_choice_loglikelihoods(*transformers_smollm2, questions, contexts), questions)


@pytest.mark.slow
def test_smollm2_matches_saved_transformers_scores(smollm2_scores):
    questions, _, got = smollm2_scores
    assert_same_scores(got, json.loads(FIXTURE.read_text())["smollm2"], questions)
