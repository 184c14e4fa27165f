"""Other calls' latency while a server handles very large requests (a prompt or a text to tokenize near the
message size limit).

  python -m bench.large_input [--preset small | --checkpoint DIR | --target HOST:PORT] [--mb 3.9]
                                      [--seconds 5] [--out build/bench/large_input.json]

A probe calls GetModelInfo back to back (and a greedy stream decodes beside it) for --seconds with nothing
else running, then again while large Generate and Tokenize requests are sent one after another. It prints
the probe's latency (p50, p99, max) in both phases and the large requests' own times; the target is a p99 no
more than 5 ms above the quiet one.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench.common import BENCH_DIR, add_model_source, ensure_checkpoint, machine
from bench.serving import Server
from clients.load import pct
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.util import write_json

P99_SLACK_MS = 5.0


async def probe(stub, stop: asyncio.Event) -> list[float]:
    """Seconds of each GetModelInfo call until `stop`."""
    times = []
    while not stop.is_set():
        t = time.perf_counter()
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        times.append(time.perf_counter() - t)
    return times


async def stream(stub, stop: asyncio.Event) -> int:
    """Greedy streams back to back until `stop`; the tokens they received."""
    tokens = 0
    while not stop.is_set():
        async for m in stub.Generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=32), timeout=60):
            tokens += len(m.token_ids)
    return tokens


async def large_requests(target: str, text: str, seconds: float) -> dict[str, list[float]]:
    """A large prompt (refused: it cannot fit) and a large Tokenize, in turn, for `seconds`: their seconds."""
    times: dict[str, list[float]] = {"generate": [], "tokenize": []}
    end = time.monotonic() + seconds
    limit = 64 * 2**20  # the client takes whatever the server answers
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                async for _ in stub.Generate(pb.GenerateRequest(prompt=text, max_new_tokens=1), timeout=120):
                    pass
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
            times["generate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await stub.Tokenize(pb.TokenizeRequest(text=text), timeout=120)
            times["tokenize"].append(time.perf_counter() - t)
    return times


def send_large(target: str, text: str, seconds: float, results) -> None:
    """In a process of its own: the client's work on large messages must not delay the probe's."""
    results.put(asyncio.run(large_requests(target, text, seconds)))


async def phase(target: str, seconds: float, text: str | None) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(probe(stub, stop)), asyncio.create_task(stream(stub, stop))]
        sender = None
        if text is not None:
            results = multiprocessing.get_context("spawn").Queue()
            sender = multiprocessing.get_context("spawn").Process(target=send_large,
                                                                  args=(target, text, seconds, results))
            sender.start()
        await asyncio.sleep(seconds)
        stop.set()
        probe_s, tokens = await asyncio.gather(*tasks)
    ms = [1e3 * t for t in probe_s]
    res = {"probe_ms": {"p50": pct(ms, 50), "p99": pct(ms, 99), "max": max(ms), "calls": len(ms)},
           "stream_tokens_per_s": tokens / seconds}
    if sender is not None:
        large = await asyncio.get_running_loop().run_in_executor(None, results.get, True, 300)
        sender.join(30)
        res["large_s"] = {k: {"median": statistics.median(v) if v else None, "count": len(v)}
                          for k, v in large.items()}
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.large_input", description=__doc__.splitlines()[0])
    add_model_source(p, target=True, default_preset="small")
    p.add_argument("--mb", type=float, default=3.9, help="size of the large requests' text, in MB")
    p.add_argument("--seconds", type=float, default=5.0, help="each phase's length")
    p.add_argument("--out", default=str(BENCH_DIR / "large_input.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    text = ("All the world's a stage, and all the men and women merely players. " * 60_000)[:int(args.mb * 1e6)]
    server = None
    try:
        if args.target:
            target = args.target
        else:
            checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.preset)
            server = Server("torch", checkpoint, "cpu", 0, None, Path(args.out).with_suffix(".server.log"))
            target = server.target
        quiet = asyncio.run(phase(target, args.seconds, None))
        loaded = asyncio.run(phase(target, args.seconds, text))
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"bench_large_input: error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"bench_large_input: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    host = machine()
    print(f"host: {host['cpu']}; text {len(text) / 1e6:.1f} MB")
    for name, r in (("quiet", quiet), ("large requests", loaded)):
        p = r["probe_ms"]
        print(f"  {name:<15} GetModelInfo p50 {p['p50']:7.2f} p99 {p['p99']:7.2f} max {p['max']:8.2f} ms "
              f"({p['calls']} calls); stream {r['stream_tokens_per_s']:.0f} tokens/s")
    for k, v in loaded["large_s"].items():
        print(f"  large {k}: median {v['median'] or float('nan'):.2f} s over {v['count']}")
    extra = loaded["probe_ms"]["p99"] - quiet["probe_ms"]["p99"]
    met = extra <= P99_SLACK_MS
    print(f"  p99 during large requests {extra:+.2f} ms over quiet (target <= {P99_SLACK_MS:g}): "
          f"{'met' if met else 'not met'}")
    write_json(Path(args.out), {"machine": host, "mb": args.mb, "quiet": quiet, "large": loaded,
                                "p99_extra_ms": extra, "met": met})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
