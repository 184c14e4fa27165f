"""What HTTP/SSE costs over gRPC: the same greedy streams over the three faces of one server.

  python -m bench.http_vs_grpc --preset gpt2-small | --checkpoint DIR [--streams 1,16] [--max-new-tokens 64]
      [--rounds 3] [--threads N] [--max-batch N] [--device cpu|cuda] [--prompt TEXT]
      [--out build/bench/http_vs_grpc.json] [--cache build/bench]

One server (`python -m server --http-port 0`: gRPC and HTTP on the same event loop, the same model) serves every
path: gRPC (the stubs, grpc.aio), the native SSE stream (POST /ulm/v1/generate) and the OpenAI-compatible one
(POST /v1/completions with stream: true), both read with httpx. Per level of C concurrent streams (the same prompt
and max tokens, greedy): aggregate tokens/s (all tokens / wall time of the round), inter-token latency p50/p99
and time to first token. Rounds go over every level and path in turn, the paths' order rotating from round to
round (the machine drifts); the ratios are medians of per-round ratios, each of figures taken back to back.

A message may carry several tokens (a client that lags gets those waiting in one): its gap is shared among them.
The OpenAI chunks carry no token ids, so there the gap is per chunk (one token unless the client lagged) and the
token count is the usage chunk's. Target: at 16 streams, each SSE path costs at most 10% over gRPC, cost =
gRPC tokens/s / SSE tokens/s - 1. Writes JSON and a PNG plot (next to the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx

from bench.common import BENCH_DIR, add_model_source, check_device, ensure_checkpoint, machine, parse_list, save_figure
from bench.serving import Server
from clients.load import PROMPT, Stream, one_stream, pct
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.util import write_json

PATHS = ("grpc", "sse", "openai")
LABELS = {"grpc": "gRPC stream", "sse": "SSE /ulm/v1/generate", "openai": "SSE /v1/completions"}
COST_TARGET, TARGET_STREAMS = 0.10, 16
TIMEOUT_S = 600


# -- one stream per path -------------------------------------------------------------------------------------

async def sse_stream(client: httpx.AsyncClient, url: str, body: dict, tokens_of) -> Stream:
    """One SSE call: `tokens_of(event, stream)` says how many tokens an event's JSON carries (0: none)."""
    s = Stream()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}"
                await r.aread()
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                s.arrived(tokens_of(json.loads(line[5:]), s), now, t0)
    except httpx.HTTPError as e:
        s.error = type(e).__name__
    s.seconds = time.perf_counter() - t0
    return s


def native_tokens(event: dict, s: Stream) -> int:
    if "error" in event:
        s.error = event["error"].get("code", "error")
    return len(event.get("token_ids", ()))


def openai_tokens(event: dict, s: Stream) -> int:
    if "error" in event:
        s.error = event["error"].get("code", "error")
    if event.get("usage"):  # the last chunk: the exact count, in place of one a chunk
        s.tokens = event["usage"]["completion_tokens"]
    return 1 if event.get("choices") else 0


