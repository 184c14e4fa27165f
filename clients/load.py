"""Load generation over the wire: concurrent streaming Generate calls and their latency figures (stubs only)."""
from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc

PROMPT = "Once upon a time"


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation, as numpy's default); NaN for no values."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Stream:
    ttft: float = math.nan  # seconds from the call to the first token
    gaps: list[float] = field(default_factory=list)  # one inter-token latency per token after the first
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None  # status code name
    last: float = 0.0  # when the latest message came

    def arrived(self, n: int, now: float, t0: float) -> None:
        """A message of n tokens came at `now` (the call started at t0): a message carries a decode pass's tokens
        (the server's --stream-interval), so its gap is shared among them."""
        if not n:
            return
        if self.tokens == 0:
            self.ttft = now - t0
            self.gaps += [0.0] * (n - 1)
        else:
            self.gaps += [(now - self.last) / n] * n
        self.tokens, self.last = self.tokens + n, now


async def one_stream(stub, request: pb.GenerateRequest, timeout: float | None) -> Stream:
    """One streaming call's timings (Stream.arrived per message)."""
    s = Stream()
    t0 = time.perf_counter()
    try:
        async for msg in stub.Generate(request, timeout=timeout):
            s.arrived(len(msg.token_ids), time.perf_counter(), t0)
    except grpc.RpcError as e:
        s.error = e.code().name
    s.seconds = time.perf_counter() - t0
    return s


async def run_round(stub, concurrency: int, request: pb.GenerateRequest,
                    timeout: float | None = 600) -> tuple[list[Stream], float]:
    """`concurrency` simultaneous streams: (their results, wall seconds from the first call to the last token)."""
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(stub, request, timeout) for _ in range(concurrency)))
    return list(streams), time.perf_counter() - t0


def summarize(concurrency: int, max_new_tokens: int, rounds: list[tuple[list[Stream], float]]) -> dict:
    """Latency percentiles over every stream of every round; throughputs are medians over rounds."""
    streams = [s for batch, _ in rounds for s in batch]
    ok = [s for s in streams if s.error is None]
    ttft = [s.ttft for s in ok]
    gaps = [g for s in ok for g in s.gaps]
    rates = [sum(s.tokens for s in batch) / wall for batch, wall in rounds]
    return {
        "concurrency": concurrency, "streams": len(streams), "max_new_tokens": max_new_tokens,
        "ttft_ms": {"p50": 1e3 * pct(ttft, 50), "p95": 1e3 * pct(ttft, 95)},
        "itl_ms": {"p50": 1e3 * pct(gaps, 50), "p95": 1e3 * pct(gaps, 95)},
        "aggregate_tokens_per_s": statistics.median(rates),
        "per_stream_tokens_per_s": statistics.median(s.tokens / s.seconds for s in ok) if ok else 0.0,
        "tokens": sum(s.tokens for s in streams), "wall_s": statistics.median(wall for _, wall in rounds),
        "errors": dict(Counter(s.error for s in streams if s.error is not None)),
        "rounds": [{"aggregate_tokens_per_s": rate, "itl_ms_p50": 1e3 * pct([g for s in batch for g in s.gaps], 50)}
                   for rate, (batch, _) in zip(rates, rounds)],
    }


async def run_level(stub, concurrency: int, max_new_tokens: int, prompt: str = PROMPT, rounds: int = 1) -> dict:
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens)
    return summarize(concurrency, max_new_tokens, [await run_round(stub, concurrency, request) for _ in range(rounds)])


async def sweep(target: str, levels: list[int], max_new_tokens: int, prompt: str = PROMPT, rounds: int = 3,
                in_process=None, progress=None, sampling: dict | None = None) -> tuple[dict, list[dict], list[float]]:
    """(the server's ModelInfo as a dict, one result per concurrency level, in-process seconds per token).

    Rounds go over every level in turn, so that the machine's drift over time (load, memory bandwidth) touches
    all levels alike; `in_process()` (a run of the same backend in this process, timed in seconds per token)
    goes right before and right after each round's single stream, while the server is idle, and the stream is
    compared with their mean (the machine drifts within seconds). `sampling`: GenerateRequest fields
    (temperature, top_k, top_p); greedy without them."""
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, **(sampling or {}))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        await run_level(stub, 1, min(8, max_new_tokens), prompt)  # warm the connection and the server
        done: dict[int, list] = {c: [] for c in levels}
        local: list[float] = []
        for r in range(rounds):
            for c in levels:
                before = in_process() if c == 1 and in_process is not None else None
                done[c].append(await run_round(stub, c, request))
                if before is not None:
                    local.append((before + in_process()) / 2)
                if progress:
                    progress(r, c)
    info = {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}
    return info, [summarize(c, max_new_tokens, done[c]) for c in levels], local
