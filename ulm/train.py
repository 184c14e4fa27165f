"""Training (`ulm train`) and evaluation (`ulm eval`) of GPT models, single-process or DDP under torchrun.

AdamW (decay on 2-D weights only), linear warmup then cosine decay (or the paper's inverse square root),
gradient clipping and accumulation, bf16/fp16 autocast (GradScaler for fp16), optional torch.compile.

A run directory (--out) holds:
  train_config.json  the resolved configuration
  metrics.jsonl      {"iter", "loss", "lr", "tokens_per_s", "ms_per_iter"} and {"iter", "val_loss", ...} lines
  best/              the checkpoint with the best validation (exact match for addition, else loss)
  last/              the latest checkpoint plus the trainer state (optimizer, RNG states, data position) as
                     trainer_state.safetensors + trainer_state.json, every checkpoint_interval iterations
  loss.png, summary.json   written at the end

Data parallelism: every process draws the same global batch (one seeded generator) and trains on its slice,
so a run's batches depend on the seed alone, and `--resume` continues bit-exactly on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from ulm.addition import IGNORE, AdditionTask, exact_match
from ulm.checkpoint import CONFIG_FILE, CheckpointError, load_checkpoint, save_checkpoint
from ulm.model import GPT
from ulm.progress import progress_bar
from ulm.tokenizer import Tokenizer
from ulm.util import atomic_write_text, replace_dir, set_threads
from ulm.train_config import TrainConfig, build_config

LAST, BEST = "last", "best"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = "ulm-trainer-state/1"
METRICS, CONFIG_JSON = "metrics.jsonl", "train_config.json"
# keys a resumed run may change; anything else must match the interrupted run
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "eval_examples", "stop_accuracy", "stop_patience",
             "log_interval", "checkpoint_interval", "device", "threads", "compile", "dataset"}


# ----------------------------------------------------------------------------------------------------------
# data


class TokenData:
    """Windows of a token dataset built by ulm.data: x = ids[i : i + T], y = ids[i + 1 : i + T + 1]."""

    def __init__(self, directory: str | os.PathLike, block_size: int):
        from ulm.data.dataset import load_manifest, load_split, load_tokenizer

        self.directory = str(directory)
        manifest = load_manifest(directory)
        self.tokenizer = load_tokenizer(directory)
        self.splits = {s: load_split(directory, s) for s in manifest["splits"]}
        self.block_size = block_size
        for split in ("train", "val"):
            n = len(self.splits.get(split, ()))
            if n <= block_size:
                raise ValueError(f"dataset {directory}: split {split!r} has {n} tokens, fewer than a block "
                                 f"({block_size} + 1)")

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise ValueError(f"dataset {self.directory}: no split {name!r} (has: {', '.join(self.splits)})")
        return self.splits[name]

    def sample(self, split: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data, T = self.split(split), self.block_size
        ix = torch.randint(len(data) - T, (n,), generator=generator).numpy()
        rows = torch.from_numpy(data[ix[:, None] + np.arange(T + 1)].astype(np.int64))  # (n, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows covering the split (the tail shorter than a block is dropped)."""
        data, T = self.split(split), self.block_size
        n = (len(data) - 1) // T
        for i in range(0, n, batch_size):
            starts = np.arange(i, min(i + batch_size, n)) * T
            rows = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))
            yield rows[:, :-1], rows[:, 1:]

    def extra(self) -> dict:
        return {"task": "lm", "dataset": self.directory}


