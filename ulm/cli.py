"""The `ulm` command line: `ulm init`, `ulm import-gpt2`, `ulm generate` (and the pipeline commands).

Each command is a `add_*` function that adds its parser; to add one, write it and list it in COMMANDS.
Errors in input (missing files, bad checkpoints, bad values) print one line and exit with status 2. `ulm train`
stopped by SIGTERM saves its last checkpoint, prints one line and exits with status 3 (EXIT_STOPPED).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

EXIT_STOPPED = 3  # `ulm train` stopped by SIGTERM, its last checkpoint saved: `--resume` continues it


def add_init(sub) -> None:
    from ulm.config import GPT_PRESETS

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a model shape")
    p.add_argument("--preset", required=True, choices=sorted(GPT_PRESETS), help="a model shape (GPT_PRESETS)")
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
    p.add_argument("--quantize", help="int8: Linear weights in int8 (FBGEMM dynamic quantization, CPU); bf16: the "
                                      "model in bf16 (a CPU with AVX-512 BF16 or AMX, or a GPU)")
    p.set_defaults(func=run_generate)


def run_generate(args) -> None:
    from ulm.checkpoint import load_checkpoint
    from ulm.generate import SamplingParams, generate_text
    from ulm.quantize import check_quantize

    check_quantize(args.quantize, args.device)  # before loading: a bad value is a one-line error
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    params.validate()
    if args.quantize:
        model.prepare_for_inference(quantize=args.quantize)
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, params))


def add_data(sub) -> None:
    from ulm.data.build import DEFAULT_BPE_VOCAB, TOKENIZER_KINDS
    from ulm.data.clean import NORMALIZATIONS
    from ulm.data.sources import NAMED_CORPORA, TEXT_UNITS

    p = sub.add_parser("data", help="build and inspect datasets (flat token files + manifest)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="clean, split and tokenize text sources into a dataset directory")
    b.add_argument("--source", action="append", required=True, metavar="PATH_OR_NAME",
                   help=f"a text file, folder, .jsonl file, a corpus name ({', '.join(NAMED_CORPORA)}; downloaded "
                        "into the cache) or NAME=PATH for a local copy of one; repeatable")
    b.add_argument("--out", required=True, help="dataset directory to write")
    b.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="char")
    b.add_argument("--vocab-size", type=int, help=f"bpe vocabulary size (default {DEFAULT_BPE_VOCAB})")
    b.add_argument("--val-fraction", type=float, default=0.1)
    b.add_argument("--test-fraction", type=float, default=0.0)
    b.add_argument("--jsonl-field", default="text", help="the field of each JSONL record that holds its text")
    b.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                   help="what one document of a plain text file is (default: the whole file)")
    b.add_argument("--normalization", choices=NORMALIZATIONS, default="NFC", help="Unicode normalization form")
    b.add_argument("--no-whitespace-cleanup", dest="whitespace", action="store_false")
    b.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate documents")
    b.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this after cleaning")
    b.add_argument("--shuffle-seed", type=int, help="shuffle documents (with this seed) before splitting")
    b.add_argument("--cache-dir", help="download cache for named corpora (default ~/.cache/ulm or $ULM_CACHE_DIR)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    b.add_argument("--follow-symlinks", action="store_true",
                   help="read symlinks in a source folder that point outside it (default: refuse the build, "
                        "naming the link; links within the folder are always read)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=run_data_build)
    i = dsub.add_parser("info", help="print a dataset's splits and id")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="re-hash the token files against the manifest")
    i.set_defaults(func=run_data_info)


def run_data_build(args) -> None:
    from ulm.data.build import build_dataset

    build_dataset(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, test_fraction=args.test_fraction, jsonl_field=args.jsonl_field,
                  text_unit=args.text_unit, normalization=args.normalization, whitespace=args.whitespace,
                  dedup=args.dedup, min_chars=args.min_chars, shuffle_seed=args.shuffle_seed,
                  cache_dir=args.cache_dir, overwrite=args.overwrite, progress=args.progress,
                  follow_symlinks=args.follow_symlinks)


def run_data_info(args) -> None:
    from ulm.data.dataset import dataset_id, load_manifest, verify_dataset

    manifest = load_manifest(args.dir)
    if args.verify:
        verify_dataset(args.dir)
    tok = manifest["tokenizer"]
    print(f"{args.dir}: tokenizer {tok['kind']} (vocab {tok['vocab_size']})")
    for name, info in manifest["splits"].items():
        print(f"  {name}: {info['num_tokens']:,} tokens ({info['dtype']}, {info['num_documents']:,} documents)")
    print(f"dataset id: {dataset_id(args.dir)}" + (" (verified)" if args.verify else ""))


def add_train(sub) -> None:
    from ulm.train_config import recipe_names

    p = sub.add_parser("train", help="train a GPT from a recipe or TOML config (under torchrun: data parallel)",
                       description="Config layers, later wins: --preset, --config FILE, --set KEY=VALUE, flags.")
    p.add_argument("--out", required=True, help="run directory: best/ and last/ checkpoints, metrics, plot")
    p.add_argument("--preset", choices=recipe_names(), help="a training recipe (ulm/presets/NAME.toml)")
    p.add_argument("--config", help="TOML file of config keys (over the recipe)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set lr=3e-4 n_layer=2")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/last (start if none)")
    p.add_argument("--dataset", help="dataset directory (task lm)")
    p.add_argument("--max-iters", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from ulm.train import TrainingStopped, train
    from ulm.train_config import build_config
    from ulm.training.state import saved_config

    base = saved_config(args.out) if args.resume else None
    if not (args.preset or args.config or base):
        raise ValueError("give --preset or --config" + (f" (nothing to resume in {args.out})" if args.resume else ""))
    flags = {"dataset": args.dataset, "max_iters": args.max_iters, "seed": args.seed, "device": args.device,
             "dtype": args.dtype, "compile": args.compile}
    cfg = build_config(args.preset, args.config, args.set, {k: v for k, v in flags.items() if v is not None},
                       base=None if (args.preset or args.config) else base)
    master = os.environ.get("RANK", "0") == "0"  # under torchrun, one line, not one per process
    try:
        best = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, stop_on_sigterm=True)
    except TrainingStopped as e:
        if master:
            print(f"ulm train: {e}", file=sys.stderr)
        return EXIT_STOPPED
    if master:
        print(f"best checkpoint: {best}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint (and exact match for addition)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", help="dataset directory (default: the one the checkpoint was trained on)")
    p.add_argument("--split", help="default: test for addition, val for datasets")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (datasets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_eval)


def run_eval(args) -> None:
    import json

    from ulm.evaluate import evaluate

    r = evaluate(args.checkpoint, args.dataset, args.split, args.batch_size, args.device, progress=not args.json)
    if args.json:
        print(json.dumps(r))
        return
    line = f"{r['split']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.4f}"
    if "accuracy" in r:
        line += f", exact match {r['accuracy']:.4%} of {r['examples']} prompts"
    print(line)


COMMANDS = [add_init, add_import_gpt2, add_generate, add_data, add_train, add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ulm", description="µLM: datasets, training, generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"ulm {args.command}: error: {e}", file=sys.stderr)
        return 2
