"""lm-evaluation-harness runs on the local test tasks (tests/eval/tasks/), with its own `hf` model
(transformers, + PEFT for an adapter) or with anita's `AnitaLM`, and what is compared of them:

- `metrics`: every number of the harness's results table per task (acc, acc_norm, acc_bytes and
  their stderrs; word/byte perplexity, bits per byte; exact match; perplexity and acc of a
  loglikelihood task);
- `answers`: per request, its arguments (context and continuation, document, or prompt and
  generation settings) and the model's raw answer (log-likelihood and is_greedy, a document's
  log-likelihood, the generated text), as the harness logged them.

The saved fixture (tests/eval/fixtures/harness_hf.json, `make_fixtures.py`) holds both from the
`hf` model, so anita's answers to the same requests are checked without lm-eval or transformers.

`CHAT_CASES` run the tasks as chat prompts (lm-eval's apply_chat_template, fewshot_as_multiturn,
system_instruction) on chat checkpoints (tests/eval/tiny.py); their fixture
(fixtures/harness_chat_hf.json) also holds `chats`: every chat the harness asked the `hf` model to
render, with add_generation_prompt and the string it got back.
"""

import json
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from anita.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from anita.model import from_pretrained

TASKS_DIR = Path(__file__).parent / "tasks"
FIXTURE = Path(__file__).parent / "fixtures" / "harness_hf.json"
CHAT_FIXTURE = Path(__file__).parent / "fixtures" / "harness_chat_hf.json"
TASKS = ["anita_mc_it", "anita_ppl_it", "anita_gen_it", "anita_cloze_it"]
# One harness run per case: the checkpoint, the model arguments both sides get, few-shot and limit.
# The tiny model reads 32 tokens at most, so contexts are cut from the left, documents span several
# rolling windows and generation prompts are truncated; SmolLM2 runs as shipped (8192 positions),
# but for the perplexity task at 24, to cross windows on the real model too.
CASES = {
    "tiny": dict(checkpoint="tiny", tasks=TASKS, model_args={"max_length": 32}, num_fewshot=1, limit=None),
    "smollm2": dict(checkpoint="smollm2", tasks=["anita_mc_it", "anita_gen_it", "anita_cloze_it"], model_args={},
                    num_fewshot=1, limit=3),
    "smollm2-windows": dict(checkpoint="smollm2", tasks=["anita_ppl_it"], model_args={"max_length": 24},
                            num_fewshot=None, limit=3),
    "smollm2-adapter": dict(checkpoint="smollm2", adapter=True, tasks=["anita_mc_it", "anita_gen_it"],
                            model_args={}, num_fewshot=0, limit=3),
}


