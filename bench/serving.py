"""Serving benchmark: a concurrency sweep of streaming Generate calls against µLM gRPC servers.

  python -m bench.serving --target HOST:PORT              # a running server
  python -m bench.serving --preset gpt2-small | --checkpoint DIR [--backends torch,onnx-fp32,onnx-int8]
      [--concurrency 1,4,16,64] [--max-new-tokens 64] [--rounds 3] [--threads N] [--max-batch N] [--device cpu|cuda]
      [--temperature 0 --top-k 0 --top-p 1]
      [--out build/bench/serving.json] [--cache build/bench]

With a checkpoint (or a preset's random-init one) the script starts one server per backend in turn
(`python -m server` on a free port; ONNX exports are made once and cached) and loads the same backend in this
process too, to measure what gRPC streaming costs over in-process decoding. Per concurrency level C: C streams
at once (greedy, or sampled with --temperature/--top-k/--top-p, in-process alike): time to first token and
inter-token latency p50/p95, aggregate tokens/s (all tokens / wall time), per-stream tokens/s (median), errors by
status code. Rounds go over all levels in turn (the machine's load drifts); ratios are medians of per-round
ratios. Writes JSON and a PNG plot (next to the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.common import (
    BENCH_DIR,
    ROOT,
    SERVED,
    add_model_source,
    backend_dir,
    check_device,
    ensure_checkpoint,
    machine,
    parse_list,
    save_figure,
    server_flags,
    time_decode,
    torch_quantize,
)
from clients.load import PROMPT, sweep
from ulm.generate import SamplingParams
from ulm.util import set_threads, write_json

# targets: streaming cost over in-process decoding at batch 1; 16 streams' tokens/s over one's (8x for the toy
# preset, whose steps cost little more at 16 rows than at one; 6x for other models, the default adder among them);
# for the toy preset also 64 streams' tokens/s and their time to first token
GRPC_OVERHEAD, SCALING, TOY_SCALING = 0.15, 6.0, 8.0
TOY_TOKENS_64, TOY_TTFT_64_MS = 15_000, 50.0


# -- servers started here ----------------------------------------------------------------------------------

class Server:
    """`python -m server` on a free loopback port, logging to a file; stopped with SIGTERM."""

    def __init__(self, kind: str, directory: Path, device: str, threads: int, max_batch: int | None, log: Path,
                 extra: tuple[str, ...] = ()):
        self.log = log
        args = [sys.executable, "-m", "server", "--backend", kind, "--checkpoint", str(directory), "--port", "0",
                "--device", device, "--threads", str(threads), "--log-level", "INFO", *extra]
        if max_batch:
            args += ["--max-batch", str(max_batch)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log.open("w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.target = self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        target = None
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if target is None and (m := re.search(r"listening on ([\d.]+:\d+)", text)):
                target = m.group(1)
            if target and "ready:" in text:
                return target
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); log: {self.log}\n{text[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout} s; log: {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


class InProcess:
    """The same backend in this process, with the server's threads: seconds per decode step at batch 1."""

    def __init__(self, kind: str, directory: Path, device: str, threads: int, max_batch: int | None, steps: int,
                 prompt: str, sampling: dict, quantize: str | None = None):
        from server.backends import load_backend
        from server.backends.base import model_threads, warmup
        from server.model_catalog import auto_max_batch, config_of

        set_threads(threads)
        self.backend = load_backend(kind, directory, device, max_batch or auto_max_batch(config_of(directory)),
                                    serving=True, quantize=quantize)  # as the server does
        set_threads(model_threads(self.backend, threads))
        warmup(self.backend)
        self.steps, self.prompt_len = steps, len(self.backend.tokenizer.encode(prompt))
        self.sampling = SamplingParams(**sampling)

    def __call__(self) -> float:
        return statistics.median(time_decode(self.backend, 1, self.steps, self.prompt_len, sampling=self.sampling))


