"""Soak benchmark: a server's resident memory over thousands of streaming Generate calls of varied prompt lengths.

  python -m bench.soak --preset small | --checkpoint DIR [--backend torch|onnx-fp32|onnx-int8]
      [--streams 64] [--requests 4000] [--connections new|reused|both] [--max-new-tokens 8,24]
      [--prompt-chars 4,400] [--sample-every N] [--sample-at idle|busy] [--max-seconds 1800] [--threads N]
      [--max-batch N] [--seed 0] [--target-growth 5] [--out build/bench/soak.json] [--cache build/bench]

Per connection mode, a fresh `python -m server` (bench.serving.Server) is started and `--streams`
clients keep it busy until `--requests` calls have finished (or `--max-seconds` have passed). Prompts are random
text whose lengths are drawn log-uniformly from `--prompt-chars`, and each call's max_new_tokens uniformly from
`--max-new-tokens` (both fixed per request index by --seed), as real traffic varies: calls end at different steps,
new ones are admitted a few at a time, and a prefill pass has another row count (prompts x padded length) almost
every time. Connections: "reused" shares one channel among all streams for the whole run; "new" opens a channel
for every call and closes it after.

Before the measured calls, a warm-up: max_batch streams of the longest prompts whose lengths end them one after
another, so that every decode batch size (1..max_batch) has run once and the KV cache rows (reserved at start,
mapped by the OS on first touch) are written as far as the measured calls will write them. The server's RSS
(psutil) is sampled every `--sample-every` finished calls; "idle" (the default) stops issuing calls at each sample
until those in flight have finished, so that no forward pass's activations are counted. Figures: RSS at the start
(after warm-up), at half the calls and at the end; growth over the second half (end against half) and of the
second half's peak over the first half's, in %: "met" when both are under the target (5%: memory has levelled
off). Writes JSON and a PNG plot of RSS against finished calls (next to the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

from bench.common import (
    BENCH_DIR,
    SERVED,
    add_model_source,
    backend_dir,
    ensure_checkpoint,
    machine,
    parse_list,
    save_figure,
    server_flags,
)
from bench.serving import Server
from clients.load import one_stream
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.util import write_json

GROWTH_TARGET = 5.0  # % RSS growth over the second half of the calls
MODES = ("new", "reused")
ALPHABET = string.ascii_lowercase + "      "
IDLE_WAIT = 0.2  # s after the last call of a drain returns, for the server's last pass to end


def prompt_text(i: int, lo: int, hi: int, seed: int = 0) -> str:
    """Request i's prompt: random letters and spaces, its length log-uniform in [lo, hi] characters."""
    rng = random.Random(seed * 1_000_003 + i)
    n = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if lo < hi else lo
    return "".join(rng.choices(ALPHABET, k=max(1, n)))


def growth_pct(a: float, b: float) -> float:
    return 100.0 * (b - a) / a if a else math.nan


def rss_at(samples: list[dict], n: int) -> dict:
    """The first sample taken with at least n calls finished (else the last)."""
    return next((s for s in samples if s["requests"] >= n), samples[-1])


