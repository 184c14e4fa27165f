"""Training throughput: median ms/iteration and tokens/s of the real trainer (`ulm.train.train`).

  python -m clients.bench_train [--preset shakespeare-char] [--dataset DIR] [--iters 100] [--warmup 10]
                                [--set KEY=VALUE ...] [--naive]

Task "lm" presets need a dataset; without --dataset a character-level one is built (in a temporary folder)
from ../shared/data/tinyshakespeare.txt. --naive times a plain loop for comparison (default threads,
AdamW's default implementation, `loss.item()` every step, float32): the "before" of the trainer's
optimisations (pass --set activation=gelu_tanh for the GPT default activation).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ulm.model import GPT
from ulm.train import load_data, lm_loss, read_metrics, train
from ulm.train_config import build_config

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--dataset")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--naive", action="store_true", help="time a plain training loop instead")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="ulm-bench-") as tmp:
        overrides = list(args.set)
        if build_config(args.preset, overrides=overrides).task == "lm":
            dataset = args.dataset
            if not dataset:
                from ulm.data.build import build_dataset

                dataset = str(build_dataset([SHAKESPEARE], Path(tmp) / "data", tokenizer="char", whitespace=False,
                                            progress=False, log=None))
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
    print(f"{args.preset} ({label}): median {med:.2f} ms/iteration, {tokens / med * 1000:,.0f} tokens/s "
          f"(p10 {sorted(ms)[len(ms) // 10]:.2f}, p90 {sorted(ms)[len(ms) * 9 // 10]:.2f} ms; {len(ms)} iterations)")


if __name__ == "__main__":
    main()
