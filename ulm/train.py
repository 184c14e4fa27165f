"""Training (`ulm train`) of GPT models, single-process or DDP under torchrun: the loop (its parts are in
ulm.training; `ulm eval` is ulm.evaluate).

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

Stopping: with stop_on_sigterm (`ulm train` sets it), SIGTERM ends the run after the current iteration, with `last`
saved, by raising TrainingStopped; `--resume` continues it exactly as if it had not stopped.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ulm.checkpoint import load_checkpoint
from ulm.config import GPTConfig
from ulm.model import GPT
from ulm.progress import progress_bar
from ulm.train_config import TrainConfig, build_config
from ulm.training.device import Dist, allow_tf32, autocast, distributed, resolve_device, resolve_dtype
from ulm.training.loss import lm_loss
from ulm.training.metrics import METRICS, append_record, plot_losses, truncate_metrics
from ulm.training.optim import lr_at, make_optimizer, set_lr
from ulm.training.state import (
    BEST,
    LAST,
    check_resumable,
    clear_stale,
    find_last,
    load_state,
    restore_optimizer,
    restore_rng,
    rng_tensors,
    save_best,
    save_last,
)
from ulm.training.tasks import TaskData, load_data
from ulm.util import set_threads, write_json

CONFIG_JSON = "train_config.json"


class TrainingStopped(Exception):
    """A stop request (SIGTERM) ended the run after an iteration, with `last` saved: `--resume` continues it."""

    def __init__(self, step: int, out: Path):
        super().__init__(f"stopped by SIGTERM at iteration {step}; the last checkpoint is in {out / LAST} "
                         "(continue with --resume)")
        self.step = step


@contextlib.contextmanager
def sigterm_sets(event: threading.Event) -> Iterator[None]:
    """SIGTERM sets `event` instead of ending the process (signal handlers exist in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig | str, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          overrides: list[str] | tuple[str, ...] = (), stop_on_sigterm: bool = False) -> Path:
    """Train per `cfg` (a TrainConfig, or a recipe name plus `overrides`) into `out_dir`; return the best
    checkpoint's directory. With `resume`, continue the run saved in out_dir/last (or start if none); a
    finished run is not trained further, so `train("adder", dir, resume=True)` is safe to call at every start.
    With `stop_on_sigterm`, SIGTERM stops the run after its current iteration: TrainingStopped, `last` saved."""
    if isinstance(cfg, str):
        cfg = build_config(cfg, overrides=overrides)
    cfg.validate()
    out = Path(out_dir)
    last = find_last(out)
    if last is not None and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    data = load_data(cfg)
    model_cfg = cfg.model_config(data.tokenizer.vocab_size, data.block_size)

    with distributed(cfg.device) as d:
        trainer = Trainer(cfg, out, data, model_cfg, d)
        if resume and last is not None:
            trainer.resume(last)
        trainer.stoppable = stop_on_sigterm
        with sigterm_sets(trainer.stop_requested) if stop_on_sigterm else contextlib.nullcontext():
            return trainer.run(progress)


def better(new: dict, best: dict | None) -> bool:
    """Higher exact match wins (addition), then lower loss."""
    def key(m: dict) -> tuple[float, float]:
        return -m.get("val_accuracy", 0.0), m["val_loss"]

    return best is None or key(new) < key(best)


