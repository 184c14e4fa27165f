"""The metrics log of a run (metrics.jsonl: one JSON record per line, {"iter", "loss", "lr", "tokens_per_s",
"ms_per_iter"} or {"iter", "val_loss", ...}) and its loss plot (loss.png)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ulm.util import atomic_write_text

METRICS = "metrics.jsonl"


def append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
