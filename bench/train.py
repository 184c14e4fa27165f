"""Training throughput: median ms/iteration and tokens/s of the real trainer (`ulm.train.train`).

  python -m bench.train [--preset shakespeare-char] [--dataset DIR] [--iters 100] [--warmup 10]
                                [--set KEY=VALUE ...] [--device auto|cpu|cuda] [--naive]
                                [--out build/bench/train.json]

Task "lm" presets need a dataset; without --dataset a character-level one is built (in a temporary folder)
from ../shared/data/tinyshakespeare.txt, or from the tinyshakespeare corpus (downloaded once into the ulm
cache). --naive times a plain loop for comparison (default threads, AdamW's default implementation,
`loss.item()` every step, float32): the "before" of the trainer's optimisations (pass
--set activation=gelu_tanh for the GPT default activation).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import BENCH_DIR, machine
from ulm.model import GPT
from ulm.train import train
from ulm.train_config import build_config
from ulm.training.loss import lm_loss
from ulm.training.metrics import read_metrics
from ulm.training.tasks import load_data
from ulm.util import write_json

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def naive_ms(cfg, data, iters: int, warmup: int) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(data.tokenizer.vocab_size, data.block_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        x, y = data.sample("train", cfg.batch_size, g)
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--dataset")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", help="the trainer's device: auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--naive", action="store_true", help="time a plain training loop instead (on the CPU)")
    p.add_argument("--out", default=str(BENCH_DIR / "train.json"))
    args = p.parse_args(argv)
    try:
        if args.iters < 1 or args.warmup < 0:
            raise ValueError("--iters must be >= 1 and --warmup >= 0")
        result = measure(args)
    except (ValueError, OSError) as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    ms = result["ms_per_iter"]
    print(f"{args.preset} ({result['label']}): median {ms:.2f} ms/iteration, {result['tokens_per_s']:,.0f} tokens/s "
          f"(p10 {result['p10_ms']:.2f}, p90 {result['p90_ms']:.2f} ms; {args.iters} iterations)")
    print(f"wrote {write_json(Path(args.out), {'machine': machine(), 'preset': args.preset, **result})}")
    return 0


def measure(args) -> dict:
    """Train (or run the naive loop) for warmup + iters iterations in a temporary folder; the timed iterations'
    median ms, tokens/s and spread."""
    with tempfile.TemporaryDirectory(prefix="ulm-bench-") as tmp:
        overrides = list(args.set) + ([f"device={args.device}"] if args.device else [])
        if build_config(args.preset, overrides=overrides).task == "lm":
            dataset = args.dataset
            if not dataset:
                from ulm.data.build import build_dataset

                # the copy beside the checkout, else the named corpus: downloaded once into the ulm cache, checked
                local = SHAKESPEARE.is_file()
                dataset = str(build_dataset([SHAKESPEARE if local else "tinyshakespeare"], Path(tmp) / "data",
                                            tokenizer="char", whitespace=False, progress=not local, log=None))
            overrides.append(f"dataset={dataset}")
        n = args.warmup + args.iters
        overrides += [f"max_iters={n}", "log_interval=1", f"eval_interval={n}", "eval_iters=1", "stop_accuracy=0"]
        cfg = build_config(args.preset, overrides=overrides)
        data = load_data(cfg)
        tokens = cfg.batch_size * cfg.grad_accum * data.block_size  # one process
        if args.naive:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            ms = naive_ms(cfg, data, args.iters, args.warmup)
            label = f"naive loop, {torch.get_num_threads()} thread(s)"
        else:
            train(cfg, Path(tmp) / "run", progress=False)
            ms = [r["ms_per_iter"] for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "loss" in r]
            ms = ms[args.warmup:]
            label = f"trainer, threads={cfg.threads or 'auto'} dtype={cfg.dtype} compile={cfg.compile}"
    med = statistics.median(ms)
    return {"label": label, "tokens_per_iter": tokens, "ms_per_iter": med, "tokens_per_s": tokens / med * 1000,
            "p10_ms": sorted(ms)[len(ms) // 10], "p90_ms": sorted(ms)[len(ms) * 9 // 10], "iterations_ms": ms}


if __name__ == "__main__":
    sys.exit(main())