class Paths:
    """The three ways to one server's streams, with their clients open."""

    def __init__(self, grpc_target: str, http_url: str, prompt: str, max_new_tokens: int):
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.http = httpx.AsyncClient(base_url=http_url, timeout=TIMEOUT_S,
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    def one(self, path: str, max_new_tokens: int | None = None):
        n = max_new_tokens or self.max_new_tokens
        if path == "grpc":
            request = pb.GenerateRequest(prompt=self.prompt, max_new_tokens=n, temperature=0)
            return one_stream(self.stub, request, TIMEOUT_S)
        if path == "sse":
            body = {"prompt": self.prompt, "max_new_tokens": n, "temperature": 0}
            return sse_stream(self.http, "/ulm/v1/generate", body, native_tokens)
        body = {"model": "", "prompt": self.prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        return sse_stream(self.http, "/v1/completions", body, openai_tokens)

    async def round(self, path: str, streams: int) -> tuple[list[Stream], float]:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(self.one(path) for _ in range(streams)))
        return list(done), time.perf_counter() - t0


# -- the sweep -----------------------------------------------------------------------------------------------

async def sweep(paths: Paths, levels: list[int], rounds: int) -> dict[str, dict[int, list]]:
    """{path: {streams: [(streams' results, wall seconds) per round]}}; the paths' order rotates per round."""
    for path in PATHS:  # warm the connections and the server's code paths
        await asyncio.gather(*(paths.one(path, min(8, paths.max_new_tokens)) for _ in range(max(levels))))
    done: dict[str, dict[int, list]] = {p: {c: [] for c in levels} for p in PATHS}
    for r in range(rounds):
        for c in levels:
            for path in PATHS[r % 3:] + PATHS[:r % 3]:
                done[path][c].append(await paths.round(path, c))
            print(f"  round {r + 1}/{rounds}: {c} stream(s)", flush=True)
    return done


def summarize(streams: int, rounds: list[tuple[list[Stream], float]]) -> dict:
    ok = [s for batch, _ in rounds for s in batch if s.error is None]
    gaps = [g for s in ok for g in s.gaps]
    rates = [sum(s.tokens for s in batch) / wall for batch, wall in rounds]
    errors = [s.error for batch, _ in rounds for s in batch if s.error is not None]
    return {"streams": streams, "aggregate_tokens_per_s": statistics.median(rates),
            "itl_ms": {"p50": 1e3 * pct(gaps, 50), "p99": 1e3 * pct(gaps, 99)},
            "ttft_ms": {"p50": 1e3 * pct([s.ttft for s in ok], 50)}, "tokens": sum(s.tokens for s in ok),
            "errors": {e: errors.count(e) for e in set(errors)},
            "rounds": [{"aggregate_tokens_per_s": rate, "itl_ms_p50": 1e3 * pct([g for s in b for g in s.gaps], 50)}
                       for rate, (b, _) in zip(rates, rounds)]}


def compare(levels: dict[str, list[dict]]) -> list[dict]:
    """Per SSE path and level: medians of per-round ratios to gRPC (tokens/s cost, ITL p50), and the target."""
    out = []
    for path in PATHS[1:]:
        for base, lv in zip(levels["grpc"], levels[path]):
            pairs = list(zip(base["rounds"], lv["rounds"]))
            cost = statistics.median(b["aggregate_tokens_per_s"] / r["aggregate_tokens_per_s"] - 1 for b, r in pairs)
            itl = statistics.median(r["itl_ms_p50"] / b["itl_ms_p50"] for b, r in pairs)
            row = {"path": path, "streams": lv["streams"], "cost": cost, "itl_p50_ratio": itl}
            if lv["streams"] == TARGET_STREAMS:
                row.update(target=COST_TARGET, met=cost <= COST_TARGET)
            out.append(row)
    return out


# -- report --------------------------------------------------------------------------------------------------

def show(levels: dict[str, list[dict]], ratios: list[dict]) -> None:
    print(f"  {'path':<22} {'streams':>7} {'tok/s':>9} {'ITL p50':>9} {'ITL p99':>9} {'TTFT p50':>9}  errors")
    for path in PATHS:
        for lv in levels[path]:
            print(f"  {LABELS[path]:<22} {lv['streams']:>7} {lv['aggregate_tokens_per_s']:>9.1f} "
                  f"{lv['itl_ms']['p50']:>7.2f}ms {lv['itl_ms']['p99']:>7.2f}ms {lv['ttft_ms']['p50']:>7.1f}ms  "
                  f"{lv['errors'] or ''}")
    for r in ratios:
        verdict = (f" (target <= {100 * r['target']:g}%: {'met' if r['met'] else 'NOT met'})" if "target" in r
                   else "")
        print(f"  {LABELS[r['path']]} over gRPC at {r['streams']} stream(s): cost {100 * r['cost']:+.1f}% tokens/s, "
              f"ITL p50 x{r['itl_p50_ratio']:.2f}{verdict}")


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    levels = result["levels"]
    streams = [lv["streams"] for lv in levels["grpc"]]
    width = 0.8 / len(PATHS)
    for i, p in enumerate(PATHS):
        xs = [j + (i - 1) * width for j in range(len(streams))]
        axes[0].bar(xs, [lv["aggregate_tokens_per_s"] for lv in levels[p]], width, label=LABELS[p])
        axes[1].bar(xs, [lv["itl_ms"]["p50"] for lv in levels[p]], width, label=f"{LABELS[p]} p50")
        axes[1].scatter(xs, [lv["itl_ms"]["p99"] for lv in levels[p]], marker="_", s=200, color="black")
    for ax, title in zip(axes, ("aggregate tokens/s", "inter-token latency (ms; bar p50, dash p99)")):
        ax.set_xticks(range(len(streams)), [f"{c} stream(s)" for c in streams])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"µLM: gRPC vs HTTP/SSE, {result['model']} on {result['device']}, "
                 f"{result['max_new_tokens']} new tokens per stream, greedy")
    return save_figure(fig, path)


# -- main ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.http_vs_grpc", description=__doc__.splitlines()[0])
    add_model_source(p, target=False, default_preset="gpt2-small")
    p.add_argument("--streams", default="1,16", help="comma-separated counts of concurrent streams")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--rounds", type=int, default=3, help="each round runs every level over every path once")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="server threads")
    p.add_argument("--max-batch", type=int, help="server slots (default: the server's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(BENCH_DIR / "http_vs_grpc.json"))
    p.add_argument("--cache", default=str(BENCH_DIR), help="where preset checkpoints are kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        levels = parse_list(args.streams, int, name="streams")
        if min(levels) < 1 or args.max_new_tokens < 1 or args.rounds < 1:
            raise ValueError("--streams, --max-new-tokens and --rounds must be >= 1")
        check_device(args.device, ["torch"])
        checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.preset, Path(args.cache))
        result = run(checkpoint, levels, args)
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"bench_http_vs_grpc: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return 0


def run(checkpoint: Path, levels: list[int], args) -> dict:
    host = machine()
    print(f"host: {host['cpu']}, {host['cpus']} CPUs (load {host['load_avg_1m']}); starting a server ({args.device}, "
          f"{args.threads} thread(s)) with gRPC and HTTP ...", flush=True)
    log = Path(args.out).parent / "server-http_vs_grpc.log"
    server = Server("torch", checkpoint, args.device, args.threads, args.max_batch, log, ("--http-port", "0"))
    try:
        m = re.search(r"http on (https?://[\d.]+:\d+)", log.read_text())
        if m is None:
            raise RuntimeError(f"the server logged no HTTP address; log: {log}")
        done = asyncio.run(measure(server.target, m.group(1), levels, args))
    finally:
        server.stop()
    by_path = {p: [summarize(c, done[p][c]) for c in levels] for p in PATHS}
    ratios = compare(by_path)
    show(by_path, ratios)
    return {"machine": host, "device": args.device, "threads": args.threads, "model": checkpoint.name,
            "checkpoint": str(checkpoint), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds, "levels": by_path, "ratios": ratios}


async def measure(grpc_target: str, http_url: str, levels: list[int], args) -> dict:
    paths = Paths(grpc_target, http_url, args.prompt, args.max_new_tokens)  # on this loop: grpc.aio binds to it
    try:
        return await sweep(paths, levels, args.rounds)
    finally:
        await paths.close()


if __name__ == "__main__":
    sys.exit(main())
