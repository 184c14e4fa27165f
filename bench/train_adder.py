"""Train the `adder` preset from scratch and report the time and the held-out exact match.

  python -m bench.train_adder [--out DIR] [--set KEY=VALUE ...]

The same as `ulm train --preset adder --out DIR`, then `ulm eval --checkpoint DIR/best` (greedy answers to
every test prompt, which the model never trained on), then one served-style prompt: "06+90=" -> "096".
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ulm.addition import AdditionTask
from ulm.checkpoint import load_checkpoint
from ulm.evaluate import evaluate
from ulm.generate import generate_text
from ulm.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="run directory (default: a new temporary one)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ulm-adder-")) / "run"

    t0 = time.perf_counter()
    best = train("adder", out, overrides=args.set, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    r = evaluate(best)
    model, tok, meta = load_checkpoint(best)
    task = AdditionTask.from_extra(meta)
    prompt = task.prompt(6, 90)
    answer = generate_text(model, tok, prompt, task.answer_len + 2)
    summary = json.loads((out / "summary.json").read_text())
    print(f"trained {summary['iters']} iterations in {elapsed:.1f} s (training loop {summary['elapsed_s']:.1f} s)")
    print(f"test exact match: {r['accuracy']:.4%} of {r['examples']} held-out prompts (loss {r['loss']:.5f})")
    print(f"{prompt!r} -> {answer!r}; checkpoint: {best}")


if __name__ == "__main__":
    main()
