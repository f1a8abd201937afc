"""The transformers-computed log-likelihoods the MC tests compare against, and the script that
regenerates them:

    python tests/eval/make_fixtures.py

`hf_choice_loglikelihoods` is an independent, deliberately plain re-statement of
lm-evaluation-harness's scoring on top of transformers (HFLM: `_encode_pair`, then one full
forward of context + continuation[:-1] per choice, no cache, no batching). Needs transformers
(test-only); the saved fixture keeps the check alive where it is absent.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HERE = Path(__file__).parent / "fixtures"
SAMPLE = HERE / "mc_sample.jsonl"
FIXTURE = HERE / "hf_mc.json"
SHOTS = {"tiny": 1, "smollm2": 1}  # few-shot examples per question in the compared contexts
QUESTIONS = {"tiny": None, "smollm2": 3}  # how many of the sample's questions (None: all)


def hf_encode_pair(tok, context: str, continuation: str):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    context_enc = tok.encode(context, add_special_tokens=False)
    return context_enc, whole[len(context_enc):]


@torch.no_grad()
def hf_loglikelihood(model, tok, context: str, continuation: str) -> float:
    context_enc, continuation_enc = hf_encode_pair(tok, context, continuation)
    inp = torch.tensor([(context_enc + continuation_enc)[:-1]])
    logprobs = torch.log_softmax(model(inp).logits.float(), dim=-1)[0]  # (T, V)
    scored = logprobs[len(context_enc) - 1:]  # the positions that predict the continuation
    return sum(scored[i, t].item() for i, t in enumerate(continuation_enc))


def hf_choice_loglikelihoods(model, tok, questions, contexts):
    return [[hf_loglikelihood(model, tok, c, choice) for choice in q.choices] for q, c in zip(questions, contexts)]


def hf_load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def sample_contexts(model: str):
    """The sample's questions and their few-shot contexts as compared for `model` (tiny or smollm2)."""
    from anita.eval.mc import fewshot_contexts, read_questions

    questions = read_questions(SAMPLE)
    contexts = fewshot_contexts(questions, SHOTS[model], seed=1234)
    n = QUESTIONS[model]
    return questions[:n], contexts[:n]


def main():
    from anita.assets import smollm2_dir
    from tests.eval.tiny import save_tiny

    out = {}
    with tempfile.TemporaryDirectory() as d:
        questions, contexts = sample_contexts("tiny")
        out["tiny"] = hf_choice_loglikelihoods(*hf_load(save_tiny(Path(d))), questions, contexts)
    questions, contexts = sample_contexts("smollm2")
    out["smollm2"] = hf_choice_loglikelihoods(*hf_load(smollm2_dir()), questions, contexts)
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
