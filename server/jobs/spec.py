"""What a job runs: the child's command and the data-root resources it reads and makes (shared with the services
that start jobs: Datasets, Jobs)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KINDS = ("dataset", "training", "export")


@dataclass
class JobSpec:
    kind: str  # "dataset" | "training" | "export"
    request: dict  # the request as a JSON-able dict (stored, shown as Job.spec_json)
    argv: list[str]  # the child's command after the Python executable, e.g. ["-m", "ulm", "data", "build", ...]
    uses: list[str]  # data-root resources it reads, as "files/<n>", "datasets/<n>", "models/<n>"
    result: str  # the resource it makes: "datasets/<n>" or "models/<n>"
    metrics_file: str = ""  # training: the run's metrics.jsonl (absolute), tailed into step/eval events
    resume_argv: list[str] | None = None  # training: the command that continues it from its last checkpoint
    nproc: int = 1  # training: processes (torchrun)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"job kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
