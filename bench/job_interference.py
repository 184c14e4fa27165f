"""What a training job costs the streams a server is serving: inter-token latency and tokens/s with and without
a job running.

  python -m bench.job_interference [--preset small | --checkpoint DIR] [--streams 4] [--max-new-tokens 64]
                                   [--rounds 3] [--job-threads 1] [--threads 0]
                                   [--out build/bench/job_interference.json]

One server (`python -m server`, a fresh data root in a temporary folder) serves the model; a text (tinyshakespeare
from ../shared/data when it is there, else a generated one) is uploaded and built into a char dataset through the
API. Then rounds alternate: C concurrent greedy streams with no job, then the same with a training job running
(the job started once and left running; --job-threads is the server's flag: the cores a job takes), and the
medians of each phase are compared. The job is cancelled at the end. Writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import BENCH_DIR, ROOT, add_model_source, ensure_checkpoint, machine, save_figure
from bench.serving import Server
from clients.load import run_level
from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc, jobs_pb2_grpc
from protos.ulm.v1 import files_pb2 as fpb
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.util import write_json

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
JOB_OVERRIDES = ["max_iters=1000000", "eval_interval=1000000", "log_interval=20"]  # runs until cancelled


def corpus() -> bytes:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_bytes()
    words = "the of and to a in that is was he for it with as his on be at by".split()
    return " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(200_000)).encode()


def prepare(channel: grpc.Channel) -> None:
    """Upload the text and build the char dataset `bench` through the API."""
    data = corpus()
    header = fpb.UploadFileRequest(header=fpb.UploadFileHeader(name="bench.txt", size_bytes=len(data)))
    chunks = (fpb.UploadFileRequest(chunk=data[i:i + 2**20]) for i in range(0, len(data), 2**20))
    files_pb2_grpc.FilesStub(channel).UploadFile(iter([header, *chunks]), timeout=60)
    job = datasets_pb2_grpc.DatasetsStub(channel).CreateDataset(dpb.CreateDatasetRequest(
        name="bench", sources=[dpb.DatasetSource(file="bench.txt")], tokenizer="char"), timeout=30)
    if wait_state(channel, job.name, {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED}) != jpb.JOB_STATE_SUCCEEDED:
        raise RuntimeError("the dataset job failed")


def wait_state(channel: grpc.Channel, name: str, states: set[int], timeout: float = 300) -> int:
    jobs = jobs_pb2_grpc.JobsStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.GetJob(jpb.GetJobRequest(name=name), timeout=10)
        if job.state in states and (job.state != jpb.JOB_STATE_RUNNING or job.progress.step > 0):
            return job.state
        time.sleep(0.2)
    raise TimeoutError(f"job {name} did not reach {states} in {timeout} s")


async def phase(target: str, streams: int, max_new_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        return await run_level(pb_grpc.TextGenerationStub(channel), streams, max_new_tokens)


def run(target: str, args) -> dict:
    """Rounds of quiet then busy phases; the job starts before the first busy phase and runs to the end."""
    results: dict[str, list[dict]] = {"quiet": [], "busy": []}
    asyncio.run(phase(target, 1, 8))  # warm up
    with grpc.insecure_channel(target) as channel:
        prepare(channel)
        jobs = jobs_pb2_grpc.JobsStub(channel)
        job = None
        try:
            for r in range(args.rounds):
                if job is not None:  # a quiet phase needs the job gone: cancel, measure, resume
                    jobs.CancelJob(jpb.CancelJobRequest(name=job.name), timeout=60)
                    wait_state(channel, job.name, {jpb.JOB_STATE_CANCELLED})
                results["quiet"].append(asyncio.run(phase(target, args.streams, args.max_new_tokens)))
                job = start_or_resume(jobs, job)
                wait_state(channel, job.name, {jpb.JOB_STATE_RUNNING})
                results["busy"].append(asyncio.run(phase(target, args.streams, args.max_new_tokens)))
                print(f"  round {r + 1}/{args.rounds}: ITL p50 quiet {results['quiet'][-1]['itl_ms']['p50']:.2f} "
                      f"ms, with a job {results['busy'][-1]['itl_ms']['p50']:.2f} ms", flush=True)
        finally:
            if job is not None:
                jobs.CancelJob(jpb.CancelJobRequest(name=job.name), timeout=60)
    return {name: summary(rounds) for name, rounds in results.items()}


def start_or_resume(jobs, job: jpb.Job | None) -> jpb.Job:
    if job is not None:
        return jobs.ResumeJob(jpb.ResumeJobRequest(name=job.name), timeout=30)
    return jobs.StartTraining(jpb.StartTrainingRequest(dataset="bench", recipe="shakespeare-char", model="bench-run",
                                                       overrides=JOB_OVERRIDES, seed=1), timeout=30)


def summary(rounds: list[dict]) -> dict:
    return {"itl_ms_p50": statistics.median(r["itl_ms"]["p50"] for r in rounds),
            "itl_ms_p95": statistics.median(r["itl_ms"]["p95"] for r in rounds),
            "ttft_ms_p50": statistics.median(r["ttft_ms"]["p50"] for r in rounds),
            "tokens_per_s": statistics.median(r["aggregate_tokens_per_s"] for r in rounds),
            "errors": sum(sum(r["errors"].values()) for r in rounds), "rounds": rounds}


def show(result: dict, streams: int) -> None:
    q, b = result["quiet"], result["busy"]
    print(f"\n{streams} streams, medians of {len(q['rounds'])} rounds   no job    with a training job   ratio")
    for key, label in (("itl_ms_p50", "ITL p50 (ms)"), ("itl_ms_p95", "ITL p95 (ms)"),
                       ("ttft_ms_p50", "TTFT p50 (ms)"), ("tokens_per_s", "tokens/s")):
        print(f"  {label:<36}{q[key]:>9.2f}{b[key]:>22.2f}{b[key] / q[key]:>8.2f}x")
    print(f"  errors: {q['errors']} without a job, {b['errors']} with one")


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in zip(axes, ("itl_ms_p50", "tokens_per_s"), ("inter-token latency p50 (ms)", "tokens/s")):
        ax.bar(["no job", "training job"], [result["quiet"][key], result["busy"][key]], color=["C0", "C1"])
        ax.set_title(label)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.job_interference", description=__doc__.splitlines()[0])
    add_model_source(p, target=False, default_preset="small")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--job-threads", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="the server's model threads; 0 (its default) sizes them "
                   "by the cores the jobs leave, N keeps N whatever runs")
    p.add_argument("--out", default=str(BENCH_DIR / "job_interference.json"))
    args = p.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(args.preset)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="ulm-bench-root-") as root:
        server = Server("torch", checkpoint, "cpu", args.threads, None, out.with_name("server-job_interference.log"),
                        ("--data-root", root, "--job-threads", str(args.job_threads)))
        try:
            result = run(server.target, args)
        finally:
            server.stop()
    show(result, args.streams)
    write_json(out, {"machine": machine(), "model": str(checkpoint), "streams": args.streams, "threads": args.threads,
                     "max_new_tokens": args.max_new_tokens, "job_threads": args.job_threads, **result})
    print(f"wrote {out} and {plot(result, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
