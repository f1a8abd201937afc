"""What both systems share in a benchmark: the workloads, the synthetic batches, the timer, the
memory probe and the FLOP count.

Each (system, benchmark) pair runs in its own fresh process (`run.py` starts them), so one side's
allocations never show up in the other's peak. Inside that process the model is set up first, then
the peak-memory counter is reset (Linux `/proc/self/clear_refs` on CPU, `reset_peak_memory_stats` on
CUDA), then `warmup` untimed steps and `repeats` timed steps run; the median step time is reported.

The FLOP count follows the PaLM paper's convention (Chowdhery et al. 2022, appendix B): a matmul
with a P-parameter weight costs 2·P FLOPs per token forward, attention adds 2·2·T·(H·E) per token
per layer (scores and the weighted sum, without the causal discount). A LoRA step computes no
weight gradients for the frozen base, so its backward is counted as one more forward (input
gradients) — plus the adapters' own weight gradients, which are negligible at r = 16.

Shapes: B batch, T sequence length, V vocab, P prompt length, N new tokens.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from anita.dtypes import parse_dtype
from anita.model.llama import PROJECTIONS
from anita.model.logprobs import DEFAULT_CHUNK_SIZE

LORA_TARGETS = PROJECTIONS  # the seven projections LoRA wraps in the recipe (docs/recipe.md)
BENCHES = ("forward", "decode", "sft", "sft-recipe", "dpo", "dpo-recipe")
SYSTEMS = ("anita", "hf")


@dataclass
class Workload:
    """One benchmark configuration; both systems read the same instance."""

    device: str = "cpu"
    model: str = "smollm2"  # "smollm2" (the real checkpoint) or "random:<anita preset>"
    batch: int = 4  # B for forward, SFT and DPO (DPO: B preference pairs, 2·B sequences)
    seq_len: int = 256  # T of every training / forward sequence (DPO: prompt T/2 + answer T/2)
    forward_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    train_dtype: str = "bfloat16"  # activations, unquantized weights, NF4 compute dtype (the recipe: bf16)
    decode_dtype: str = "float32"
    decode_batch: int = 1
    decode_prompt: int = 64  # P
    decode_new: int = 128  # N, always generated in full (no stop token)
    lora_r: int = 16
    lora_alpha: float = 8.0  # the SFT recipe's 16 / 8
    beta: float = 0.1
    checkpointing: str = "full"  # "full", "selective" or "off" (HF: gradient checkpointing on for full/selective)
    head_dtype: str = "fp32"  # anita's loss head matmuls: "fp32" or "bf16" (TRL's fused head is bf16 either way)
    fused: bool = False  # anita: fused frozen q/k/v and gate/up matmuls
    # LoRA A and B: "float32" (anita's default; PEFT's autocast_adapter_dtype) or "bfloat16" (the QLoRA
    # paper's and TRL's trainers': SFTTrainer and DPOTrainer cast a quantized model's adapters to bf16)
    adapter_dtype: str = "float32"
    # dpo-recipe: the DPO recipe's shape (anita/recipes/anita_2_dpo.toml): prompts ~400 tokens, answers
    # 70-150, rows right-padded to the longest, at most max_length tokens
    recipe_prompt: tuple[int, int] = (350, 450)
    recipe_answer: tuple[int, int] = (70, 150)
    recipe_max_length: int = 1024  # also the SFT recipe shape's
    # sft-recipe: chat SFT data (UltraChat-like, anita/recipes/anita_1_sft.toml): B examples of a prompt
    # U[sft_prompt] and an answer U[sft_answer] tokens long, only the answer trained
    sft_prompt: tuple[int, int] = (30, 300)
    sft_answer: tuple[int, int] = (50, 450)
    # anita's SFT batch layout (anita.train.data): "packed" = the B examples in one padding-free row
    # (`anita sft --packing --max-tokens`), "padded" = one right-padded row each (anita sft's default)
    sft_layout: str = "packed"
    chunk_size: int = DEFAULT_CHUNK_SIZE  # anita's output head: tokens per chunk
    # anita's DPO batch layout (anita.dpo.data): "shared" = one row [prompt; chosen; rejected] per pair
    # (anita dpo's default), "packed" = all B pairs in one padding-free row, "two-row" = TRL's layout.
    # tok/s counts the two-row tokens (2·B·T) on every layout, so the ratio compares pairs per second.
    dpo_layout: str = "shared"
    warmup: int = 1
    repeats: int = 3
    threads: int = 1  # torch threads per worker; the 2 shared cores make 2-thread numbers swing 2-3x
    clock: str = "cpu"  # "cpu": process CPU time (robust on a shared machine with 1 thread), or "wall"
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        raw = json.loads(text)
        for key in ("forward_dtypes", "recipe_prompt", "recipe_answer", "sft_prompt", "sft_answer"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def default_workload(device: str, quick: bool) -> Workload:
    """CPU: the real SmolLM2-135M, B=4, T=256. CUDA: a Llama-3.1-8B-shaped random model, T=2048."""
    if device == "cuda":
        w = Workload(device="cuda", model="random:llama-3.1-8b", batch=1, seq_len=2048, clock="wall",
                     forward_dtypes=("bfloat16",), train_dtype="bfloat16", decode_dtype="bfloat16",
                     decode_prompt=128, decode_new=128, repeats=5, warmup=2)
        if quick:
            w.seq_len, w.repeats, w.warmup, w.decode_new = 1024, 3, 1, 64
        return w
    w = Workload()
    if quick:
        w.batch, w.seq_len, w.repeats, w.warmup, w.decode_new = 2, 128, 3, 1, 32
    return w


def torch_dtype(name: str) -> torch.dtype:
    return parse_dtype(name)


# ------------------------------------------------------------------------------------ batches
def token_batch(vocab: int, B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) token ids drawn with a fixed seed, so both systems see the same batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=gen)  # ids 0..2 are special in SmolLM2


def preference_batch(vocab: int, B: int, T: int, seed: int):
    """B pairs sharing a prompt of T/2 tokens, each answer T - T/2 tokens.

    Returns chosen (B, T), rejected (B, T) ids and the completion mask (B, T): 1 on answer tokens.
    """
    prompt = token_batch(vocab, B, T // 2, seed)
    chosen = torch.cat([prompt, token_batch(vocab, B, T - T // 2, seed + 1)], dim=1)  # (B, T)
    rejected = torch.cat([prompt, token_batch(vocab, B, T - T // 2, seed + 2)], dim=1)  # (B, T)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, T // 2:] = 1
    return chosen, rejected, mask


def recipe_preference_batch(vocab: int, B: int, w: Workload):
    """B pairs in the DPO recipe's shape: a prompt of P ~ U[recipe_prompt] tokens, chosen and rejected
    answers of U[recipe_answer] tokens each, rows right-padded (pad id 0) to the longest.

    Returns ids (2B, T) as [chosen; rejected], completion mask (2B, T) (1 on answer tokens) and the
    attention mask (2B, T) (1 on real tokens).
    """
    gen = torch.Generator().manual_seed(w.seed)
    rows, answers = [], []
    for half in range(2):
        for b in range(B):
            g = torch.Generator().manual_seed(w.seed * 1000 + b)  # the pair's prompt, shared by both halves
            P = int(torch.randint(w.recipe_prompt[0], w.recipe_prompt[1] + 1, (1,), generator=g))
            prompt = torch.randint(3, vocab, (P,), generator=g)
            A = int(torch.randint(w.recipe_answer[0], w.recipe_answer[1] + 1, (1,), generator=gen))
            answer = torch.randint(3, vocab, (min(A, w.recipe_max_length - P),), generator=gen)
            rows.append(torch.cat([prompt, answer]))
            answers.append(len(answer))
    T = max(len(r) for r in rows)
    ids = torch.zeros(2 * B, T, dtype=torch.long)
    completion, attention = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, A) in enumerate(zip(rows, answers)):
        ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
        completion[i, len(row) - A:len(row)] = 1
    return ids, completion, attention


def recipe_sft_batch(vocab: int, B: int, w: Workload) -> list[tuple[list[int], list[int]]]:
    """B chat SFT examples in the SFT recipe's shape: a prompt of U[sft_prompt] tokens, an answer of
    U[sft_answer] tokens, at most recipe_max_length in all; seeded by w.seed.

    Returns, per example, its ids (T_b,) and its 0/1 completion mask (T_b,): 1 on the answer tokens,
    the only ones trained (anita's assistant-only loss; TRL's assistant_only_loss /
    completion_only_loss). Unpadded: collating them is what each side does its own way.
    """
    gen = torch.Generator().manual_seed(w.seed)
    examples = []
    for _ in range(B):
        P = int(torch.randint(w.sft_prompt[0], w.sft_prompt[1] + 1, (1,), generator=gen))
        A = min(int(torch.randint(w.sft_answer[0], w.sft_answer[1] + 1, (1,), generator=gen)), w.recipe_max_length - P)
        ids = torch.randint(3, vocab, (P + A,), generator=gen).tolist()
        examples.append((ids, [0] * P + [1] * A))
    return examples


def preference_rows(vocab: int, w: Workload, recipe: bool):
    """The DPO workload as TRL's rows: ids, completion and attention masks (2B, T), [chosen; rejected],
    right-padded: the recipe's shape (`recipe_preference_batch`) or `preference_batch`'s B pairs."""
    if recipe:
        return recipe_preference_batch(vocab, w.batch, w)
    chosen, rejected, completion = preference_batch(vocab, w.batch, w.seq_len, w.seed)
    ids = torch.cat([chosen, rejected])  # (2B, T)
    return ids, torch.cat([completion, completion]), torch.ones_like(ids)


# ------------------------------------------------------------------------------ model source
def model_dir(w: Workload) -> Path:
    """The HF-layout directory both systems load: SmolLM2, or a random checkpoint made once."""
    if w.model == "smollm2":
        from anita.assets import smollm2_dir

        return smollm2_dir()
    if w.model.startswith("random:"):
        from benchmarks.random_checkpoint import random_checkpoint

        return random_checkpoint(w.model.split(":", 1)[1], w.device, torch_dtype(w.train_dtype))
    raise ValueError(f"unknown model {w.model!r}: expected 'smollm2' or 'random:<preset>'")


# ------------------------------------------------------------------------------ measurement
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator counter, or the kernel's VmHWM of this process."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak resident set size to the current one
    except OSError:
        pass  # no reset: the peak then covers set-up too (getrusage fallback below)


def peak_memory_mib(device: str) -> float:
    """Peak since `reset_peak_memory`: CUDA max_memory_allocated, or peak RSS on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def time_steps(step, w: Workload) -> dict:
    """Run `step()` warmup + repeats times; returns the median and all timed durations (s).

    Both clocks are kept: wall time, and this process's CPU time (`time.process_time`, all its
    threads). With one thread on a CPU shared with other jobs, CPU time is what the step would
    take on an idle core, while wall time also counts the time other jobs held the core;
    `w.clock` picks the one the median is taken of.
    """
    reset_peak_memory(w.device)
    start_mib = peak_memory_mib(w.device)  # right after the reset: what set-up left resident
    for _ in range(w.warmup):
        step()
    sync(w.device)
    wall, cpu = [], []
    for _ in range(w.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync(w.device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    times = cpu if w.clock == "cpu" else wall
    return {"median_s": statistics.median(times), "wall_s": wall, "cpu_s": cpu, "clock": w.clock,
            "peak_mib": peak_memory_mib(w.device), "start_mib": start_mib}


# ------------------------------------------------------------------------------------ FLOPs
def matmul_params(config: dict) -> int:
    """Parameters that are multiplied per token (all linears and the LM head, no embedding)."""
    D, Fh, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    E = config.get("head_dim") or D // H
    per_layer = D * H * E * 2 + D * K * E * 2 + 3 * D * Fh
    return L * per_layer + D * config["vocab_size"]


def forward_flops_per_token(config: dict, T: int) -> float:
    H = config["num_attention_heads"]
    E = config.get("head_dim") or config["hidden_size"] // H
    return 2.0 * matmul_params(config) + 4.0 * config["num_hidden_layers"] * T * H * E


def step_flops_per_token(bench: str, config: dict, T: int) -> float:
    """Model FLOPs per processed token: forward 1×, LoRA step 2× (fwd + input-grad bwd), DPO 3×."""
    per = forward_flops_per_token(config, T)
    return {"forward": per, "sft": 2 * per, "sft-recipe": 2 * per, "dpo": 3 * per, "dpo-recipe": 3 * per}[bench]


def measured_peak_tflops(device: str, clock: str = "wall", seconds: float = 2.0) -> dict:
    """This machine's bf16 matmul peak, measured: the best TFLOP/s of square bf16 GEMMs (CPU: n = 2048
    with the workers' thread count; CUDA: n = 8192, synchronized) over about `seconds`, timed by the
    workers' clock ("cpu": process CPU time, robust to neighbours with one thread; "wall"). The best,
    not the median, so that a neighbour's job on a shared CPU lowers it as little as possible.

    MFU is reported against this rather than a data-sheet number, so it says how much of what this
    machine can actually do in a bf16 GEMM the step used. `BENCH_PEAK_TFLOPS` overrides it."""
    override = os.environ.get("BENCH_PEAK_TFLOPS")
    if override:
        return {"tflops": float(override), "how": "BENCH_PEAK_TFLOPS"}
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    best, spent = 0.0, 0.0
    (a @ b), sync(device)  # warm-up: kernel selection, page faults
    now = time.process_time if clock == "cpu" else time.perf_counter
    while spent < seconds:
        start = now()
        a @ b
        sync(device)
        took = now() - start
        spent += took
        best = max(best, 2 * n**3 / took / 1e12)
    return {"tflops": best, "how": f"best bf16 {n}x{n} GEMM, {clock} clock, {torch.get_num_threads()} threads"}