SYSTEM = "Sei un assistente esperto. Rispondi in italiano."
# Chat runs: the Llama 3 vocabulary with Meta's template (BOS written by the template, so the harness
# adds none), and the tiny tokenizer with a ChatML-like template (no BOS in it: the tokenizer adds
# it); multi-turn and single-turn few-shot, with and without a system message, and a system
# instruction without a chat template (plain text before the prompt).
CHAT_CASES = {
    "llama3-multiturn": {"checkpoint": "llama3", "tasks": ["anita_mc_it", "anita_gen_it"], "model_args": {},
                         "num_fewshot": 2, "limit": 3,
                         "chat": {"apply_chat_template": True, "fewshot_as_multiturn": True,
                                  "system_instruction": SYSTEM}},
    "llama3-singleturn": {"checkpoint": "llama3", "tasks": ["anita_mc_it", "anita_gen_it"], "model_args": {},
                          "num_fewshot": 1, "limit": 3,
                          "chat": {"apply_chat_template": True, "fewshot_as_multiturn": False}},
    "tiny-chatml": {"checkpoint": "tiny-chat", "tasks": ["anita_mc_it", "anita_gen_it", "anita_cloze_it"],
                    "model_args": {"max_length": 64}, "num_fewshot": 1, "limit": 3,
                    "chat": {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": SYSTEM}},
    "llama3-plain-system": {"checkpoint": "llama3", "tasks": ["anita_mc_it", "anita_gen_it"], "model_args": {},
                            "num_fewshot": 1, "limit": 2, "chat": {"system_instruction": SYSTEM + "\n\n"}},
}


def make_adapter(model_dir, out_dir, seed: int = 0):
    """A PEFT-format LoRA adapter on every linear of the model, with B ≠ 0 so it changes the scores."""
    model = from_pretrained(model_dir)
    torch.manual_seed(seed)
    apply_lora(model, LoraConfig(r=4, alpha=8.0, target_modules="all-linear"))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    save_adapter(model, out_dir)
    return out_dir


def model_args(kind: str, model_dir, adapter_dir, extra: dict) -> dict:
    """The same checkpoint for both sides: `hf` takes the adapter as `peft=`, anita as `adapter=`."""
    args = {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu", **extra}
    if adapter_dir is not None:
        args["peft" if kind == "hf" else "adapter"] = str(adapter_dir)
    return args


def run(kind: str, model_dir, case: dict, adapter_dir=None, batch_size: int | str = 4) -> dict:
    """simple_evaluate with model "hf" or "anita" on the case's tasks (and chat settings); returns
    {metrics, arguments, responses}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import anita.eval.harness  # noqa: F401  registers "anita"

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(model=kind, model_args=model_args(kind, model_dir, adapter_dir,
                                                                        case["model_args"]),
                                      tasks=case["tasks"], task_manager=manager, num_fewshot=case["num_fewshot"],
                                      limit=case["limit"], batch_size=batch_size, log_samples=True,
                                      **case.get("chat", {}))
    return summarise(results)


@contextmanager
def recorded_chats(chats: list):
    """While inside, every chat the `hf` model renders is appended to `chats` as
    [chat_history, add_generation_prompt, rendered string]."""
    from lm_eval.models.huggingface import HFLM

    render = HFLM.apply_chat_template

    def recording(self, chat_history, add_generation_prompt=True):
        text = render(self, chat_history, add_generation_prompt)
        chats.append([json.loads(json.dumps(chat_history)), add_generation_prompt, text])
        return text

    with mock.patch.object(HFLM, "apply_chat_template", recording):
        yield chats


def hf_chat_fixture(tmp) -> dict:
    """Every chat case run by the `hf` model, with the chats it rendered (what make_fixtures.py saves)."""
    out = {}
    for name, case in CHAT_CASES.items():
        chats = []
        with recorded_chats(chats):
            out[name] = run("hf", checkpoint_dir(case["checkpoint"], Path(tmp) / name), case)
        out[name]["chats"] = chats
    return out


def summarise(results: dict) -> dict:
    metrics = {task: {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, row in results["results"].items()}
    answers = {task: [[list(args) for args in s["arguments"]] for s in samples]
               for task, samples in results["samples"].items()}
    responses = {task: [s["resps"] for s in samples] for task, samples in results["samples"].items()}
    return json.loads(json.dumps({"metrics": metrics, "arguments": answers, "responses": responses}))


def checkpoint_dir(name: str, tmp):
    """The checkpoint of a case: a tiny model saved to `tmp` (plain, with a ChatML-like template, or
    over the Llama 3 vocabulary with Meta's template), or the real SmolLM2."""
    from anita.assets import smollm2_dir
    from tests.eval.tiny import TINY_CHAT_TEMPLATE, save_tiny, save_tiny_llama3

    Path(tmp).mkdir(parents=True, exist_ok=True)
    makers = {"tiny": lambda: save_tiny(Path(tmp)), "tiny-chat": lambda: save_tiny(Path(tmp), TINY_CHAT_TEMPLATE),
              "llama3": lambda: save_tiny_llama3(Path(tmp))}
    return makers[name]() if name in makers else smollm2_dir()


def hf_fixture(tmp) -> dict:
    """Every case run by the harness's `hf` model (what make_fixtures.py saves)."""
    out = {}
    for name, case in CASES.items():
        model_dir = checkpoint_dir(case["checkpoint"], Path(tmp) / name)
        adapter = make_adapter(model_dir, Path(tmp) / name / "adapter") if case.get("adapter") else None
        out[name] = run("hf", model_dir, case, adapter)
    return out
