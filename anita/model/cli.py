"""`anita convert-gguf`. (`anita generate`, which may load an adapter, is in `anita.lora.cli`.)"""

from __future__ import annotations

from anita.model.gguf import convert_gguf


def run_convert(args) -> int:
    print(f"wrote {convert_gguf(args.file, args.out_dir)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert-gguf", help="convert a llama.cpp GGUF Llama model to an HF-layout directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.set_defaults(func=run_convert)
