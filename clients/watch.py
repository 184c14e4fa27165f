"""`jobs watch` (and every `--watch`): a live tqdm progress bar from the WatchJob stream.

The bar counts training steps (loss, learning rate, tokens/s and the server's ETA beside it); evaluations and
the job's log lines are printed above it. Where stderr is not a terminal (a log file, CI) there is no bar, whose
redraws would become lines, but plain lines: each state change, a step line at most every LINE_INTERVAL_S.
The watch ends with the job: exit code 0 when it SUCCEEDED, 1 with its error otherwise. Leaving a watch
(Ctrl-C) leaves the job running; `jobs watch ID` comes back to it.
"""
from __future__ import annotations

import sys
import time

import grpc
from tqdm import tqdm

from clients.output import duration, enum_name
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import jobs_pb2_grpc

ENDED = {jpb.JOB_STATE_SUCCEEDED, jpb.JOB_STATE_FAILED, jpb.JOB_STATE_CANCELLED, jpb.JOB_STATE_INTERRUPTED}
# bars without a total: a job that counts no steps (dataset, export), or training before its total is known
NO_TOTAL_FORMAT = "{desc}[{elapsed}]"  # tqdm ends desc with ": "
STEPS_FORMAT = "{desc}{n_fmt} steps [{elapsed}{postfix}]"
ASK_TOTAL_EVERY_S = 1.0
LINE_INTERVAL_S = 15.0


def state_name(state: int) -> str:
    return enum_name(jpb.JobState.Name(state))


def kind_name(kind: int) -> str:
    return enum_name(jpb.JobKind.Name(kind)).lower()


class ProgressView:
    """One job's bar: created on the first message (the job as it is), moved by step events."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.plain = not getattr(self.stream, "isatty", lambda: False)()
        self.total, self.state, self.line_t = 0, None, -float("inf")

    def job(self, job: jpb.Job) -> None:
        if self.plain:
            self.total = job.progress.total or self.total
            if job.state != self.state:
                self.state = job.state
                steps = f" at step {job.progress.step}/{self.total}" if self.total else ""
                print(f"job {job.id} {kind_name(job.kind)} {state_name(job.state)}{steps}", file=self.stream,
                      flush=True)
            return
        if self.bar is None:
            self.bar = tqdm(total=job.progress.total or None, initial=job.progress.step, unit="step", desc=job.id,
                            file=self.stream, dynamic_ncols=True, leave=True,
                            bar_format=None if job.progress.total else NO_TOTAL_FORMAT)
        if job.progress.total and self.bar.total != job.progress.total:
            self.bar.total = job.progress.total  # known once the run has read its config
            self.bar.bar_format = None
        self.bar.set_description(f"{job.id} {kind_name(job.kind)} {state_name(job.state)}", refresh=False)
        if job.progress.step > self.bar.n:
            self.bar.update(job.progress.step - self.bar.n)
        self.bar.refresh()

    @property
    def has_total(self) -> bool:
        return bool(self.total) if self.plain else self.bar is not None and bool(self.bar.total)

    def step(self, event: jpb.StepEvent) -> None:
        if self.plain:
            last = bool(self.total) and event.step >= self.total
            if last or time.monotonic() - self.line_t >= LINE_INTERVAL_S:
                self.line_t = time.monotonic()
                print(f"step {event.step}{f'/{self.total}' if self.total else ''}: loss {event.loss:.4f}, "
                      f"lr {event.learning_rate:.2e}, {event.tokens_per_s:.0f} tok/s, eta {duration(event.eta_s)}",
                      file=self.stream, flush=True)
            return
        if self.bar is None:
            return
        if not self.has_total:
            self.bar.bar_format = STEPS_FORMAT
        self.bar.set_postfix_str(f"loss {event.loss:.4f}, lr {event.learning_rate:.2e}, "
                                 f"{event.tokens_per_s:.0f} tok/s, eta {duration(event.eta_s)}", refresh=False)
        self.bar.update(max(0, event.step - self.bar.n))

    def eval(self, event: jpb.EvalEvent) -> None:
        accuracy = f", exact match {event.val_accuracy:.3f}" if event.val_accuracy else ""
        self.write(f"eval at step {event.step}: val loss {event.val_loss:.4f}, "
                   f"perplexity {event.val_perplexity:.2f}{accuracy}")

    def write(self, line: str) -> None:
        if self.plain:
            print(line.rstrip("\n"), flush=True)
        else:
            tqdm.write(line.rstrip("\n"), file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def follow(stub: jobs_pb2_grpc.JobsStub, name: str, view: ProgressView, replay: bool,
           timeout: float | None) -> jpb.Job | None:
    """Show the stream's events until it ends; the last state of the job it reported."""
    job, replayed_to, asked = None, 0, 0.0
    for event in stub.WatchJob(jpb.WatchJobRequest(name=name, replay_all=replay), timeout=timeout):
        which = event.WhichOneof("event")
        if which == "job":
            if job is None:  # the snapshot: replayed state changes up to its last_sequence are older than it
                replayed_to = event.job.last_sequence
            if job is None or event.sequence > replayed_to:
                job = event.job
                view.job(job)
        elif which == "step":
            view.step(event.step)
            if not view.has_total and time.monotonic() - asked > ASK_TOTAL_EVERY_S:
                asked = time.monotonic()  # steps carry no total: the job's progress has it once the run started
                view.job(stub.GetJob(jpb.GetJobRequest(name=name), timeout=timeout))
        elif which == "eval":
            view.eval(event.eval)
        elif which == "log":
            view.write(event.log)
    return job


def watch_job(channel: grpc.Channel, name: str, replay: bool = False, timeout: float | None = None) -> int:
    """Watch a job to its end; 0 when it SUCCEEDED, 1 otherwise (its error printed)."""
    stub = jobs_pb2_grpc.JobsStub(channel)
    view = ProgressView()
    try:
        job = follow(stub, name, view, replay, timeout)
    except KeyboardInterrupt:
        view.close()  # the bar's last state first, then the hint under it
        print(f"left the watch; the job goes on (jobs watch {name} comes back to it)", file=sys.stderr)
        raise
    finally:
        view.close()
    if job is None or job.state not in ENDED:  # the stream ended early: ask for the job as it is now
        job = stub.GetJob(jpb.GetJobRequest(name=name), timeout=timeout)
    took = f" in {duration(job.ended_at - job.started_at)}" if job.ended_at and job.started_at else ""
    if job.state == jpb.JOB_STATE_SUCCEEDED:
        print(f"job {job.id} SUCCEEDED{took}: {job.result}")
        return 0
    if job.state in ENDED:
        print(f"error: job {job.id} {state_name(job.state)}{took}: {job.error or '(no message)'}", file=sys.stderr)
    else:
        print(f"error: the watch of job {job.id} ended while it is {state_name(job.state)}", file=sys.stderr)
    return 1