class AdditionData:
    """The addition task behind the same interface; data are made on the fly."""

    def __init__(self, task: AdditionTask):
        self.task = task
        self.tokenizer = task.tokenizer
        self.block_size = task.block_size

    def sample(self, split: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.sample(split, n, generator)

    def batches(self, split: str, batch_size: int, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pairs = self.task.pairs(split, limit)
        for i in range(0, len(pairs), batch_size):
            yield self.task.batch(pairs[i: i + batch_size])

    def extra(self) -> dict:
        return self.task.to_extra()


def load_data(cfg: TrainConfig) -> TokenData | AdditionData:
    if cfg.task == "addition":
        return AdditionData(AdditionTask(cfg.digits, cfg.reverse, cfg.val_fraction, cfg.test_fraction,
                                         cfg.split_seed))
    if not cfg.dataset:
        raise ValueError("dataset: task 'lm' needs a dataset directory (--dataset DIR, built by `ulm data build`)")
    return TokenData(cfg.dataset, cfg.model_config(vocab_size=1).block_size)


# ----------------------------------------------------------------------------------------------------------
# system: processes, devices, precision


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


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


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (weights and optimizer stay float32). On CPU, attention then takes
    the math path: the fused CPU kernel's backward is several times slower in bfloat16 than in float32."""
    stack = contextlib.ExitStack()
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


# ----------------------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D tensors (matmul weights, embeddings) and none on biases and norms.

    The fused implementation is the fastest on CPU and CUDA alike (one kernel over all parameters).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of iteration `step` (0-based)."""
    warmup = cfg.warmup_iters
    if cfg.schedule == "inverse_sqrt":
        # the paper: d^-0.5 * min(s^-0.5, s * w^-1.5), scaled so that its peak (s = w) is cfg.lr
        s, w = step + 1, max(warmup, 1)
        return cfg.lr * min(s / w, math.sqrt(w / s))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= cfg.decay_iters:
        return cfg.min_lr
    ratio = (step - warmup) / max(1, cfg.decay_iters - warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets that are not IGNORE. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.inference_mode()
def mean_loss(model: GPT, batches, device: torch.device, dtype: torch.dtype) -> float:
    """Token-weighted mean loss over (x, y) batches."""
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        n = int((y != IGNORE).sum())
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += n
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return total / count


def validate(model: GPT, data, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Validation loss (and greedy exact match for addition), on the same examples every time."""
    model.eval()
    if isinstance(data, AdditionData):
        pairs = data.task.pairs("val", cfg.eval_examples)
        loss = mean_loss(model, data.batches("val", 1024, cfg.eval_examples), device, dtype)
        acc = exact_match(model, data.task, pairs, device=device)  # in float32, as served
        out = {"val_loss": loss, "val_accuracy": acc}
    else:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        batches = (data.sample("val", cfg.batch_size, g) for _ in range(cfg.eval_iters))
        out = {"val_loss": mean_loss(model, batches, device, dtype)}
    model.train()
    return out


def better(new: dict, best: dict | None) -> bool:
    """Higher exact match wins (addition), then lower loss."""
    def key(m: dict) -> tuple[float, float]:
        return -m.get("val_accuracy", 0.0), m["val_loss"]

    return best is None or key(new) < key(best)


# ----------------------------------------------------------------------------------------------------------
# trainer state: safetensors for tensors, JSON for the rest (nothing is unpickled on resume)


def save_last(out: Path, model: GPT, tokenizer: Tokenizer, extra: dict, optimizer: torch.optim.Optimizer,
              tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write the checkpoint and trainer state to a temporary directory, then swap it in for `last`."""
    tmp = out / f".{LAST}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, tokenizer, extra)
    sd = optimizer.state_dict()
    for i, s in sd["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = v
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    state = {"format": STATE_FORMAT, **state, "param_groups": sd["param_groups"]}
    atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=1))
    replace_dir(tmp, out / LAST, out / f"{LAST}.old")


def find_last(out: Path) -> Path | None:
    for d in (out / LAST, out / f"{LAST}.old"):
        if (d / STATE_JSON).is_file():
            return d
    return None


def read_state(directory: Path) -> dict:
    path = directory / STATE_JSON
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a µLM trainer state")
    return state


def load_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    state = read_state(directory)
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as e:  # safetensors raises its own error type for truncated files
        raise ValueError(f"{directory / STATE_TENSORS} is unreadable: {e}") from e
    return state, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    opt_state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = t
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def saved_config(out: str | os.PathLike) -> dict | None:
    """The configuration of a resumable run in `out`, or None."""
    last = find_last(Path(out))
    return None if last is None else read_state(last)["config"]


# ----------------------------------------------------------------------------------------------------------
# the training loop


def train(cfg: TrainConfig | str, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Train per `cfg` (a TrainConfig, or a preset name plus `overrides`) into `out_dir`; return the best
    checkpoint's directory. With `resume`, continue the run saved in out_dir/last (or start if none); a
    finished run is not trained further, so `train("adder", dir, resume=True)` is safe to call at every start."""
    if isinstance(cfg, str):
        cfg = build_config(preset=cfg, overrides=overrides)
    cfg.validate()
    out = Path(out_dir)
    last = find_last(out)
    if last is not None and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    data = load_data(cfg)
    model_cfg = cfg.model_config(data.tokenizer.vocab_size, data.block_size)

    d = init_distributed(cfg.device)
    try:
        best = _train(cfg, out, data, model_cfg, d, last if resume else None, progress)
        if d.world > 1:  # every rank done (rank 0 writes the checkpoints) before the group is torn down
            dist.barrier()
        return best
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, out: Path, data, model_cfg, d: Dist, last: Path | None, progress: bool) -> Path:
    device = resolve_device(cfg, d)
    dtype = resolve_dtype(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    threads = set_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    T = data.block_size
    B = cfg.batch_size
    global_batch = B * cfg.grad_accum * d.world
    tokens_per_iter = global_batch * T

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same global batches on every process
    torch.manual_seed(cfg.seed + d.rank)  # dropout: different masks per process
    step, best, elapsed, loss_sum, loss_count, streak = 0, None, 0.0, 0.0, 0, 0

    if last is not None:
        state, tensors = load_state(last)
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in RESUMABLE and state["config"].get(k) != v)
        if changed:
            raise ValueError(f"cannot resume {out}: config differs from the saved run in {', '.join(changed)}")
        saved_model, _, _ = load_checkpoint(last)
        if saved_model.config != model_cfg:
            raise ValueError(f"cannot resume {out}: the model config differs from the checkpoint's")
        model.load_state_dict(saved_model.state_dict())
        restore_optimizer(optimizer, state, tensors)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        r = d.rank % state["world"]  # a different world size resumes, though not bit-exactly
        data_gen.set_state(tensors["rng.data"])
        torch.set_rng_state(tensors[f"rng.torch.{r}"])
        if device.type == "cuda" and f"rng.cuda.{r}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{r}"])
        step, best, elapsed, streak = state["iter"], state["best"], state["elapsed_s"], state["streak"]
        loss_sum, loss_count = state["loss_sum"][r], state["loss_count"]
    model.train()

    train_model = torch.compile(model) if cfg.compile else model
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = out / METRICS
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(out / CONFIG_JSON, json.dumps(cfg.to_dict(), indent=2))
        truncate_metrics(metrics, step)
        print(f"training {model.num_params() / 1e6:.2f}M parameters on {device} ({str(dtype).removeprefix('torch.')}, "
              f"{d.world} process(es) x {threads} thread(s)), {tokens_per_iter} tokens/iteration"
              + (f", resuming at iteration {step}" if last is not None else ""))
    extra = {**data.extra(), "train_config": cfg.to_dict()}

    def log(record: dict) -> None:
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    loss_acc = torch.tensor(loss_sum, device=device)  # summed on-device between logs: no per-step sync
    bar = progress_bar(total=cfg.max_iters, initial=step, disable=not (progress and d.master), desc="train")
    t_log, step_log, t_start = time.perf_counter(), step, time.perf_counter() - elapsed
    stop = cfg.stop_accuracy > 0 and streak >= cfg.stop_patience  # a resumed run that had already stopped
    while step < cfg.max_iters and not stop:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x_all, y_all = data.sample("train", global_batch, data_gen)
        lo = d.rank * cfg.grad_accum * B
        for micro in range(cfg.grad_accum):
            x = x_all[lo + micro * B: lo + (micro + 1) * B].to(device, non_blocking=True)
            y = y_all[lo + micro * B: lo + (micro + 1) * B].to(device, non_blocking=True)
            if d.world > 1:  # all-reduce gradients only on the last micro-step
                train_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast(device, dtype):
                loss = lm_loss(train_model(x), y) / cfg.grad_accum
            scaler.scale(loss).backward()
            loss_acc += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_count += 1
        bar.update(1)

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            if d.world > 1:
                dist.all_reduce(loss_acc)
                loss_acc /= d.world
            mean = float(loss_acc) / loss_count  # the one sync per log interval
            now = time.perf_counter()
            dt = (now - t_log) / max(1, step - step_log)
            record = {"iter": step, "loss": mean, "lr": lr, "tokens_per_s": tokens_per_iter / dt,
                      "ms_per_iter": 1000 * dt}
            if d.master:
                log(record)
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_iter / dt:,.0f}")
            loss_acc.zero_()
            loss_count = 0
            t_log, step_log = now, step

        t_pause = time.perf_counter()  # evaluation and checkpoints do not count against throughput
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if d.master:
                result = validate(model, data, cfg, device, dtype)
                log({"iter": step, **result})
                msg = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                bar.write(f"iter {step}: {msg}")
                if better(result, best):
                    best = {"iter": step, **result}
                    tmp = out / f".{BEST}.tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    save_checkpoint(tmp, model, data.tokenizer, {**extra, **best})
                    replace_dir(tmp, out / BEST, out / f"{BEST}.old")
                streak = streak + 1 if 0 < cfg.stop_accuracy <= result.get("val_accuracy", 0.0) else 0
                stop = streak >= cfg.stop_patience
                if stop:
                    bar.write(f"val exact match >= {cfg.stop_accuracy} at {streak} evaluation(s) in a row: stopping")
            if d.world > 1:  # everyone learns whether the master stopped
                flag = torch.tensor([int(stop)], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())

        if step % cfg.save_interval == 0 or step == cfg.max_iters or stop:
            # every process contributes its RNG state and loss accumulator; the master writes
            mine = {"torch": torch.get_rng_state(), "loss": float(loss_acc),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
            everyone = [mine] * d.world
            if d.world > 1:
                dist.all_gather_object(everyone, mine)
            if d.master:
                tensors = {"rng.data": data_gen.get_state()}
                for r, e in enumerate(everyone):
                    tensors[f"rng.torch.{r}"] = e["torch"]
                    if e["cuda"] is not None:
                        tensors[f"rng.cuda.{r}"] = e["cuda"]
                state = {"iter": step, "best": best, "streak": streak, "config": cfg.to_dict(), "world": d.world,
                         "elapsed_s": time.perf_counter() - t_start, "loss_sum": [e["loss"] for e in everyone],
                         "loss_count": loss_count, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
                save_last(out, model, data.tokenizer, {**extra, "iter": step}, optimizer, tensors, state)
        t_log += time.perf_counter() - t_pause
    bar.close()

    if not d.master:
        return out / BEST
    elapsed = time.perf_counter() - t_start
    summary = {"iters": step, "elapsed_s": elapsed, "best": best}
    if isinstance(data, AdditionData):  # the held-out test pairs, judged with the best checkpoint
        best_model, _, _ = load_checkpoint(out / BEST, device=device)
        summary["test_loss"] = mean_loss(best_model, data.batches("test", 1024), device, torch.float32)
        summary["test_accuracy"] = exact_match(best_model, data.task, data.task.pairs("test"), device=device)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    plot_losses(metrics, out / "loss.png")
    print(f"done: {step} iterations in {elapsed:.1f}s; best {best}"
          + (f"; test exact match {summary['test_accuracy']:.4f}" if "test_accuracy" in summary else ""))
    return out / BEST


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (a resumed run redoes them), so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            pass
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_losses(metrics: Path, png: Path) -> None:
    """Train and val loss against iterations (matplotlib's object API with the Agg canvas: no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics) if metrics.is_file() else []
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("loss", "train"), ("val_loss", "val")):
        pts = [(r["iter"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


# ----------------------------------------------------------------------------------------------------------
# evaluation of a checkpoint


def evaluate(checkpoint: str | os.PathLike, dataset: str | os.PathLike | None = None, split: str | None = None,
             batch_size: int = 64, device: str = "cpu", progress: bool = False) -> dict:
    """Loss and perplexity of a checkpoint on a split (default: test for addition, val for datasets), and
    greedy exact match for addition."""
    model, tokenizer, meta = load_checkpoint(checkpoint, device=device)
    if meta.get("task") == "addition":
        if dataset:
            raise ValueError("an addition checkpoint makes its own data: --dataset does not apply")
        try:
            task = AdditionTask.from_extra(meta)
        except ValueError as e:  # a field out of range: name the file it came from
            raise CheckpointError(f"{Path(checkpoint) / CONFIG_FILE}: {e}") from e
        split = split or "test"
        pairs = task.pairs(split)
        loss = mean_loss(model, (task.batch(pairs[i: i + 1024]) for i in range(0, len(pairs), 1024)),
                         torch.device(device), torch.float32)
        acc = exact_match(model, task, pairs, device=device)
        return {"split": split, "loss": loss, "perplexity": math.exp(loss), "accuracy": acc,
                "examples": len(pairs)}
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise ValueError("dataset: this checkpoint records none; pass --dataset DIR")
    data = TokenData(dataset, model.config.block_size)
    if data.tokenizer.vocabulary() != tokenizer.vocabulary():
        raise ValueError(f"dataset {dataset} was tokenized with a different vocabulary than the checkpoint's")
    split = split or "val"
    windows = (len(data.split(split)) - 1) // data.block_size
    batches = progress_bar(data.batches(split, batch_size), total=math.ceil(windows / batch_size),
                           disable=not progress, desc=f"eval {split}")
    loss = mean_loss(model, batches, torch.device(device), torch.float32)
    return {"split": split, "loss": loss, "perplexity": math.exp(loss), "tokens": windows * data.block_size}
