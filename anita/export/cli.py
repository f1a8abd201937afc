"""`anita export-gguf`: a checkpoint (+ LoRA adapter) as a llama.cpp GGUF file, optionally with an Ollama Modelfile."""

from __future__ import annotations

from anita.export.gguf import GGUF_TYPES, export_gguf


def run_export(args) -> int:
    out = export_gguf(args.model_dir, args.out, args.type, args.adapter, args.ollama, args.system)
    print(f"wrote {out}" + (f" and {out.with_suffix('.Modelfile')}" if args.ollama else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("export-gguf", help="write a model (+ merged LoRA adapter) as a llama.cpp GGUF file")
    p.add_argument("model_dir", help="HF-layout model directory (config.json, weights, tokenizer.json)")
    p.add_argument("out", help="the .gguf file to write (replaced atomically)")
    p.add_argument("--adapter", help="LoRA adapter directory to merge into the fp32 weights first")
    p.add_argument("--type", default="f16", help=f"tensor type: {', '.join(GGUF_TYPES)} (default: f16)")
    p.add_argument("--ollama", action="store_true", help="also write OUT with suffix .Modelfile for `ollama create`")
    p.add_argument("--system", action="store_true", help="with --ollama: SYSTEM is the ANITA system prompt")
    p.set_defaults(func=run_export)