def summarize(samples: list[dict], requests: int, target: float = GROWTH_TARGET) -> dict:
    """RSS (MiB) at the start, half and end of the calls; growth over the second half (%) against the target."""
    done = samples[-1]["requests"]
    start, half, end = samples[0], rss_at(samples, max(1, done // 2)), samples[-1]
    g = growth_pct(half["rss_mib"], end["rss_mib"])
    per_500 = 500 * (end["rss_mib"] - half["rss_mib"]) / max(1, end["requests"] - half["requests"])
    # a cache that frees entries as it fills makes a saw-tooth: the second half's peak must not outgrow the first's
    peaks = [max(s["rss_mib"] for s in samples if s["requests"] <= half["requests"]),
             max(s["rss_mib"] for s in samples if s["requests"] >= half["requests"])]
    peak = growth_pct(*peaks)
    return {"requests": done, "requests_asked": requests,
            "rss_mib": {"start": start["rss_mib"], "half": half["rss_mib"], "end": end["rss_mib"],
                        "peak_first_half": peaks[0], "peak_second_half": peaks[1]},
            "growth_total_pct": growth_pct(start["rss_mib"], end["rss_mib"]),
            "growth_second_half_pct": g, "peak_growth_pct": peak, "second_half_mib_per_500_requests": per_500,
            "target_pct": target, "met": met(g, peak, target) and done >= requests}


def met(growth: float, peak_growth: float, target: float) -> bool:
    """Levelled off: under `target` % both from half to end and from the first half's peak to the second's."""
    return bool(growth < target and peak_growth < target)


class Soak:
    """`streams` concurrent clients of one server until `requests` calls have finished, sampling its RSS."""

    def __init__(self, target: str, pid: int, args):
        self.target, self.proc, self.args = target, psutil.Process(pid), args
        self.lo, self.hi = args.prompt_range
        self.samples: list[dict] = []
        self.errors: Counter = Counter()
        self.tokens = 0
        self.next = self.done = 0
        self.t0 = time.monotonic()

    def rss_mib(self) -> float:
        """The server's resident memory with its processes' (the model process holds the weights and the KV
        cache; pages they share with the forkserver count in each)."""
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:  # the tokenizer worker may come and go
                pass
        return total / 2**20

    def sample(self) -> None:
        self.samples.append({"requests": self.done, "seconds": round(time.monotonic() - self.t0, 2),
                             "rss_mib": self.rss_mib()})

    def request(self, i: int, max_new_tokens: int | None = None, chars: int | None = None) -> pb.GenerateRequest:
        lo, hi = (chars, chars) if chars else (self.lo, self.hi)
        if max_new_tokens is None:  # uniform in the range, fixed per request index
            max_new_tokens = random.Random(self.args.seed * 1_000_003 + i + 7).randint(*self.args.new_range)
        return pb.GenerateRequest(prompt=prompt_text(i, lo, hi, self.args.seed), max_new_tokens=max_new_tokens)

    async def warm_up(self) -> int:
        """max_batch streams of the longest prompts, ending one after another: every decode batch size runs once
        (kernels made for a batch size are made once), and every KV cache row is written (the OS maps its pages
        on first touch) as far as the measured calls will."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
            n = max(1, int(info.max_batch))
            if self.hi + 2 > info.context_length:
                raise ValueError(f"--prompt-chars: {self.hi} characters may not fit the context "
                                 f"({info.context_length} tokens)")
            calls = [one_stream(stub, self.request(-1 - j, self.args.new_range[1] + j, self.hi), 600)
                     for j in range(n)]
            results = await asyncio.gather(*calls)
        self.errors.update(s.error for s in results if s.error)
        return n

    async def call(self, stub, i: int) -> None:
        s = await one_stream(stub, self.request(i), self.args.timeout)
        self.tokens += s.tokens
        if s.error:
            self.errors[s.error] += 1

    async def worker(self, mode: str, shared) -> None:
        every, deadline = self.args.sample_every, self.t0 + self.args.max_seconds
        while True:
            await self.issuing.wait()  # closed while the calls in flight drain for an idle sample
            if self.next >= self.args.requests or time.monotonic() >= deadline:
                break
            i, self.next = self.next, self.next + 1
            self.in_flight += 1
            try:
                if mode == "reused":
                    await self.call(shared, i)
                else:
                    async with grpc.aio.insecure_channel(self.target) as channel:
                        await self.call(pb_grpc.TextGenerationStub(channel), i)
            finally:
                self.in_flight -= 1
            self.done += 1
            if self.done % every == 0:
                if self.args.sample_at == "busy":
                    self.sample()
                    self.show()
                else:
                    self.issuing.clear()
            if not self.issuing.is_set() and self.in_flight == 0:  # the last call of a drain: the server is idle
                await asyncio.sleep(IDLE_WAIT)
                self.sample()
                self.show()
                self.issuing.set()

    def show(self) -> None:
        s = self.samples[-1]
        if self.args.progress and len(self.samples) % 5 == 1:
            print(f"    {s['requests']:6d} calls, {s['seconds']:7.1f} s: RSS {s['rss_mib']:7.1f} MiB", flush=True)

    async def run(self, mode: str) -> None:
        self.t0 = time.monotonic()
        self.issuing, self.in_flight = asyncio.Event(), 0
        self.issuing.set()
        self.sample()  # the start: after warm-up, before the measured calls
        async with grpc.aio.insecure_channel(self.target) as channel:
            shared = pb_grpc.TextGenerationStub(channel)
            await asyncio.gather(*(self.worker(mode, shared) for _ in range(self.args.streams)))
        if self.samples[-1]["requests"] != self.done:
            await asyncio.sleep(IDLE_WAIT)
            self.sample()


def soak_mode(mode: str, target: str, pid: int, args) -> dict:
    soak = Soak(target, pid, args)
    max_batch = asyncio.run(soak.warm_up())
    warm_rss = soak.rss_mib()
    asyncio.run(soak.run(mode))
    out = summarize(soak.samples, args.requests, args.target_growth)
    out.update(connections=mode, max_batch=max_batch, rss_after_warmup_mib=warm_rss,
               seconds=soak.samples[-1]["seconds"], tokens=soak.tokens, errors=dict(soak.errors),
               samples=soak.samples)
    return out


def show(label: str, r: dict) -> None:
    m = r["rss_mib"]
    err = f", errors {r['errors']}" if r["errors"] else ""
    print(f"  {label} ({r['connections']} connections): {r['requests']} calls in {r['seconds']:.0f} s; RSS start "
          f"{m['start']:.0f} MiB, half {m['half']:.0f}, end {m['end']:.0f}; growth over the second half "
          f"{r['growth_second_half_pct']:+.1f}% ({r['second_half_mib_per_500_requests']:+.1f} MiB per 500 calls; "
          f"peak {m['peak_first_half']:.0f} -> {m['peak_second_half']:.0f} MiB, {r['peak_growth_pct']:+.1f}%; "
          f"target < {r['target_pct']:g}%: {'met' if r['met'] else 'not met'}){err}", flush=True)


def plot(runs: list[dict], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in runs:
        xs = [s["requests"] for s in r["samples"]]
        line, = ax.plot(xs, [s["rss_mib"] for s in r["samples"]], marker=".",
                        label=f"{r['connections']} connections: {r['growth_second_half_pct']:+.1f}% over 2nd half")
        ax.axvline(r["requests"] / 2, color=line.get_color(), alpha=0.3, linestyle=":")
    ax.set_xlabel("calls finished")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    add_model_source(p, target=False)
    p.add_argument("--backend", default="torch", choices=list(SERVED))
    p.add_argument("--streams", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4000, help="calls per connection mode")
    p.add_argument("--connections", default="both", choices=[*MODES, "both"])
    p.add_argument("--max-new-tokens", default="8,24",
                   help="tokens per call: N, or min,max (uniform per call, so that calls end at different steps)")
    p.add_argument("--prompt-chars", default="4,400", help="min,max prompt length in characters (log-uniform)")
    p.add_argument("--sample-every", type=int, default=0, help="RSS sample every N calls (default: requests/40)")
    p.add_argument("--sample-at", default="idle", choices=["idle", "busy"],
                   help="idle: stop issuing calls at each sample until those in flight have finished, so that the "
                   "RSS holds no forward pass's activations; busy: sample as the calls go on")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="per mode: stop issuing calls after this")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each call (s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="server threads")
    p.add_argument("--max-batch", type=int, help="server slots (default: the server's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-growth", type=float, default=GROWTH_TARGET, help="%% over the second half")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines")
    p.add_argument("--out", default=str(BENCH_DIR / "soak.json"))
    p.add_argument("--cache", default=str(BENCH_DIR), help="where preset checkpoints and ONNX exports are kept")
    return p


def options(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed and checked options (ValueError on a bad one), as soak_mode takes them."""
    args = build_parser().parse_args(argv)
    args.prompt_range = tuple(parse_list(args.prompt_chars, int, name="prompt-chars"))
    if len(args.prompt_range) != 2 or not 1 <= args.prompt_range[0] <= args.prompt_range[1]:
        raise ValueError(f"--prompt-chars: expected min,max with 1 <= min <= max, got {args.prompt_chars!r}")
    new = parse_list(args.max_new_tokens, int, name="max-new-tokens")
    args.new_range = (new[0], new[-1])
    if len(new) > 2 or not 1 <= new[0] <= new[-1]:
        raise ValueError(f"--max-new-tokens: expected N or min,max with 1 <= min <= max, got {args.max_new_tokens!r}")
    if min(args.streams, args.requests) < 1 or args.sample_every < 0:
        raise ValueError("--streams and --requests must be >= 1")
    args.sample_every = args.sample_every or max(1, args.requests // 40)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = options(argv)
        checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.preset, Path(args.cache))
        kind, directory = backend_dir(args.backend, checkpoint, Path(args.cache))
        runs = []
        out = Path(args.out)
        for mode in (MODES if args.connections == "both" else (args.connections,)):
            print(f"{args.backend}, {mode} connections: starting a server ({args.threads} thread(s)); {args.streams} "
                  f"streams, {args.requests} calls ...", flush=True)
            server = Server(kind, directory, args.device, args.threads, args.max_batch,
                            out.parent / f"soak-server-{args.backend}-{mode}.log", server_flags(args.backend))
            try:
                run = soak_mode(mode, server.target, server.proc.pid, args)
            finally:
                server.stop()
            show(args.backend, run)
            runs.append(run)
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"bench_soak: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"bench_soak: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    name = args.preset or checkpoint.resolve().name
    write_json(out, {"machine": machine(), "model": name, "backend": args.backend, "streams": args.streams,
                     "max_new_tokens": list(args.new_range), "prompt_chars": list(args.prompt_range),
                     "threads": args.threads, "sample_at": args.sample_at, "runs": runs})
    png = plot(runs, f"µLM soak: {name} ({args.backend}), {args.streams} streams, prompts of "
                     f"{args.prompt_range[0]}-{args.prompt_range[1]} chars", out.with_suffix(".png"))
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
