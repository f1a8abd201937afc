"""`anita generate` (chat or plain completion, streamed) and `anita convert-gguf`."""

from __future__ import annotations

from anita.arguments import add_model_args
from anita.errors import AnitaError
from anita.lora import load_for_inference
from anita.model.generate import generate, stream_printer
from anita.model.gguf import convert_gguf


def run_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise AnitaError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    unused = [f for f, v in [("--top-k", args.top_k), ("--top-p", args.top_p)] if v is not None]
    if unused and args.temperature <= 0:
        raise AnitaError(f"{', '.join(unused)}: only when sampling; --temperature {args.temperature} is greedy "
                         "(ANITA's examples sample with --temperature 0.6 --top-p 0.9)")
    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.device, args.quantize)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tok.apply_chat_template(messages + [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = tok.encode(args.prompt)
    generate(model, prompt, max_new_tokens=args.max_new_tokens, stop_ids=tok.stop_ids, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, pad_id=tok.pad_id, seed=args.seed,
             on_token=stream_printer(tok))
    print()
    return 0


def run_convert(args) -> int:
    print(f"wrote {convert_gguf(args.file, args.out_dir)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (streamed)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue, or with --chat the user's message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--system", help="system message (implies --chat); e.g. the ANITA prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); ANITA's examples sample at 0.6")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this much mass (default: all); "
                        "ANITA's examples use 0.9")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("convert-gguf", help="convert a llama.cpp GGUF Llama model to an HF-layout directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output directory (must not exist or be empty)")
    p.set_defaults(func=run_convert)
