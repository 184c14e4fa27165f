"""The `ulm` command line: `ulm init`, `ulm import-gpt2`, `ulm generate` (and the pipeline commands).

Each command is a `add_*` function that adds its parser; to add one, write it and list it in COMMANDS.
Errors in input (missing files, bad checkpoints, bad values) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

import torch


def add_init(sub) -> None:
    from ulm.config import GPT_PRESETS

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("--preset", required=True, choices=sorted(GPT_PRESETS))
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="directory with a tokenizer.json (default: byte-level)")
    p.set_defaults(func=run_init)


def run_init(args) -> None:
    from ulm.checkpoint import save_checkpoint
    from ulm.config import gpt_preset
    from ulm.model import GPT
    from ulm.tokenizer import Tokenizer, byte_level

    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else byte_level()
    overrides = {} if tokenizer.vocab_size <= gpt_preset(args.preset).vocab_size else {
        "vocab_size": tokenizer.vocab_size}
    torch.manual_seed(args.seed)
    model = GPT(gpt_preset(args.preset, **overrides))
    save_checkpoint(args.out, model, tokenizer, extra={"preset": args.preset})
    print(f"wrote {args.out}: {args.preset}, {model.num_params() / 1e6:.2f}M parameters, "
          f"{model.memory_bytes() / 2**20:.1f} MiB fp32")


def add_import_gpt2(sub) -> None:
    p = sub.add_parser("import-gpt2", help="convert an HF-layout GPT-2 directory into a µLM checkpoint")
    p.add_argument("src", help="directory with config.json, model.safetensors (and tokenizer files)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_import_gpt2)


def run_import_gpt2(args) -> None:
    from ulm.gpt2 import import_gpt2

    out = import_gpt2(args.src, args.out)
    print(f"wrote {out}")


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint in-process (KV cache)")
    p.add_argument("prompt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_generate)


def run_generate(args) -> None:
    from ulm.checkpoint import load_checkpoint
    from ulm.generate import SamplingParams, generate_text

    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    params.validate()
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, params))


COMMANDS = [add_init, add_import_gpt2, add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ulm", description="µLM: datasets, training, generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"ulm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
