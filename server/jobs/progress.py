"""A training run's metrics.jsonl records as step and eval events, and the job's progress (ETA from the time per
iteration and max_iters in the run's train_config.json).

Records come in as the trainer writes them: {"iter", "loss", "lr", "tokens_per_s", "ms_per_iter"} after every
log_interval iterations and {"iter", "val_loss", ...} after every evaluation. A resumed run rewrites the file
from its checkpoint's iteration on, so only records past the last reported iteration (per kind) become events.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from protos.ulm.v1 import jobs_pb2 as jpb
from ulm.training.state import find_last, read_state

CONFIG_JSON = "train_config.json"  # ulm.train.CONFIG_JSON
MAX_EXP = 700.0  # exp() of a larger loss overflows a double


class TrainingProgress:
    """Updates `progress` (the job's JobProgress fields, a dict) from records; the events they make."""

    def __init__(self, progress: dict, eval_step: int, run_dir: Path, first_attempt: bool):
        self.progress, self.eval_step, self.run_dir = progress, eval_step, run_dir
        self.config_mtime: float | None = None
        if first_attempt:  # a job that continues another's run (resume_from): what came before is not its own
            start = checkpoint_step(run_dir)
            self.progress["step"] = max(self.progress.get("step", 0), start)
            self.eval_step = max(eval_step, start)

    def events(self, records: list[dict]) -> list[dict]:
        """JobEvent fields (step= or eval=) for the records that are new."""
        if records:
            self._read_total()
        out = []
        for r in records:
            step = r.get("iter")
            if not isinstance(step, int):
                continue
            if "loss" in r and step > self.progress.get("step", 0):
                out.append({"step": self._step(step, r)})
            elif "val_loss" in r and step > self.eval_step:
                out.append({"eval": self._eval(step, r)})
        return out

    def _step(self, step: int, r: dict) -> jpb.StepEvent:
        p = self.progress
        total = p.get("total", 0)
        eta = max(0, total - step) * number(r, "ms_per_iter") / 1000 if total else 0.0
        p.update(step=step, loss=number(r, "loss"), learning_rate=number(r, "lr"),
                 tokens_per_s=number(r, "tokens_per_s"), eta_s=eta, fraction=min(1.0, step / total) if total else 0.0)
        return jpb.StepEvent(step=step, loss=p["loss"], learning_rate=p["learning_rate"],
                             tokens_per_s=p["tokens_per_s"], eta_s=eta)

    def _eval(self, step: int, r: dict) -> jpb.EvalEvent:
        self.eval_step = step
        val_loss = number(r, "val_loss")
        self.progress["val_loss"] = val_loss
        return jpb.EvalEvent(step=step, val_loss=val_loss, val_perplexity=math.exp(min(val_loss, MAX_EXP)),
                             val_accuracy=number(r, "val_accuracy"))

    def _read_total(self) -> None:
        """max_iters from the run's config, read again when the file changes (a resume may raise it)."""
        path = self.run_dir / CONFIG_JSON
        try:
            mtime = path.stat().st_mtime
            if mtime == self.config_mtime:
                return
            total = json.loads(path.read_text(encoding="utf-8")).get("max_iters")
        except (OSError, ValueError):
            return
        self.config_mtime = mtime
        if isinstance(total, int) and total > 0:
            self.progress["total"] = total


def checkpoint_step(run_dir: Path) -> int:
    """The iteration of the run's last checkpoint (0 when it has none)."""
    try:
        last = find_last(run_dir)
        return int(read_state(last)["iter"]) if last is not None else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def number(record: dict, key: str) -> float:
    value = record.get(key, 0.0)  # a diverged run's NaN loss is reported as NaN
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
