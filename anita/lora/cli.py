"""`anita merge`: fold a LoRA adapter into its base model and write an HF-layout model directory
(`anita.lora.merge_to_directory`); `anita generate`: chat or plain completion, streamed, from a model
with or without its adapter (`anita.lora.load_for_inference`, `anita.model.generate`)."""

from __future__ import annotations

import sys

from anita.arguments import add_model_args, finite_float, int_range
from anita.dtypes import WEIGHT_DTYPE_NAMES
from anita.errors import AnitaError
from anita.hub import resolve_model_dir
from anita.lora import load_for_inference, merge_to_directory
from anita.model.config import LlamaConfig
from anita.model.generate import (
    check_sampling,
    generate,
    room_in_context,
    stream_printer,
)
from anita.model.tokenizer import Tokenizer


def run_merge(args) -> int:
    print(merge_to_directory(args.model, args.adapter, args.output, args.dtype))
    return 0


def run_generate(args) -> int:
    """Everything is checked before the weights load: flags, adapter, and that the prompt fits the context."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    unused = [f for f, v in [("--top-k", args.top_k), ("--top-p", args.top_p)] if v is not None]
    if unused and args.temperature <= 0:
        raise AnitaError(f"{', '.join(unused)}: only when sampling; --temperature {args.temperature} is greedy "
                         "(ANITA's examples sample with --temperature 0.6 --top-p 0.9)")
    model_dir = resolve_model_dir(args.model)
    tok = Tokenizer.from_pretrained(model_dir)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = tok.apply_chat_template(messages + [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = tok.encode(args.prompt)
    context = LlamaConfig.from_json(model_dir / "config.json").max_position_embeddings
    try:
        new_tokens = room_in_context(len(prompt), args.max_new_tokens, context)
    except AnitaError as e:
        raise AnitaError(f"--prompt: {str(e).removeprefix('generate: the prompt is ')} (anita does not cut "
                         "prompts)") from None
    if new_tokens < args.max_new_tokens:
        print(f"anita: note: the {len(prompt)}-token prompt leaves room for {new_tokens} new tokens in the "
              f"model's context of {context}, not --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    model, tok = load_for_inference(model_dir, args.adapter, args.dtype, args.device, args.quantize)
    generate(model, prompt, max_new_tokens=new_tokens, stop_ids=tok.stop_ids, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, pad_id=tok.pad_id, seed=args.seed,
             on_token=stream_printer(tok))
    print()
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (HF layout out)")
    p.add_argument("--model", required=True, help="base model: HF-layout directory or Hub id")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPE_NAMES,
                   help="dtype of the base and of the written weights (the recipe publishes bfloat16)")
    p.set_defaults(func=run_merge)

    p = sub.add_parser("generate", help="generate text with a model (streamed)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue, or with --chat the user's message; it "
                   "must fit the model's context (it is refused, not cut)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--system", help="system message (implies --chat); e.g. the ANITA prompt")
    p.add_argument("--max-new-tokens", type=int_range(1), default=256,
                   help="stop after this many tokens, or at the end of the model's context (default: 256)")
    p.add_argument("--temperature", type=finite_float(0), default=0.0,
                   help="0 = greedy (default); ANITA's examples sample at 0.6")
    p.add_argument("--top-k", type=int_range(1), default=None,
                   help="sample from the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=finite_float(0, 1, low_open=True), default=None,
                   help="nucleus sampling: the smallest set of tokens with this much mass (default: all); "
                        "ANITA's examples use 0.9")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    p.set_defaults(func=run_generate)
