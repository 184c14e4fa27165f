"""JobManager: every long-running pipeline as a job that runs in its own process (server.jobs.runner), with its
state and events in the state database (server.jobs.store).

A bounded queue: at most --max-jobs run at once and --max-queued-jobs wait (QUEUED); more is RESOURCE_EXHAUSTED.
Every state change is an event carrying the Job; a running job's log lines and a training run's metrics become
log, step and eval events. Watchers read the stored events (so one that comes late replays them) and are woken
when new ones are stored. A server that died leaves RUNNING rows: start() marks them INTERRUPTED (a training job
can be resumed) and queues the QUEUED ones again; close() stops the running jobs (training saves its checkpoint)
and marks them INTERRUPTED. One server runs a data root's jobs (it holds jobs.lock); another server on the same
root lists and watches them but cannot start, cancel or resume any (UNAVAILABLE).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from protos.ulm.v1 import jobs_pb2 as jpb
from server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from server.jobs.progress import TrainingProgress
from server.jobs.runner import ChildProcess, exit_description, stop_leftover
from server.jobs.spec import JobSpec
from server.jobs.store import ACTIVE, JobRecord, JobStore
from server.shared import Shared

__all__ = ["JobManager", "JobSpec"]
log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # children import ulm and export from here
LOCK = "jobs.lock"
LOG = "log.txt"
CANCEL_WAIT_S = 5.0  # CancelJob waits this long for a running job to end before it answers
MAX_LOG_EVENTS = 10000  # log lines stored as events per job; the rest are in its log.txt only
EVENT_PAGE = 500
DEFAULT_PAGE, MAX_PAGE = 50, 1000
RESUMABLE = ("CANCELLED", "INTERRUPTED", "FAILED")
FOLLOW_S = 1.0  # how often a server that does not run the jobs reads a watched job's new events


class JobManager:
    def __init__(self, args: argparse.Namespace, shared: Shared):
        self.root, self.shared = shared.data_root, shared
        self.max_running, self.max_queued = args.max_jobs, args.max_queued_jobs
        self.threads, self.grace = args.job_threads, args.job_cancel_grace
        if self.max_running < 1 or self.max_queued < 0 or self.threads < 1 or self.grace < 0:
            raise ValueError("--max-jobs and --job-threads must be >= 1, --max-queued-jobs and --job-cancel-grace "
                             f">= 0; got {self.max_running}, {self.threads}, {self.max_queued}, {self.grace}")
        self.store = JobStore(self.root.db)
        self.active: dict[str, JobRecord] = {}  # QUEUED and RUNNING jobs
        self.queue: deque[str] = deque()
        self.children: dict[str, ChildProcess] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancelling: set[str] = set()
        self.watchers: dict[str, set[asyncio.Event]] = {}
        self.started = self.draining = self.closing = False
        self.owner = False  # this server runs the data root's jobs (it holds the lock)
        self.lock_file = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the data root's job lock, settle what a dead server left, and start the queued jobs."""
        if not self._lock():
            log.warning("--data-root %s: another server runs its jobs (it holds %s); this one only lists and "
                        "watches them", self.root.path, LOCK)
            self.started = True
            return
        left = self.store.in_states(("RUNNING",))
        await asyncio.gather(*(stop_leftover(rec.pgid, rec.id, self.grace) for rec in left if rec.pgid))
        for rec in left:
            note = "; ResumeJob continues it from its last checkpoint" if rec.spec.kind == "training" else ""
            self._end(rec, "INTERRUPTED", f"the server stopped while the job ran{note}")
        for rec in self.store.in_states(("QUEUED",)):
            self.active[rec.id] = rec
            self.queue.append(rec.id)
        if left or self.queue:
            log.info("jobs: %d interrupted by the last server's end, %d queued", len(left), len(self.queue))
        self.started = True  # submit() refused until now: UNAVAILABLE
        self._pump()

    async def drain(self) -> None:
        """End the watch streams (UNAVAILABLE); the jobs keep running until close()."""
        self.draining = True
        self._wake_all()

    async def close(self) -> None:
        """Stop the running jobs (SIGTERM: training saves its checkpoint), mark them INTERRUPTED; queued jobs stay
        QUEUED for the next server."""
        self.closing = self.draining = True
        self._wake_all()
        for child in self.children.values():
            child.terminate(self.grace)
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=self.grace + 5)
        self.store.close()
        if self.lock_file is not None:
            self.lock_file.close()  # releases the lock

    def _lock(self) -> bool:
        """Whether this server got the lock (released when the file closes, or the process ends)."""
        self.lock_file = open(self.root.path / LOCK, "ab")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self.lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            self.lock_file = None
            return False
        self.owner = True
        return True

    # -- the interface for services -----------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> jpb.Job:
        """Queue a job (it starts at once when a slot is free); RESOURCE_EXHAUSTED when the queue is full."""
        self._check_room()
        rec = JobRecord(id=new_job_id(), spec=spec, created_at=time.time())
        rec.last_sequence = 1
        self.store.insert(rec, [jpb.JobEvent(sequence=1, time=rec.created_at, job=rec.to_proto())])
        self.active[rec.id] = rec
        self.queue.append(rec.id)
        log.info("job %s (%s) queued", rec.id, spec.kind)
        self._pump()
        return rec.to_proto()

    def in_use(self, resource: str) -> str | None:
        """The id of a QUEUED or RUNNING job that reads or makes `resource` ("datasets/<n>", ...), or None."""
        return next((r.id for r in self._active() if resource in r.spec.uses or r.spec.result == resource), None)

    def writer(self, resource: str) -> str | None:
        """The id of a QUEUED or RUNNING job that makes `resource`, or None."""
        return next((r.id for r in self._active() if r.spec.result == resource), None)

    def producer(self, resource: str) -> str:
        """The id of the last SUCCEEDED job that made `resource`, or ""."""
        return self.store.last_producer(resource)

    # -- the Jobs service's operations ----------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        rec = self.active.get(job_id) or self.store.get(job_id)
        if rec is None:
            raise NotFound(f"name: no job {job_id!r}")
        return rec

    def list(self, kind: str, state: str, page_size: int, page_token: str) -> tuple[list[jpb.Job], str]:
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        rows = self.store.page(kind, state, decode_token(page_token), size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return [r.to_proto() for r in rows], encode_token(rows[-1].seq) if more else ""

    async def cancel(self, job_id: str) -> jpb.Job:
        """A queued job ends CANCELLED at once; a running one gets SIGTERM, and the answer waits a few seconds
        for it to end (CANCELLED once its process has exited)."""
        self._check_owner()
        rec = self.get(job_id)
        if rec.state == "QUEUED":
            self.queue.remove(job_id)
            self._end(rec, "CANCELLED", "cancelled before it ran")
        elif rec.state == "RUNNING":
            self.cancelling.add(job_id)
            self.children[job_id].terminate(self.grace)
            await asyncio.wait([self.tasks[job_id]], timeout=CANCEL_WAIT_S)  # the task itself is not cancelled
        else:
            raise FailedPrecondition(f"name: job {job_id} has ended ({rec.state}); only a queued or running job "
                                     "can be cancelled")
        return self.get(job_id).to_proto()

    def resume(self, job_id: str) -> jpb.Job:
        """Queue a cancelled, interrupted or failed training job again: it continues from its last checkpoint."""
        self._check_owner()
        rec = self.get(job_id)
        if rec.spec.kind != "training" or not rec.spec.resume_argv:
            raise FailedPrecondition(f"name: job {job_id} is a {rec.spec.kind} job; only training jobs resume")
        if rec.state not in RESUMABLE:
            raise FailedPrecondition(f"name: job {job_id} is {rec.state}; only a cancelled, interrupted or failed "
                                     "training job resumes")
        if other := self.writer(rec.spec.result):
            raise FailedPrecondition(f"name: job {other} is writing {rec.spec.result} now")
        self._check_room()
        rec.attempts += 1
        self.active[job_id] = rec
        self.queue.append(job_id)
        self._change(rec, "QUEUED", error="", started_at=0.0, ended_at=0.0)
        self._pump()
        return rec.to_proto()

    async def watch(self, job_id: str, since_sequence: int = 0, replay_all: bool = False
                    ) -> AsyncIterator[jpb.JobEvent]:
        """The job as it is (sequence 0), its stored events after `since_sequence` (all with `replay_all`), then
        new events as they are stored, until the job has ended and its last event was sent."""
        rec = self.get(job_id)
        wake = asyncio.Event()
        self.watchers.setdefault(job_id, set()).add(wake)
        try:
            yield jpb.JobEvent(sequence=0, time=time.time(), job=rec.to_proto())
            last = 0 if replay_all else min(since_sequence, rec.last_sequence) if since_sequence else (
                rec.last_sequence)
            while True:
                wake.clear()  # before reading: an event stored after the read wakes us
                events = self.store.events_after(job_id, last, EVENT_PAGE)
                for event in events:
                    yield event
                    last = event.sequence
                if events:
                    continue
                rec = self.get(job_id)
                if rec.ended and last >= rec.last_sequence:
                    return
                if self.draining:
                    raise Unavailable("the server is shutting down; watch the job again on its next start")
                await self._wait(wake)
        finally:
            self.watchers[job_id].discard(wake)
            if not self.watchers[job_id]:
                del self.watchers[job_id]

    async def _wait(self, wake: asyncio.Event) -> None:
        """Until new events are stored: woken by this server's jobs, or polled when another server runs them."""
        if self.owner:
            await wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), FOLLOW_S)

    # -- running jobs -------------------------------------------------------------------------------------

    def _active(self):
        return self.active.values() if self.owner else self.store.in_states(ACTIVE)

    def _check_owner(self) -> None:
        if not self.started or self.closing:
            raise Unavailable("the job manager is " + ("stopping" if self.closing else "starting"))
        if not self.owner:
            raise Unavailable(f"another server runs the jobs of the data root {self.root.path} (it holds {LOCK}); "
                              "start, cancel and resume jobs there")

    def _check_room(self) -> None:
        self._check_owner()
        free = max(0, self.max_running - len(self.children))
        if len(self.queue) + 1 > free + self.max_queued:
            raise ResourceExhausted(f"the job queue is full: {len(self.children)} running, {len(self.queue)} "
                                    f"waiting (--max-jobs {self.max_running}, --max-queued-jobs {self.max_queued})")

    def _pump(self) -> None:
        while self.started and not self.closing and self.queue and len(self.children) < self.max_running:
            self._launch(self.active[self.queue.popleft()])

    def _launch(self, rec: JobRecord) -> None:
        job_dir = self.root.folder("jobs") / rec.id
        if rec.attempts == 1 and rec.spec.kind != "training":  # a failed build or export removes what it left
            rec.removes_result = not self._result_path(rec).exists()
        child = ChildProcess(rec.argv, job_dir / LOG, job_dir, self._env(rec, job_dir), rec.spec.metrics_file)
        try:
            rec.pgid = child.start()
        except (OSError, ValueError) as e:
            self._end(rec, "FAILED", f"the job's process could not start: {e}")
            return
        log.info("job %s (%s) running: pid %d", rec.id, rec.spec.kind, rec.pgid)
        self.children[rec.id] = child
        self._share_cores()
        self._change(rec, "RUNNING", started_at=time.time())
        self.tasks[rec.id] = asyncio.get_running_loop().create_task(self._supervise(rec, child))

    def _env(self, rec: JobRecord, job_dir: Path) -> dict[str, str]:
        threads = str(max(1, self.threads // max(1, rec.spec.nproc)))  # the job's cores, shared by its processes
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        (job_dir / "tmp").mkdir(parents=True, exist_ok=True)  # temporary files stay inside the data root too
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": path, "ULM_JOB_ID": rec.id, "MPLCONFIGDIR": str(job_dir / ".matplotlib"),
                "TMPDIR": str(job_dir / "tmp")}

    async def _supervise(self, rec: JobRecord, child: ChildProcess) -> None:
        tracker = None
        if rec.spec.metrics_file:
            tracker = TrainingProgress(rec.progress, rec.eval_step, Path(rec.spec.metrics_file).parent,
                                       first_attempt=rec.attempts == 1)
        try:
            code = await child.wait(lambda lines, records: self._output(rec, tracker, lines, records))
            self._finish(rec, code, child)
        except Exception as e:  # the database or the file system failed under us: the job cannot be followed
            log.exception("job %s: supervision failed", rec.id)
            child.signal_group(signal.SIGKILL)
            self._end(rec, "FAILED", f"internal error while running the job: {type(e).__name__}: {e}")
        finally:
            self.children.pop(rec.id, None)
            self.tasks.pop(rec.id, None)
            self._share_cores()
            self._pump()

    def _share_cores(self) -> None:
        """Tell the loaded models how many cores the running jobs hold (--job-threads each)."""
        if self.shared.models is not None:
            self.shared.models.share_cores(self.threads * len(self.children))

    def _output(self, rec: JobRecord, tracker: TrainingProgress | None, lines: list[str], records: list[dict]):
        events = []
        if tracker is not None:
            events += [self._event(rec, **fields) for fields in tracker.events(records)]
            rec.eval_step = tracker.eval_step
        for line in lines:
            if rec.log_lines <= MAX_LOG_EVENTS:
                text = line if rec.log_lines < MAX_LOG_EVENTS else f"(more lines are in jobs/{rec.id}/{LOG} only)"
                events.append(self._event(rec, log=text))
                rec.log_lines += 1
        if events:
            self._commit(rec, events)

    def _finish(self, rec: JobRecord, code: int, child: ChildProcess) -> None:
        if code == 0:
            rec.result = rec.spec.result.partition("/")[2]
            rec.progress["fraction"] = 1.0
            self._end(rec, "SUCCEEDED", "")
        elif rec.id in self.cancelling:
            self._end(rec, "CANCELLED", "cancelled while it ran")
        elif self.closing:
            self._end(rec, "INTERRUPTED", "the server stopped while the job ran")
        else:
            line = child.log.failure_line()
            self._end(rec, "FAILED", line or exit_description(code))
        log.info("job %s %s (%s)", rec.id, rec.state.lower(), exit_description(code))

    def _end(self, rec: JobRecord, state: str, error: str) -> None:
        if state != "SUCCEEDED":
            self._remove_partial_result(rec)
        self.active.pop(rec.id, None)
        self.cancelling.discard(rec.id)
        self._change(rec, state, error=error, ended_at=time.time(), pgid=0)

    def _result_path(self, rec: JobRecord) -> Path:
        kind, _, name = rec.spec.result.partition("/")
        return self.root.path_for(kind, name, "result")

    def _remove_partial_result(self, rec: JobRecord) -> None:
        if rec.spec.kind == "training" or not rec.removes_result:  # a run keeps its checkpoints to resume from
            return
        try:
            shutil.rmtree(self._result_path(rec), ignore_errors=True)
        except ServiceError:  # a path that leads out of the root: never touched
            pass

    # -- events -------------------------------------------------------------------------------------------

    def _event(self, rec: JobRecord, **fields) -> jpb.JobEvent:
        rec.last_sequence += 1
        return jpb.JobEvent(sequence=rec.last_sequence, time=time.time(), **fields)

    def _change(self, rec: JobRecord, state: str, **fields) -> None:
        """A state change: the record updated and an event carrying the Job, stored together."""
        rec.state = state
        for key, value in fields.items():
            setattr(rec, key, value)
        event = self._event(rec)
        event.job.CopyFrom(rec.to_proto())
        self._commit(rec, [event])

    def _commit(self, rec: JobRecord, events: list[jpb.JobEvent]) -> None:
        self.store.commit(rec, events)
        for wake in self.watchers.get(rec.id, ()):
            wake.set()

    def _wake_all(self) -> None:
        for wakes in self.watchers.values():
            for wake in wakes:
                wake.set()


def new_job_id() -> str:
    """Sortable by creation time and unique: 20260509-142233-3fa9c1."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"jobs-before:{seq}".encode()).decode()


def decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        prefix, _, seq = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if prefix == "jobs-before" and int(seq) > 0:
            return int(seq)
    except ValueError:
        pass
    raise InvalidArgument("page_token is not a next_page_token that ListJobs returned")