# -- report ------------------------------------------------------------------------------------------------

def show_level(label: str, r: dict) -> None:
    err = f", errors {r['errors']}" if r["errors"] else ""
    print(f"  {label:<10} C={r['concurrency']:<3} TTFT p50 {r['ttft_ms']['p50']:7.1f} p95 {r['ttft_ms']['p95']:7.1f} ms"
          f" | ITL p50 {r['itl_ms']['p50']:6.2f} p95 {r['itl_ms']['p95']:6.2f} ms | {r['aggregate_tokens_per_s']:7.1f}"
          f" tok/s total, {r['per_stream_tokens_per_s']:6.1f} per stream{err}", flush=True)


def targets(run: dict) -> list[dict]:
    """Medians of per-round ratios (each round's figures were taken together)."""
    out = []
    by_c = {r["concurrency"]: r for r in run["levels"]}
    if run.get("in_process_ms_rounds") and 1 in by_c:
        cost = statistics.median(r["itl_ms_p50"] / ms - 1
                                 for r, ms in zip(by_c[1]["rounds"], run["in_process_ms_rounds"]))
        out.append({"name": f"{run['backend']}: gRPC streaming cost over in-process decoding at batch 1",
                    "value": cost, "target": GRPC_OVERHEAD, "met": cost <= GRPC_OVERHEAD})
    toy = run.get("model") == "toy"
    if 1 in by_c and 16 in by_c:
        x = statistics.median(a["aggregate_tokens_per_s"] / b["aggregate_tokens_per_s"]
                              for a, b in zip(by_c[16]["rounds"], by_c[1]["rounds"]))
        target = TOY_SCALING if toy else SCALING
        out.append({"name": f"{run['backend']}: aggregate tokens/s of 16 streams over 1", "value": x,
                    "target": target, "met": x >= target})
    if toy and 64 in by_c:
        tokens, ttft = by_c[64]["aggregate_tokens_per_s"], by_c[64]["ttft_ms"]["p50"]
        out.append({"name": f"{run['backend']}: aggregate tokens/s of 64 streams", "value": tokens,
                    "target": TOY_TOKENS_64, "met": tokens >= TOY_TOKENS_64})
        out.append({"name": f"{run['backend']}: time to first token p50 at 64 streams (ms)", "value": ttft,
                    "target": TOY_TTFT_64_MS, "met": ttft < TOY_TTFT_64_MS})
    return out


def show_targets(goals: list[dict]) -> None:
    for g in goals:
        met = "met" if g["met"] else "NOT met"
        if "cost" in g["name"]:
            print(f"  {g['name']}: {100 * g['value']:+.1f}% (target <= {100 * g['target']:g}%: {met})")
        elif "over 1" in g["name"]:
            print(f"  {g['name']}: {g['value']:.2f}x (target >= {g['target']:g}x: {met})")
        elif "first token" in g["name"]:
            print(f"  {g['name']}: {g['value']:.1f} (target < {g['target']:g}: {met})")
        else:
            print(f"  {g['name']}: {g['value']:,.0f} (target >= {g['target']:,}: {met})")


