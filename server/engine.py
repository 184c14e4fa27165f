"""The model side of text generation: the model process (backend, forward passes) and the scheduler.

Loading, thread sizing and warm-up run in the model process (server.model_process), which later runs every
forward pass; this process keeps the backend's description (tokenizer, config). Submitting, cancelling and
draining go to the scheduler, on token ids. A server may run several engines (one per loaded model,
server/models.py); their schedulers share the server's gauges.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from server.metrics import Metrics
from server.model_process import BackendInfo, ProcessRunner
from server.scheduler import Scheduler
from server.sequence import Listener, Sequence, TokenRequest
from ulm.tokenizer import Tokenizer
from ulm.util import usable_cores


@dataclass
class EngineSettings:
    backend: str  # a name in server.backends.BACKENDS
    checkpoint: str
    device: str
    max_batch: int  # sequences decoded together (KV cache slots)
    max_queue: int  # sequences that may wait for a slot
    threads: int  # the model's threads; 0 = one per core
    quantize: str | None = None  # "int8": the torch backend's Linear weights in int8 (ulm.quantize)
    stream_interval: int = 1  # the most decode steps, hence new tokens per stream, between two looks at the streams


class GaugeShare:
    """One engine's part of a server-wide gauge: it moves the gauge by its own change, so the gauge holds the sum
    over every loaded model (queue depth, running requests)."""

    def __init__(self, gauge):
        self.gauge, self.value = gauge, 0.0

    def set(self, value: float) -> None:
        self.gauge.inc(value - self.value)
        self.value = value


class EngineMetrics:
    """The server's metrics as one engine's scheduler sees them: its gauges are shares, the rest is the server's."""

    def __init__(self, metrics: Metrics):
        self.server = metrics
        self.queue_depth = GaugeShare(metrics.queue_depth)
        self.running = GaugeShare(metrics.running)

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def clear(self) -> None:
        self.queue_depth.set(0)
        self.running.set(0)


class Engine:
    def __init__(self, settings: EngineSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = EngineMetrics(metrics)
        self.backend: BackendInfo | None = None  # set once loaded and warmed up
        self.scheduler: Scheduler | None = None  # set once it runs

    @property
    def tokenizer(self) -> Tokenizer:
        return self.backend.tokenizer

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    async def start(self) -> None:
        """Load the model in a process of its own (server.model_process), then start scheduling."""
        self.runner, self.backend = await ProcessRunner.start(self.settings)
        self.scheduler = Scheduler(self.runner, self.backend.max_batch, self.settings.max_queue, self.metrics,
                                   self.settings.stream_interval)
        self.scheduler.start()

    def share_cores(self, taken: int) -> None:
        """`taken` cores now run jobs: a torch model on one thread per core (--threads 0) steps back to the others,
        so that its OpenMP threads never wait for a core a training job holds (docs/pipelines.md).
        Set in the model process, between two passes."""
        if self.backend is None or self.backend.torch_threads is not None:
            return
        asyncio.get_running_loop().create_task(self.runner.set_threads(max(1, usable_cores() - taken)))

    def submit(self, req: TokenRequest, listener: Listener) -> Sequence:
        """Raises scheduler.NotAccepting (draining) or scheduler.QueueFull."""
        return self.scheduler.submit(req, listener)

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.scheduler.cancel(seq, reason)

    async def drain(self, timeout: float) -> None:
        if self.scheduler is not None:
            await self.scheduler.drain(timeout)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        self.metrics.clear()
