"""The independent references the MC tests compare against, and the script that regenerates them:

    pip install lm-eval transformers   # test-only oracles, never imported by anita
    python tests/eval/make_fixtures.py

- Few-shot contexts come from lm-evaluation-harness itself (`harness_contexts`): the sample as a
  harness `ConfigurableTask` (doc_to_text = context, target_delimiter "" because each choice
  carries its own leading space, fewshot_delimiter "\\n\\n"), the evaluator's fewshot seed, and the
  contexts of the requests `build_all_requests` makes. They are saved, so anita's
  `fewshot_contexts` is checked against them and the log-likelihoods below never use anita's.
- `hf_choice_loglikelihoods` is an independent, deliberately plain re-statement of the harness's
  scoring on top of transformers (HFLM: `_encode_pair`, then one full forward of context +
  continuation[:-1] per choice, no cache, no batching), run on the harness contexts: for the
  tiny model (saved by anita, read by transformers) and for SmolLM2 as transformers' own GGUF
  loader reads it (never anita's conversion).

The saved fixture keeps all of it checked where lm-eval and transformers are absent.

`python tests/eval/make_fixtures.py harness` (re)writes only tests/eval/fixtures/harness_hf.json:
the local harness tasks run by lm-eval's own `hf` model (`harness_oracle.hf_fixture`);
`python tests/eval/make_fixtures.py chat` only fixtures/harness_chat_hf.json: the same tasks as chat
prompts, with the chats the `hf` model rendered (`harness_oracle.hf_chat_fixture`).
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
SEED = 1234  # the harness's default fewshot_random_seed
# Few-shot settings saved from the harness, as anita's `fewshot_contexts(questions, k, pool=...)`
# arguments: K, the questions (a slice of the sample) and the pool. pool None: examples drawn from
# the task's own questions (fewshot_split == test_split: K+1 drawn, the question removed); a slice:
# a separate few-shot split (K drawn, nothing removed), disjoint from the questions or overlapping.
FEWSHOT = {
    "1-shot": dict(k=1, questions=[0, 6], pool=None),
    "3-shot": dict(k=3, questions=[0, 6], pool=None),
    "2-shot-file": dict(k=2, questions=[0, 3], pool=[3, 6]),
    "2-shot-file-overlapping": dict(k=2, questions=[0, 6], pool=[0, 6]),
}
SCORED = "1-shot"  # the contexts the log-likelihoods are computed on
QUESTIONS = {"tiny": None, "smollm2": 3}  # how many of the sample's questions (None: all)


def harness_contexts(k: int, questions: list[int], pool: list[int] | None, seed: int = SEED) -> list[str]:
    """The context of each question's requests, built by lm-evaluation-harness; `questions` and
    `pool` are [start, stop) rows of the sample (pool None: few-shot split = test split)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    sample = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    rows = sample[slice(*questions)]
    splits = {"test": datasets.Dataset.from_list(rows)}
    if pool is not None:
        splits["fewshot"] = datasets.Dataset.from_list(sample[slice(*pool)])
    task = ConfigurableTask(config=dict(
        task="anita_mc_sample", custom_dataset=lambda **_: datasets.DatasetDict(splits),
        test_split="test", fewshot_split="test" if pool is None else "fewshot", output_type="multiple_choice",
        doc_to_text="{{context}}", doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
        target_delimiter="", fewshot_delimiter="\n\n", num_fewshot=k))
    task.set_fewshot_seed(seed=seed)  # what simple_evaluate does with fewshot_random_seed
    task.build_all_requests(rank=0, world_size=1)
    contexts = {}
    for inst in task.instances:  # one request per (question, choice); the context is the same for all choices
        assert inst.arguments[1] == rows[inst.doc_id]["choices"][inst.idx]
        contexts.setdefault(inst.doc_id, inst.arguments[0])
    assert sorted(contexts) == list(range(len(rows)))
    return [contexts[i] for i in range(len(rows))]


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


def hf_load_smollm2():
    """SmolLM2 (model, tokenizer) from transformers' own GGUF loader, not anita's conversion."""
    from tests.model.make_fixtures import hf_gguf_smollm2

    return hf_gguf_smollm2()


def saved_contexts() -> dict[str, list[str]]:
    return {name: saved["contexts"] for name, saved in json.loads(FIXTURE.read_text())["fewshot"].items()}


def anita_contexts(name: str) -> list[str]:
    """anita's `fewshot_contexts` for the setting FEWSHOT[name], the harness seed."""
    from anita.eval.mc import fewshot_contexts, read_questions

    setting, sample = FEWSHOT[name], read_questions(SAMPLE)
    pool = None if setting["pool"] is None else sample[slice(*setting["pool"])]
    return fewshot_contexts(sample[slice(*setting["questions"])], setting["k"], seed=SEED, pool=pool)


def sample_contexts(model: str, contexts: list[str] | None = None):
    """The sample's questions and the harness's saved 1-shot contexts as compared for `model`
    (tiny or smollm2)."""
    from anita.eval.mc import read_questions

    questions = read_questions(SAMPLE)
    contexts = saved_contexts()[SCORED] if contexts is None else contexts
    assert len(contexts) == len(questions)
    n = QUESTIONS[model]
    return questions[:n], contexts[:n]


def main():
    from tests.eval.harness_oracle import CHAT_FIXTURE, hf_chat_fixture, hf_fixture
    from tests.eval.harness_oracle import FIXTURE as HARNESS_FIXTURE
    from tests.eval.tiny import save_tiny

    for name, fixture, make in [("chat", CHAT_FIXTURE, hf_chat_fixture), ("harness", HARNESS_FIXTURE, hf_fixture)]:
        if sys.argv[1:] in ([], [name]):
            with tempfile.TemporaryDirectory() as d:
                fixture.write_text(json.dumps(make(d), indent=1, ensure_ascii=False) + "\n")
    if sys.argv[1:]:
        return

    fewshot = {name: {**setting, "contexts": harness_contexts(**setting)} for name, setting in FEWSHOT.items()}
    contexts = {name: saved["contexts"] for name, saved in fewshot.items()}
    out = {"fewshot": fewshot}
    with tempfile.TemporaryDirectory() as d:
        out["tiny"] = hf_choice_loglikelihoods(*hf_load(save_tiny(Path(d))), *sample_contexts("tiny", contexts[SCORED]))
    out["smollm2"] = hf_choice_loglikelihoods(*hf_load_smollm2(), *sample_contexts("smollm2", contexts[SCORED]))
    FIXTURE.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
