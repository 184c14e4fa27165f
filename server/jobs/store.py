"""The jobs and their events in the state database (state.db: SQLite, WAL), so a restart lists every job and a
late watcher replays what it missed.

  jobs        one row per job: its spec (JSON), state, result, error, progress (JSON), times, attempts
  job_events  its events in order (sequence 1, 2, ...), each a serialized ulm.v1.JobEvent

A job's row and the events that changed it are written in one transaction (commit), so the row's last_sequence
always names its newest stored event. Used from the event loop's thread only.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protos.ulm.v1 import jobs_pb2 as jpb
from server.db import connect
from server.jobs.spec import JobSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: listing and paging
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    makes TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    ended_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    last_sequence INTEGER NOT NULL DEFAULT 0,
    pgid INTEGER NOT NULL DEFAULT 0,
    log_lines INTEGER NOT NULL DEFAULT 0,
    eval_step INTEGER NOT NULL DEFAULT 0,
    removes_result INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_by_makes ON jobs(makes, state);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    sequence INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
"""

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED")
ACTIVE = ("QUEUED", "RUNNING")
ENDED = ("SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED")
PROGRESS_FIELDS = tuple(f.name for f in jpb.JobProgress.DESCRIPTOR.fields)
UPDATED = ("state", "result", "error", "progress", "started_at", "ended_at", "attempts", "last_sequence", "pgid",
           "log_lines", "eval_step", "removes_result")


@dataclass
class JobRecord:
    id: str
    spec: JobSpec
    created_at: float
    state: str = "QUEUED"
    result: str = ""  # on success: the made resource's name (Job.result)
    error: str = ""
    progress: dict = field(default_factory=dict)  # JobProgress fields
    started_at: float = 0.0
    ended_at: float = 0.0
    attempts: int = 1
    last_sequence: int = 0
    pgid: int = 0  # the running child's process group (0 when none)
    log_lines: int = 0  # log events stored (capped)
    eval_step: int = 0  # the iteration of the last eval event (step events: progress["step"])
    removes_result: bool = False  # the result did not exist before the job: a failed export or build removes it
    seq: int = 0  # the row's creation order

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def argv(self) -> list[str]:
        """The command of this attempt: a resumed training job continues from its last checkpoint."""
        return self.spec.resume_argv if self.attempts > 1 and self.spec.resume_argv else self.spec.argv

    def to_proto(self) -> jpb.Job:
        return jpb.Job(name=f"jobs/{self.id}", id=self.id, kind=kind_enum(self.spec.kind),
                       state=jpb.JobState.Value(f"JOB_STATE_{self.state}"),
                       spec_json=json.dumps(self.spec.request, sort_keys=True),
                       progress=jpb.JobProgress(**{k: v for k, v in self.progress.items() if k in PROGRESS_FIELDS}),
                       result=self.result, error=self.error, created_at=self.created_at, started_at=self.started_at,
                       ended_at=self.ended_at, last_sequence=self.last_sequence, attempts=self.attempts)


def kind_enum(kind: str) -> int:
    return jpb.JobKind.Value(f"JOB_KIND_{kind.upper()}")


def kind_name(value: int) -> str:
    return jpb.JobKind.Name(value).removeprefix("JOB_KIND_").lower()


def state_name(value: int) -> str:
    return jpb.JobState.Name(value).removeprefix("JOB_STATE_")


class JobStore:
    def __init__(self, path: Path):
        self.db = connect(path, SCHEMA)

    def close(self) -> None:
        self.db.close()

    def insert(self, rec: JobRecord, events: list[jpb.JobEvent]) -> None:
        with transaction(self.db):
            cur = self.db.execute(
                "INSERT INTO jobs (id, kind, state, spec, makes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, rec.spec.kind, rec.state, json.dumps(rec.spec.to_dict()), rec.spec.result, rec.created_at))
            rec.seq = cur.lastrowid
            self._write(rec, events)

    def commit(self, rec: JobRecord, events: list[jpb.JobEvent] = ()) -> None:
        """The job's row as `rec` has it, and its new events, in one transaction."""
        with transaction(self.db):
            self._write(rec, events)

    def _write(self, rec: JobRecord, events) -> None:
        values = {k: getattr(rec, k) for k in UPDATED}
        values["progress"] = json.dumps(rec.progress)
        self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in UPDATED)} WHERE id = ?",
                        (*values.values(), rec.id))
        self.db.executemany("INSERT INTO job_events (job_id, sequence, payload) VALUES (?, ?, ?)",
                            [(rec.id, e.sequence, e.SerializeToString()) for e in events])

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else from_row(row)

    def in_states(self, states: tuple[str, ...]) -> list[JobRecord]:
        marks = ", ".join("?" * len(states))
        rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states).fetchall()
        return [from_row(r) for r in rows]

    def page(self, kind: str, state: str, before_seq: int, limit: int) -> list[JobRecord]:
        """Up to `limit` jobs, newest first, created before the row `before_seq` (0: from the newest)."""
        where, params = ["seq < ?"], [before_seq or 2**62]
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if state:
            where.append("state = ?")
            params.append(state)
        rows = self.db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                               (*params, limit)).fetchall()
        return [from_row(r) for r in rows]

    def last_producer(self, resource: str) -> str:
        row = self.db.execute("SELECT id FROM jobs WHERE makes = ? AND state = 'SUCCEEDED' ORDER BY ended_at DESC, "
                              "seq DESC LIMIT 1", (resource,)).fetchone()
        return row["id"] if row else ""

    def events_after(self, job_id: str, sequence: int, limit: int = 500) -> list[jpb.JobEvent]:
        rows = self.db.execute("SELECT payload FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence "
                               "LIMIT ?", (job_id, sequence, limit)).fetchall()
        return [jpb.JobEvent.FromString(r["payload"]) for r in rows]


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT (the connection is in autocommit mode), rolled back on an error."""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def from_row(row) -> JobRecord:
    return JobRecord(id=row["id"], spec=JobSpec.from_dict(json.loads(row["spec"])), created_at=row["created_at"],
                     state=row["state"], result=row["result"], error=row["error"],
                     progress=json.loads(row["progress"]), started_at=row["started_at"], ended_at=row["ended_at"],
                     attempts=row["attempts"], last_sequence=row["last_sequence"], pgid=row["pgid"],
                     log_lines=row["log_lines"], eval_step=row["eval_step"],
                     removes_result=bool(row["removes_result"]), seq=row["seq"])
