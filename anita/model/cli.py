"""`anita generate` (chat or plain completion, streamed) and `anita convert-gguf`."""

from __future__ import annotations

import argparse
import sys

from anita.errors import AnitaError

ANITA_SYSTEM_PROMPT = (  # the authors' Italian system prompt, typo "un an" included (shared/RECIPE.md)
    "Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA (Advanced Natural-based "
    "interaction for the ITAlian language). Rispondi nella lingua usata per la domanda in modo chiaro, "
    "semplice ed esaustivo."
)


def load_for_inference(model_path, adapter=None, dtype="float32", device="cpu", quantize=None):
    """Model (+ LoRA adapter) and tokenizer, ready for generation or scoring."""
    from anita.model import Llama, Tokenizer

    from anita.model.checkpoint import parse_dtype

    quant = {"quantize": quantize, "quantize_kwargs": {"compute_dtype": parse_dtype(dtype)}} if quantize else {}
    model = Llama.from_pretrained(model_path, dtype=dtype, device=device, **quant)
    if adapter is not None:
        from anita.lora import load_adapter

        load_adapter(model, adapter)
    return model.eval(), Tokenizer.from_pretrained(model_path)


def stream_printer(tokenizer, out=sys.stdout):
    """An `on_token` callback that prints text as it is generated (whole characters only)."""
    ids: list[int] = []
    shown = ""

    def on_token(_index: int, token: int) -> None:
        nonlocal shown
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    return on_token


def run_generate(args) -> int:
    from anita.model import generate

    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tok.apply_chat_template(messages + [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = tok.encode(args.prompt)
    if args.max_new_tokens < 1:
        raise AnitaError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    generate(model, prompt, max_new_tokens=args.max_new_tokens, stop_ids=tok.stop_ids, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, pad_id=tok.pad_id, seed=args.seed,
             on_token=stream_printer(tok))
    print()
    return 0


def run_convert(args) -> int:
    from anita.model.gguf import convert_gguf

    out = convert_gguf(args.file, args.out_dir)
    print(f"wrote {out}")
    return 0


def add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", required=True, help="HF-layout model directory or Hub id")
    if adapter:
        p.add_argument("--adapter", help="LoRA adapter directory (PEFT format)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["nf4"], help="load the base weights in 4-bit NF4")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (streamed)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--system", help="system message (implies --chat); e.g. the ANITA prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (ANITA's examples use 0.6)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (ANITA's examples use 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("convert-gguf", help="convert a llama.cpp GGUF Llama model to an HF-layout directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.set_defaults(func=run_convert)