def plot(runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("aggregate_tokens_per_s", None, "aggregate tokens/s"), ("per_stream_tokens_per_s", None,
              "tokens/s per stream"), ("ttft_ms", "p50", "time to first token (ms)"), ("itl_ms", "p50",
              "inter-token latency (ms)")]
    for ax, (key, sub, title) in zip(axes.flat, panels):
        for run in runs:
            cs = [r["concurrency"] for r in run["levels"]]
            if sub is None:
                ax.plot(cs, [r[key] for r in run["levels"]], marker="o", label=run["backend"])
            else:
                line, = ax.plot(cs, [r[key]["p50"] for r in run["levels"]], marker="o", label=f"{run['backend']} p50")
                ax.plot(cs, [r[key]["p95"] for r in run["levels"]], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{run['backend']} p95")
        ax.set_xscale("log", base=2)
        if sub is not None:
            ax.set_yscale("log")  # queueing at high concurrency spans orders of magnitude
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    name = runs[0].get("model", "")
    s = runs[0].get("sampling") or {}
    mode = (f"temperature {s['temperature']:g}, top-k {s['top_k']}, top-p {s['top_p']:g}" if s.get("temperature")
            else "greedy")
    fig.suptitle(f"µLM serving: {name}, {runs[0]['max_new_tokens']} new tokens per stream, {mode}")
    return save_figure(fig, path)


# -- main --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    add_model_source(p, target=True)
    p.add_argument("--backends", default=",".join(SERVED), help="with --checkpoint/--preset")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="each round runs every concurrency level once")
    p.add_argument("--threads", type=int, default=0,
                   help="server threads (and the in-process baseline's); 0: the server's choice (one per core, one for "
                        "a model under a million parameters)")
    p.add_argument("--max-batch", type=int, help="server slots (default: the server's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for the servers started here (the int8 export "
                   "is skipped on cuda)")
    p.add_argument("--out", default=str(BENCH_DIR / "serving.json"))
    p.add_argument("--cache", default=str(BENCH_DIR), help="where preset checkpoints and ONNX exports are kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        levels = parse_list(args.concurrency, int, name="concurrency")
        SamplingParams(**sampling(args)).validate()
        if min(levels) < 1 or args.max_new_tokens < 1 or args.rounds < 1:
            raise ValueError("--concurrency, --max-new-tokens and --rounds must be >= 1")
        runs = []
        if args.target:
            runs.append(run_target(args.target, levels, args))
        else:
            checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.preset, Path(args.cache))
            for label in check_device(args.device, parse_list(args.backends, choices=list(SERVED), name="backends")):
                runs.append(run_backend(label, checkpoint, levels, args))
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"bench_serving: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    out = Path(args.out)
    write_json(out, {"machine": machine(), "device": args.device, "threads": args.threads, "prompt": args.prompt,
                     "runs": runs})  # each run records its sampling
    png = plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return 0


def sampling(args) -> dict:
    """The sampling fields of every request (and of the in-process baseline)."""
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def run_target(target: str, levels: list[int], args, label: str | None = None, in_process=None) -> dict:
    info, results, local = asyncio.run(sweep(
        target, levels, args.max_new_tokens, args.prompt, args.rounds, in_process, sampling=sampling(args),
        progress=lambda r, c: print(f"  round {r + 1}/{args.rounds}: {c} stream(s)", flush=True)))
    label = label or f"{info['backend']}-{info['dtype']}"
    for r in results:
        show_level(label, r)
    run = {"backend": label, "model": info["name"], "target": target, "server": info, "sampling": sampling(args),
           "max_new_tokens": args.max_new_tokens, "levels": results}
    if local:
        run["in_process_ms"] = 1e3 * statistics.median(local)
        run["in_process_ms_rounds"] = [1e3 * x for x in local]
        print(f"  in-process decode at batch 1: {run['in_process_ms']:.2f} ms/token")
    run["targets"] = targets(run)
    show_targets(run["targets"])
    return run


def run_backend(label: str, checkpoint: Path, levels: list[int], args) -> dict:
    kind, directory = backend_dir(label, checkpoint, Path(args.cache))
    print(f"{label}: starting a server ({args.device}, {args.threads} thread(s)) and loading the backend here too ...",
          flush=True)
    log = Path(args.out).parent / f"server-{label}.log"
    server = Server(kind, directory, args.device, args.threads, args.max_batch, log, server_flags(label))
    try:
        local = InProcess(kind, directory, args.device, args.threads, args.max_batch, args.max_new_tokens, args.prompt,
                          sampling(args), torch_quantize(label))
        run = run_target(server.target, levels, args, label, local)
    finally:
        server.stop()
    del local
    gc.collect()
    return run


if __name__ == "__main__":
    sys.exit(main())
