"""Peak memory of loading a checkpoint straight into NF4: `python benchmarks/bench_nf4_load.py`.

Writes a random-weight Llama-3.2-1B-shaped checkpoint (bf16, N(0, 0.02) weights, ~2.5 GB) to a
temporary directory — tensor by tensor, so the writer never holds more than one tensor — then
loads it in a fresh Python process with `anita.model.from_pretrained(dir, dtype=bf16, quantize="nf4")`
(and, for comparison, without quantization) and reports, per checkpoint layout:

- peak RSS (the kernel's VmHWM): everything the process had mapped at its peak, including the
  pages of the checkpoint file that safetensors reads through mmap (file-backed, reclaimable);
- peak anonymous RSS (RssAnon, sampled every 2 ms): memory the process itself allocated;
- the model's own bytes (`anita.quant.memory_report`) and the baseline after imports.

Layouts: "single" (one model.safetensors, as Hugging Face ships Llama 3.2 1B) and "sharded"
(one shard per layer plus an index). The directory is removed at the end.
Reference for the target: QLoRA (Dettmers et al. 2023) — a 4-bit base model in memory with
one layer at a time in full precision while loading.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------- writing
def tensor_shapes(preset: str) -> tuple[dict, list[dict[str, tuple[int, ...]]]]:
    """(config dict, groups of {HF key: shape}): the outer tensors, then one group per layer."""
    from anita.model import LlamaConfig

    c = LlamaConfig.preset(preset)
    D, Fh, H, K, E = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    outer = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
    if not c.tie_word_embeddings:
        outer["lm_head.weight"] = (c.vocab_size, D)
    groups = [outer]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        groups.append({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (K * E, D),
                       p + "self_attn.v_proj.weight": (K * E, D), p + "self_attn.o_proj.weight": (D, H * E),
                       p + "mlp.gate_proj.weight": (Fh, D), p + "mlp.up_proj.weight": (Fh, D),
                       p + "mlp.down_proj.weight": (D, Fh)})
    config = c.to_dict() | {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    return config, groups


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], gen) -> int:
    """Stream random bf16 tensors into one safetensors file (8-byte header length, JSON header,
    then the raw bytes in header order); returns the data size in bytes."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape).normal_(0.0, 0.02, generator=gen).bfloat16()
            f.write(t.view(torch.uint8).numpy().tobytes())
    return offset


def write_checkpoint(out: Path, preset: str, layout: str, seed: int = 0) -> int:
    """An HF-layout directory (config.json + safetensors) of random weights; returns its data bytes."""
    import torch

    config, groups = tensor_shapes(preset)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if layout == "single":
        return write_safetensors(out / "model.safetensors", {k: s for g in groups for k, s in g.items()}, gen)
    total, weight_map = 0, {}
    for i, shapes in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(out / name, shapes, gen)
        weight_map |= {k: name for k in shapes}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ------------------------------------------------------------------------------- loading
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_checkpoint_without_mmap(files):
    """A drop-in for `anita.model.checkpoint.iter_checkpoint`, kept for comparison (`--reader read`):
    each tensor read with a plain file read instead of through safetensors' mmap. anita's loader
    (`--reader mmap`) now reads each tensor under its own short-lived map and copies it out, which
    releases the pages just as well (1.47 vs 1.50 GiB peak RSS, single file, NF4)."""
    import torch

    for file in files:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                begin, end = info["data_offsets"]
                f.seek(8 + n + begin)
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.readinto(memoryview(raw.numpy()))
                dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
                yield file, key, raw.view(dtype).reshape(info["shape"])


def touch(model) -> None:
    """Read one byte of every page of every tensor, as a first forward would (mmap'd pages fault in)."""
    import torch

    for t in [*model.parameters(), *model.buffers()]:
        t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def child(model_dir: str, quantize: str | None, threads: int, reader: str) -> dict:
    """Runs in the fresh process: import, then load and touch the model while sampling RssAnon."""
    import torch

    torch.set_num_threads(threads)
    import anita.model.checkpoint as checkpoint
    from anita.model import from_pretrained
    from anita.quant import memory_report
    from anita.quant.linear import import_bitsandbytes

    if reader == "read":
        checkpoint.iter_checkpoint = read_checkpoint_without_mmap
    import_bitsandbytes()  # counted in the baseline, not in the load
    baseline = proc_status()
    peak_anon, done = [baseline["RssAnon"]], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak_anon[0] = max(peak_anon[0], proc_status()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    model = from_pretrained(model_dir, dtype=torch.bfloat16, quantize=quantize)
    seconds = time.perf_counter() - t0
    touch(model)
    done.set()
    sampler.join()
    end = proc_status()
    return {"seconds": seconds, "baseline_rss": baseline["VmRSS"], "baseline_anon": baseline["RssAnon"],
            "peak_rss": end["VmHWM"], "peak_anon": max(peak_anon[0], end["RssAnon"]), "end_rss": end["VmRSS"],
            "model_bytes": memory_report(model)["total"]["bytes"]}


def run_child(model_dir: Path, quantize: str | None, threads: int, reader: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--threads", str(threads), "--reader", reader]
    if quantize:
        cmd += ["--quantize", quantize]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--layout", choices=["single", "sharded", "both"], default="both")
    p.add_argument("--reader", choices=["mmap", "read", "both"], default="both",
                   help="mmap: anita's loader as is (safetensors get_tensor); read: with the proposed plain-read reader")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the loading process")
    p.add_argument("--no-bf16", action="store_true", help="skip the unquantized comparison loads")
    p.add_argument("--dir", default=None, help="where to put the temporary checkpoint (default: $TMPDIR)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quantize, args.threads, args.reader)))
        return
    layouts = ["single", "sharded"] if args.layout == "both" else [args.layout]
    readers = ["mmap", "read"] if args.reader == "both" else [args.reader]
    tmp = Path(tempfile.mkdtemp(prefix="anita-nf4-load-", dir=args.dir))
    rows = []
    try:
        for layout in layouts:
            t0 = time.perf_counter()
            size = write_checkpoint(tmp / layout, args.preset, layout)
            print(f"wrote {layout} checkpoint: {gib(size)} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
            for reader in readers:
                for quantize in ["nf4"] + ([] if args.no_bf16 else [None]):
                    r = run_child(tmp / layout, quantize, args.threads, reader)
                    rows.append((layout, reader, quantize or "none (bf16)", size, r))
                    print(f"  {layout} {reader} quantize={quantize}: {json.dumps(r)}", flush=True)
            shutil.rmtree(tmp / layout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n$ python benchmarks/bench_nf4_load.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.preset}-shaped random checkpoint, bf16 size {gib(rows[0][3])} GiB; torch threads {args.threads}; "
          "GiB = 2^30 bytes; every tensor touched after loading\n")
    print("| layout | reader | quantize | load s | model GiB | baseline RSS | peak RSS | peak RSS - baseline "
          "| peak anon - baseline | end RSS - baseline | peak RSS / bf16 size |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layout, reader, quantize, size, r in rows:
        b = r["baseline_rss"]
        print(f"| {layout} | {reader} | {quantize} | {r['seconds']:.1f} | {gib(r['model_bytes'])} | {gib(b)} "
              f"| {gib(r['peak_rss'])} | {gib(r['peak_rss'] - b)} | {gib(r['peak_anon'] - r['baseline_anon'])} "
              f"| {gib(r['end_rss'] - b)} | {r['peak_rss'] / size:.2f} |")


if __name__ == "__main__":
    main()
