"""Test helpers: a small random checkpoint, and real servers on loopback ports (in-process or `python -m server`)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.__main__ import build_app, build_parser
from ulm.checkpoint import save_checkpoint
from ulm.config import gpt_preset
from ulm.model import GPT

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 512  # the toy preset with a longer context, so that long generations can be cut short
LONG = 4000  # new tokens under the default --max-new-tokens (4096): a second or more, even for a fast toy model


def make_toy_checkpoint(directory: Path, seed: int = 0, **shape) -> Path:
    """The toy preset (with a longer context), random init; `shape`: other GPTConfig fields."""
    torch.manual_seed(seed)
    return save_checkpoint(directory, GPT(gpt_preset("toy", block_size=CONTEXT, **shape)), extra={"preset": "toy"})


def own_data_root(argv: list[str]) -> list[str]:
    """argv with a fresh temporary --data-root unless it names one: a data root serves one server at a time."""
    if any(a == "--data-root" or a.startswith("--data-root=") for a in argv):
        return argv
    return [*argv, "--data-root", tempfile.mkdtemp(prefix="ulm-root-", dir=os.environ.get("ULM_CACHE_DIR"))]


def wait_serving(target: str, timeout: float = 60.0) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {target} did not report SERVING within {timeout} s")
            time.sleep(0.05)


class InProcessServer:
    """The server's App (as `python -m server` builds it) on its own event loop in a background thread."""

    def __init__(self, argv: list[str]):
        args = build_parser().parse_args([*own_data_root(argv), "--port", "0", "--metrics-port", "0"])
        self.app = build_app(args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        self.run(self.app.start(), timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.run(self.app.shutdown(grace=5), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def run(self, coro, timeout: float = 10):
        """Run a coroutine on the server's loop (where all scheduler state lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        """The HTTP face's base URL (argv must include --http-port)."""
        return f"http://127.0.0.1:{self.app.http_port}"

    @property
    def engine(self):
        """The default model's engine."""
        return next(s for s in self.app.services if s.name == "ulm.v1.TextGeneration").engine

    @property
    def scheduler(self):
        return self.engine.scheduler

    def model_process_info(self, engine=None) -> dict:
        """What the model process of `engine` (the default model's) reports: its torch threads, its ONNX Runtime
        session's intra-op threads."""
        return self.run((engine or self.engine).runner.info())

    def metric(self, name: str, **labels) -> float:
        return self.app.metrics.value(name, labels)

    def wait_until(self, predicate, timeout: float = 5.0) -> bool:
        """Poll `predicate()` (evaluated on the server loop) until true."""
        async def check():
            return predicate()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(check()):
                return True
            time.sleep(0.01)
        return False


class SubprocessServer:
    """`python -m server ... --port 0 --metrics-port 0`; the ports are read from its log."""

    def __init__(self, argv: list[str]):
        cmd = [sys.executable, "-m", "server", *own_data_root(argv), "--port", "0", "--metrics-port", "0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[str] = []
        self.port = self.metrics_port = self.http_port = None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"metrics on http://[\d.]+:(\d+)", line):
                self.metrics_port = int(m.group(1))
            if m := re.search(r"http on https?://[\d.]+:(\d+)", line):  # with --http-port
                self.http_port = int(m.group(1))
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_serving(self.target)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