class Trainer:
    """One process's part of a run: the model, optimizer and data stream, and where the run stands."""

    def __init__(self, cfg: TrainConfig, out: Path, data: TaskData, model_cfg: GPTConfig, d: Dist):
        self.cfg, self.out, self.data, self.d = cfg, out, data, d
        self.device = resolve_device(cfg, d)
        self.dtype = resolve_dtype(cfg, self.device)
        allow_tf32(self.device)
        self.threads = set_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.global_batch = cfg.batch_size * cfg.grad_accum * d.world
        self.tokens_per_iter = self.global_batch * data.block_size

        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = GPT(model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same global batches on every process
        torch.manual_seed(cfg.seed + d.rank)  # dropout: different masks per process

        self.step, self.best, self.streak, self.elapsed = 0, None, 0, 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # this process's loss since the last log
        self.resumed = False
        self.stop_requested, self.stoppable = threading.Event(), False  # set by SIGTERM (see train)
        self.metrics = out / METRICS
        self.extra = {**data.extra(), "train_config": cfg.to_dict()}  # what every checkpoint records

    def resume(self, last: Path) -> None:
        """Continue from the trainer state in `last`: weights, optimizer, scaler, RNG states and position."""
        state, tensors = load_state(last)
        check_resumable(self.cfg, state, self.out)
        saved_model, _, _ = load_checkpoint(last)
        if saved_model.config != self.model.config:
            raise ValueError(f"cannot resume {self.out}: the model config differs from the checkpoint's")
        self.model.load_state_dict(saved_model.state_dict())
        restore_optimizer(self.optimizer, state, tensors)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        r = self.d.rank % state["world"]  # a different world size resumes, though not bit-exactly
        restore_rng(tensors, r, self.data_gen, self.device)
        self.step, self.best, self.streak = state["iter"], state["best"], state["streak"]
        self.elapsed = state["elapsed_s"]
        self.loss_sum, self.loss_count = state["loss_sum"][r], state["loss_count"]
        self.resumed = True

    def run(self, progress: bool) -> Path:
        """Train to max_iters (or the early stop); return the best checkpoint's directory."""
        cfg = self.cfg
        self.model.train()
        train_model = self.wrap()
        if self.d.master:
            self.prepare_out()
        self.loss_acc = torch.tensor(self.loss_sum, device=self.device)  # summed on-device: no per-step sync
        bar = progress_bar(total=cfg.max_iters, initial=self.step, disable=not (progress and self.d.master),
                           desc="train")
        self.t_log, self.step_log = time.perf_counter(), self.step
        self.t_start = time.perf_counter() - self.elapsed
        stop = cfg.stop_accuracy > 0 and self.streak >= cfg.stop_patience  # a resumed run that had already stopped
        while self.step < cfg.max_iters and not stop:
            lr = self.iteration(train_model)
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                self.log_train(lr, bar)
            t_pause = time.perf_counter()  # evaluation and checkpoints do not count against throughput
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                stop = self.validate(bar)
            saved = self.step % cfg.save_interval == 0 or self.step == cfg.max_iters or stop
            if saved:
                self.save_last()
            self.t_log += time.perf_counter() - t_pause
            if self.step < cfg.max_iters and not stop and self.should_stop():
                if not saved:
                    self.save_last()
                bar.close()
                raise TrainingStopped(self.step, self.out)
        bar.close()
        return self.finish()

    def should_stop(self) -> bool:
        """Whether a stop was requested: the master's word, so that every process stops at the same iteration."""
        return self.stoppable and self.d.broadcast_flag(self.stop_requested.is_set(), self.device)

    def wrap(self) -> torch.nn.Module:
        """The module the loop trains through: the model, compiled and DDP-wrapped as configured."""
        train_model = torch.compile(self.model) if self.cfg.compile else self.model
        if self.d.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return train_model

    def prepare_out(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        clear_stale(self.out)
        write_json(self.out / CONFIG_JSON, self.cfg.to_dict())
        truncate_metrics(self.metrics, self.step)
        dtype = str(self.dtype).removeprefix("torch.")
        print(f"training {self.model.num_params() / 1e6:.2f}M parameters on {self.device} ({dtype}, "
              f"{self.d.world} process(es) x {self.threads} thread(s)), {self.tokens_per_iter} tokens/iteration"
              + (f", resuming at iteration {self.step}" if self.resumed else ""))

    def iteration(self, train_model: torch.nn.Module) -> float:
        """One optimizer step on this process's slice of the global batch, in grad_accum micro-steps; its lr."""
        cfg, B = self.cfg, self.cfg.batch_size
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        x_all, y_all = self.data.sample("train", self.global_batch, self.data_gen)
        lo = self.d.rank * cfg.grad_accum * B
        for micro in range(cfg.grad_accum):
            x = x_all[lo + micro * B: lo + (micro + 1) * B].to(self.device, non_blocking=True)
            y = y_all[lo + micro * B: lo + (micro + 1) * B].to(self.device, non_blocking=True)
            if self.d.world > 1:  # all-reduce gradients only on the last micro-step
                train_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast(self.device, self.dtype):
                loss = lm_loss(train_model(x), y) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            self.loss_acc += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_count += 1
        return lr

    def log_train(self, lr: float, bar) -> None:
        """Log the mean loss since the last log, and the throughput."""
        self.d.mean(self.loss_acc)
        mean = float(self.loss_acc) / self.loss_count  # the one sync per log interval
        now = time.perf_counter()
        dt = (now - self.t_log) / max(1, self.step - self.step_log)
        tokens_per_s = self.tokens_per_iter / dt
        if self.d.master:
            append_record(self.metrics, {"iter": self.step, "loss": mean, "lr": lr, "tokens_per_s": tokens_per_s,
                                         "ms_per_iter": 1000 * dt})
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.loss_acc.zero_()
        self.loss_count = 0
        self.t_log, self.step_log = now, self.step

    def validate(self, bar) -> bool:
        """Validate (on the master), keep the best checkpoint, and tell every process whether to stop early."""
        stop = False
        if self.d.master:
            self.model.eval()
            result = self.data.validate(self.model, self.cfg, self.device, self.dtype)
            self.model.train()
            append_record(self.metrics, {"iter": self.step, **result})
            bar.write(f"iter {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            if better(result, self.best):
                self.best = {"iter": self.step, **result}
                save_best(self.out, self.model, self.data.tokenizer, {**self.extra, **self.best})
            target = self.cfg.stop_accuracy
            self.streak = self.streak + 1 if 0 < target <= result.get("val_accuracy", 0.0) else 0
            stop = self.streak >= self.cfg.stop_patience
            if stop:
                bar.write(f"val exact match >= {target} at {self.streak} evaluation(s) in a row: stopping")
        return self.d.broadcast_flag(stop, self.device)

    def save_last(self) -> None:
        """Every process contributes its RNG state and loss accumulator; the master writes `last`."""
        mine = {"torch": torch.get_rng_state(), "loss": float(self.loss_acc),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        everyone = self.d.gather(mine)
        if not self.d.master:
            return
        state = {"iter": self.step, "best": self.best, "streak": self.streak, "config": self.cfg.to_dict(),
                 "world": self.d.world, "elapsed_s": time.perf_counter() - self.t_start,
                 "loss_sum": [e["loss"] for e in everyone], "loss_count": self.loss_count,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        save_last(self.out, self.model, self.data.tokenizer, {**self.extra, "iter": self.step}, self.optimizer,
                  rng_tensors(self.data_gen, everyone), state)

    def finish(self) -> Path:
        """The master writes summary.json (with the task's held-out test) and loss.png."""
        if not self.d.master:
            return self.out / BEST
        elapsed = time.perf_counter() - self.t_start
        summary = {"iters": self.step, "elapsed_s": elapsed, "best": self.best,
                   **self.data.test(self.out / BEST, self.device)}
        write_json(self.out / "summary.json", summary)
        plot_losses(self.metrics, self.out / "loss.png")
        print(f"done: {self.step} iterations in {elapsed:.1f}s; best {self.best}"
              + (f"; test exact match {summary['test_accuracy']:.4f}" if "test_accuracy" in summary else ""))
        return self.out / BEST
