"""The model side of text generation: the backend (model and tokenizer), its model thread, and the scheduler.

Loading, thread sizing and warm-up run in the one model thread that later runs every forward pass (OpenMP's
thread count is per thread). Submitting, cancelling and draining go to the scheduler, on token ids.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from server.backends import load_backend
from server.backends.base import Backend, warmup
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.sequence import Listener, Sequence, TokenRequest
from ulm.tokenizer import Tokenizer


@dataclass
class EngineSettings:
    backend: str  # a name in server.backends.BACKENDS
    checkpoint: str
    device: str
    max_batch: int  # sequences decoded together (KV cache slots)
    max_queue: int  # sequences that may wait for a slot
    threads: int  # the model's threads; 0 = one per core


def load_warm(settings: EngineSettings) -> Backend:
    """In the model thread: the backend, loaded with every core (the event loop's work fits in the gaps, as it
    overlaps the next decode step), then its own thread count for sampling, then warmed up."""
    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    backend = load_backend(settings.backend, settings.checkpoint, settings.device, settings.max_batch, serving=True)
    if backend.torch_threads:
        torch.set_num_threads(backend.torch_threads)
    warmup(backend)
    return backend


class Engine:
    def __init__(self, settings: EngineSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
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
        self.backend = await asyncio.get_running_loop().run_in_executor(executor, load_warm, self.settings)
        self.scheduler = Scheduler(self.backend, self.settings.max_queue, self.metrics, executor)
        self.scheduler.start()

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
