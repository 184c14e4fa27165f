"""The model side of text generation: the backend (model and tokenizer), its model thread, and the scheduler.

Loading, thread sizing and warm-up run in the one model thread that later runs every forward pass (OpenMP's
thread count is per thread). Submitting, cancelling and draining go to the scheduler, on token ids. A server may
run several engines (one per loaded model, server/models.py); their schedulers share the server's gauges.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from server.backends import load_backend
from server.backends.base import Backend, warmup
from server.metrics import Metrics
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


def load_warm(settings: EngineSettings) -> Backend:
    """In the model thread: the backend, loaded with every core (the event loop's work fits in the gaps, as it
    overlaps the next decode step), then its own thread count for sampling, then warmed up."""
    torch.set_num_threads(settings.threads or usable_cores())
    backend = load_backend(settings.backend, settings.checkpoint, settings.device, settings.max_batch, serving=True,
                           quantize=settings.quantize)
    if backend.torch_threads:
        torch.set_num_threads(backend.torch_threads)
    warmup(backend)
    return backend


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
        self.backend: Backend | None = None  # set once loaded and warmed up
        self.scheduler: Scheduler | None = None  # set once it runs

    @property
    def tokenizer(self) -> Tokenizer:
        return self.backend.tokenizer

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    async def start(self) -> None:
        executor = ThreadPoolExecutor(1, thread_name_prefix="ulm-model")  # every forward pass, from loading on
        try:
            self.backend = await asyncio.get_running_loop().run_in_executor(executor, load_warm, self.settings)
        except BaseException:
            executor.shutdown(wait=False)  # a model that failed to load leaves no thread behind
            raise
        self.executor = executor
        self.scheduler = Scheduler(self.backend, self.settings.max_queue, self.metrics, executor)
        self.scheduler.start()

    def share_cores(self, taken: int) -> None:
        """`taken` cores now run jobs: a torch model on one thread per core (--threads 0) steps back to the others,
        so that its OpenMP threads never wait for a core a training job holds (docs/pipelines.md).
        Set in the model thread, between two steps (OpenMP's count is per thread)."""
        if self.settings.threads or self.backend is None or self.backend.torch_threads is not None:
            return
        self.executor.submit(torch.set_num_threads, max(1, usable_cores() - taken))

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
