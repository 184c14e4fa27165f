"""Processes, devices and precision: torchrun's process group, the device and autocast dtype a config asks for, and
the few collective operations the training loop uses (each a no-op in a single process)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from ulm.train_config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> None:
        """Average `t` over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """The master's `flag`, on every process."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def gather(self, obj: object) -> list:
        """Every process's `obj`, in rank order."""
        everyone = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, obj)
        return everyone


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world)


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Dist]:
    """init_distributed for the body; after it, every rank waits for the others (rank 0 writes the checkpoints)
    before the group is torn down."""
    d = init_distributed(device)
    try:
        yield d
        if d.world > 1:
            dist.barrier()
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {cfg.device!r} requested but CUDA is not available")
        return torch.device("cuda", d.local_rank if d.world > 1 else torch.device(name).index or 0)
    return torch.device("cpu")


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """auto: bfloat16 autocast where the hardware does bfloat16 natively (CUDA; AVX512-BF16 or AMX CPUs),
    where it trains about as well and runs faster; else float32."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    return torch.bfloat16 if native else torch.float32


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def allow_tf32(device: torch.device) -> None:
    if device.type == "cuda":  # float32 matmuls on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (weights and optimizer stay float32). On CPU, attention then takes
    the math path: the fused CPU kernel's backward is slower in bfloat16 than in float32."""
    stack = contextlib.ExitStack()
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack
