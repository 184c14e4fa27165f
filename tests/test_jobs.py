"""Jobs through ulm.v1.Jobs on a real server (a loopback port, the generated stubs): a training job streams its
progress to watchers that may come late; cancel stops it with a checkpoint and ResumeJob finishes it with the
losses of an uninterrupted run; a server killed with SIGKILL leaves the job INTERRUPTED and resumable; failures
end FAILED with their cause while generation keeps serving; a full queue, listing, paging and export."""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
from server_fixture import InProcessServer, SubprocessServer, make_toy_checkpoint

from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, jobs_pb2_grpc, models_pb2_grpc
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import text_generation_pb2 as gpb
from protos.ulm.v1 import text_generation_pb2_grpc as gpb_grpc
from ulm.data.build import build_dataset
from ulm.util import usable_cores

S = jpb.JobState
ENDED = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_INTERRUPTED}
ITERS = 500  # long enough (a couple of seconds) that a cancel lands mid-run


def tiny(max_iters: int = ITERS, *extra: str) -> list[str]:
    """A ~20k-parameter char model; the schedule does not depend on max_iters (lr_decay_iters is set)."""
    return ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", f"max_iters={max_iters}",
            "eval_interval=100", "eval_iters=2", "log_interval=10", "warmup_iters=10", "lr_decay_iters=1000",
            "dtype=float32", "device=cpu", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("jobs")
    (tmp / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    root = tmp / "root"
    build_dataset([tmp / "text.txt"], root / "datasets" / "chars", tokenizer="char", progress=False, log=None)
    # 1.4M parameters: a model over a million runs on the cores the jobs leave (server.backends.base.model_threads)
    return {"tmp": tmp, "root": root, "checkpoint": make_toy_checkpoint(tmp / "toy", n_layer=3, n_embd=192)}


def server_argv(setup: dict, root: Path) -> list[str]:
    return ["--checkpoint", str(setup["checkpoint"]), "--data-root", str(root), "--job-threads", "1",
            "--max-jobs", "1", "--max-queued-jobs", "1", "--job-cancel-grace", "10"]


@pytest.fixture(scope="module")
def server(setup):
    with InProcessServer(server_argv(setup, setup["root"])) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield jobs_pb2_grpc.JobsStub(channel)


def start(stub, model: str, overrides: list[str] | None = None, **fields) -> jpb.Job:
    fields = {"dataset": "chars", "recipe": "shakespeare-char", "seed": 1, **fields}
    return stub.StartTraining(jpb.StartTrainingRequest(model=model, overrides=tiny() if overrides is None else
                                                       overrides, **fields), timeout=10)


class Watcher(threading.Thread):
    """Collects one WatchJob stream in the background."""

    def __init__(self, stub, name: str, **request):
        super().__init__(daemon=True)
        self.events: list[jpb.JobEvent] = []
        self.error: grpc.RpcError | None = None
        self.stream = stub.WatchJob(jpb.WatchJobRequest(name=name, **request), timeout=120)
        self.start()

    def run(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except grpc.RpcError as e:  # a server that was killed
            self.error = e

    def wait_for(self, predicate, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            assert time.monotonic() < deadline and self.is_alive(), [e.WhichOneof("event") for e in self.events]
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> list[jpb.JobEvent]:
        self.join(timeout)
        assert not self.is_alive() and self.error is None, self.error
        return self.events


def steps(events: list[jpb.JobEvent]) -> list[tuple[int, float]]:
    return [(e.step.step, e.step.loss) for e in events if e.WhichOneof("event") == "step"]


def states(events: list[jpb.JobEvent]) -> list[str]:
    return [S.Name(e.job.state).removeprefix("JOB_STATE_") for e in events[1:] if e.WhichOneof("event") == "job"]


def has_steps(events) -> bool:
    return len(steps(events)) >= 3


def wait_ended(stub, name: str, timeout: float = 120) -> jpb.Job:
    deadline = time.monotonic() + timeout
    while (job := stub.GetJob(jpb.GetJobRequest(name=name), timeout=10)).state not in ENDED:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def listed_resources(channel) -> tuple[list[str], list[str]]:
    """The names ListDatasets and ListModels give."""
    datasets = datasets_pb2_grpc.DatasetsStub(channel).ListDatasets(dpb.ListDatasetsRequest(), timeout=10).datasets
    models = models_pb2_grpc.ModelsStub(channel).ListModels(mpb.ListModelsRequest(), timeout=10).models
    return [d.name for d in datasets], [m.name for m in models]


def model_threads(server) -> int:
    """The default model's torch threads, as its model process reports them."""
    return server.model_process_info()["torch_threads"]


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def reference(stub) -> dict:
    """An uninterrupted run, watched from its start, from its middle (replaying all) and from its middle (new
    events only)."""
    job = start(stub, "ref")
    first = Watcher(stub, job.name, replay_all=True)
    first.wait_for(has_steps)
    late = Watcher(stub, job.name, replay_all=True)
    live = Watcher(stub, job.name)
    events = first.finish()
    return {"job": job, "events": events, "late": late.finish(), "live": live.finish(),
            "final": stub.GetJob(jpb.GetJobRequest(name=job.id))}


def test_a_training_job_streams_its_progress_to_every_watcher(stub, reference):
    events, final = reference["events"], reference["final"]
    assert events[0].sequence == 0 and events[0].job.id == reference["job"].id
    assert [e.sequence for e in events[1:]] == list(range(1, len(events)))  # every event, in order
    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    losses = steps(events)
    assert [s for s, _ in losses] == list(range(10, ITERS + 1, 10))
    assert losses[-1][1] < 0.5 * losses[0][1]  # it learned
    evals = [e.eval for e in events if e.WhichOneof("event") == "eval"]
    assert [e.step for e in evals] == list(range(100, ITERS + 1, 100))
    assert all(math.isclose(e.val_perplexity, math.exp(e.val_loss)) for e in evals)
    assert any(e.log.startswith("done: ") for e in events if e.WhichOneof("event") == "log")
    assert final.state == S.JOB_STATE_SUCCEEDED and final.result == "ref" and final.attempts == 1
    assert final.progress.step == final.progress.total == ITERS and final.progress.fraction == 1.0
    assert final.last_sequence == events[-1].sequence
    assert json.loads(final.spec_json)["overrides"] == tiny()
    # the late watcher replayed the same events; the live one saw its snapshot, then the rest
    assert reference["late"][1:] == events[1:]
    live = reference["live"]
    assert live[0].job.state == S.JOB_STATE_RUNNING and live[1:] == events[live[0].job.last_sequence + 1:]
    n = len(events)  # a watcher that comes back after the end, from where it left
    again = list(stub.WatchJob(jpb.WatchJobRequest(name=final.name, since_sequence=n - 3), timeout=30))
    assert [e.sequence for e in again] == [0, n - 2, n - 1] and again[1:] == events[n - 2:]


def test_cancel_stops_a_run_with_its_checkpoint_and_resume_finishes_it_exactly(stub, reference):
    job = start(stub, "cancelled")
    watcher = Watcher(stub, job.name, replay_all=True)
    watcher.wait_for(has_steps)
    t0 = time.monotonic()
    stub.CancelJob(jpb.CancelJobRequest(name=job.name), timeout=30)
    cancelled = wait_ended(stub, job.name)
    assert time.monotonic() - t0 < 5
    assert cancelled.state == S.JOB_STATE_CANCELLED and 0 < cancelled.progress.step < ITERS
    assert watcher.finish()[-1].job.state == S.JOB_STATE_CANCELLED  # the watch ended with the job
    resumed = stub.ResumeJob(jpb.ResumeJobRequest(name=job.id), timeout=10)
    assert resumed.attempts == 2 and resumed.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING) and not resumed.error
    events = Watcher(stub, job.name, replay_all=True).finish()
    assert states(events) == ["QUEUED", "RUNNING", "CANCELLED", "QUEUED", "RUNNING", "SUCCEEDED"]
    assert steps(events) == steps(reference["events"])  # bit-exact on CPU: the same losses at every step
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    assert any(line.startswith("ulm train: stopped by SIGTERM at iteration") for line in logs)  # checkpoint first
    assert any("resuming at iteration" in line for line in logs)


def test_a_killed_server_leaves_the_job_interrupted_and_resumable(setup, reference):
    root = setup["tmp"] / "killed-root"
    shutil.copytree(setup["root"] / "datasets", root / "datasets")
    argv = server_argv(setup, root)
    first = SubprocessServer(argv)
    try:
        channel = grpc.insecure_channel(first.target)
        stub = jobs_pb2_grpc.JobsStub(channel)
        job = start(stub, "k")
        queued = start(stub, "q", tiny(20))  # waits for the one slot
        Watcher(stub, job.name).wait_for(has_steps)
        listed_before = listed_resources(channel)
        first.proc.kill()  # SIGKILL: no shutdown at all
        first.proc.wait(10)
        channel.close()
    finally:
        first.close()
    second = SubprocessServer(argv)
    try:
        with grpc.insecure_channel(second.target) as channel:
            stub = jobs_pb2_grpc.JobsStub(channel)
            interrupted = stub.GetJob(jpb.GetJobRequest(name=job.name), timeout=10)
            assert interrupted.state == S.JOB_STATE_INTERRUPTED and "ResumeJob" in interrupted.error
            listed = stub.ListJobs(jpb.ListJobsRequest(), timeout=10).jobs
            assert [j.id for j in listed] == [queued.id, job.id]  # newest first, both kept
            stub.ResumeJob(jpb.ResumeJobRequest(name=job.name), timeout=10)
            assert wait_ended(stub, queued.name).state == S.JOB_STATE_SUCCEEDED  # queued again at the restart
            assert wait_ended(stub, job.name).state == S.JOB_STATE_SUCCEEDED
            events = list(stub.WatchJob(jpb.WatchJobRequest(name=job.name, replay_all=True), timeout=30))
            assert states(events) == ["QUEUED", "RUNNING", "INTERRUPTED", "QUEUED", "RUNNING", "SUCCEEDED"]
            assert steps(events) == steps(reference["events"])  # it had saved its checkpoint on the way out
            datasets, models = listed_resources(channel)
            assert datasets == listed_before[0] == ["chars"]
            assert set(listed_before[1]) <= set(models) and {"k", "q"} <= set(models)
    finally:
        second.terminate()
        second.proc.wait(30)
        second.close()


def test_failures_end_the_job_with_their_cause_and_the_server_keeps_serving(server, stub, reference):
    bad = start(stub, "bad", tiny(10, "no_such_key=1"))
    failed = wait_ended(stub, bad.name)
    assert failed.state == S.JOB_STATE_FAILED and "no_such_key" in failed.error, failed.error
    code, details = code_of(lambda: start(stub, "nodata", dataset="missing"))
    assert code == grpc.StatusCode.NOT_FOUND and "dataset" in details
    with grpc.insecure_channel(server.target) as channel:
        responses = list(gpb_grpc.TextGenerationStub(channel).Generate(
            gpb.GenerateRequest(prompt="ab", max_new_tokens=4), timeout=30))
    assert responses[-1].finish_reason == gpb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("request_fields, code, field", [
    (dict(model="../x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (dict(model="a" * 300), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (dict(model="ref"), grpc.StatusCode.ALREADY_EXISTS, "model"),
    (dict(model="new", recipe="nope"), grpc.StatusCode.INVALID_ARGUMENT, "recipe"),
    (dict(model="new", dataset="../datasets/chars"), grpc.StatusCode.INVALID_ARGUMENT, "dataset"),
    (dict(model="new", nproc=1000), grpc.StatusCode.INVALID_ARGUMENT, "nproc"),
    (dict(model="", resume_from="missing"), grpc.StatusCode.NOT_FOUND, "resume_from"),
    (dict(model="other", resume_from="ref"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
])
def test_start_training_refuses_bad_requests(stub, reference, request_fields, code, field):
    fields = {"dataset": "chars", "recipe": "shakespeare-char", "overrides": tiny(), **request_fields}
    got, details = code_of(lambda: stub.StartTraining(jpb.StartTrainingRequest(**fields), timeout=10))
    assert got == code and field in details, details


def test_job_operations_refuse_what_does_not_apply(stub, reference):
    ref = reference["job"].name
    cases = [
        (lambda: stub.GetJob(jpb.GetJobRequest(name="jobs/nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.GetJob(jpb.GetJobRequest(name="jobs/../x")), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.CancelJob(jpb.CancelJobRequest(name=ref)), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: stub.ResumeJob(jpb.ResumeJobRequest(name=ref)), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: stub.ListJobs(jpb.ListJobsRequest(page_token="nope")), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.StartExport(jpb.StartExportRequest(model="missing")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.StartExport(jpb.StartExportRequest(model="ref", quantize="int4")),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        assert code_of(call)[0] == code


def test_a_full_queue_is_refused_and_generation_flows_while_a_job_trains(server, stub, reference):
    running = start(stub, "long", tiny(100_000))
    queued = start(stub, "waiting")
    assert queued.state == S.JOB_STATE_QUEUED
    code, details = code_of(lambda: start(stub, "third"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-jobs" in details
    Watcher(stub, running.name).wait_for(has_steps)
    assert model_threads(server) == max(1, usable_cores() - 1)  # the job's core (--job-threads 1) is left to it
    with grpc.insecure_channel(server.target) as channel:
        gen = gpb_grpc.TextGenerationStub(channel)
        for _ in range(3):
            assert list(gen.Generate(gpb.GenerateRequest(prompt="ab", max_new_tokens=8), timeout=30))
    assert stub.CancelJob(jpb.CancelJobRequest(name=queued.name), timeout=10).state == S.JOB_STATE_CANCELLED
    stub.CancelJob(jpb.CancelJobRequest(name=running.name), timeout=30)
    assert wait_ended(stub, running.name).state == S.JOB_STATE_CANCELLED
    deadline = time.monotonic() + 10
    while model_threads(server) != usable_cores() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_threads(server) == usable_cores()  # every core again once no job runs
    # listing: filters, then every job once across pages, newest first
    cancelled = stub.ListJobs(jpb.ListJobsRequest(state=S.JOB_STATE_CANCELLED), timeout=10).jobs
    assert {queued.id, running.id} <= {j.id for j in cancelled}
    assert all(j.state == S.JOB_STATE_CANCELLED for j in cancelled)
    everything = stub.ListJobs(jpb.ListJobsRequest(page_size=1000), timeout=10)
    assert not everything.next_page_token and [j.id for j in everything.jobs][:2] == [queued.id, running.id]
    paged, token = [], ""
    while True:
        page = stub.ListJobs(jpb.ListJobsRequest(page_size=2, page_token=token), timeout=10)
        assert len(page.jobs) <= 2
        paged += [j.id for j in page.jobs]
        if not (token := page.next_page_token):
            break
    assert paged == [j.id for j in everything.jobs]
    kinds = stub.ListJobs(jpb.ListJobsRequest(kind=jpb.JOB_KIND_EXPORT), timeout=10).jobs
    assert all(j.kind == jpb.JOB_KIND_EXPORT for j in kinds)


def test_a_training_job_with_two_processes_runs_under_torchrun(stub):
    job = start(stub, "ddp", tiny(20), nproc=2)
    events = Watcher(stub, job.name, replay_all=True).finish()
    assert events[-1].job.state == S.JOB_STATE_SUCCEEDED, events[-1].job.error
    assert [s for s, _ in steps(events)] == [10, 20]
    assert any("2 process(es) x 1 thread(s)" in e.log for e in events if e.WhichOneof("event") == "log")


def test_a_stopping_server_interrupts_its_jobs_and_a_second_server_only_reads_them(setup):
    root = setup["tmp"] / "stopped-root"
    shutil.copytree(setup["root"] / "datasets", root / "datasets")
    argv = server_argv(setup, root)
    with InProcessServer(argv) as first, grpc.insecure_channel(first.target) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        job = start(stub, "stopped", tiny(100_000))
        Watcher(stub, job.name).wait_for(has_steps)
        with InProcessServer(argv) as second, grpc.insecure_channel(second.target) as other_channel:
            other = jobs_pb2_grpc.JobsStub(other_channel)  # the same root: it reads the jobs, runs none
            assert other.GetJob(jpb.GetJobRequest(name=job.name), timeout=10).state == S.JOB_STATE_RUNNING
            code, details = code_of(lambda: start(other, "elsewhere"))
            assert code == grpc.StatusCode.UNAVAILABLE and "another server" in details
            code, _ = code_of(lambda: other.CancelJob(jpb.CancelJobRequest(name=job.name), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
            follower = Watcher(other, job.name)  # it follows the job by reading the database
            follower.wait_for(lambda events: len(steps(events)) >= 2)
    with InProcessServer(argv) as again, grpc.insecure_channel(again.target) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        interrupted = stub.GetJob(jpb.GetJobRequest(name=job.name), timeout=10)
        assert interrupted.state == S.JOB_STATE_INTERRUPTED and interrupted.progress.step > 0
        stub.ResumeJob(jpb.ResumeJobRequest(name=job.name), timeout=10)
        watcher = Watcher(stub, job.name)
        watcher.wait_for(lambda events: any("resuming at iteration" in e.log for e in events))
        resumed_at = next(int(e.log.split("resuming at iteration ")[1].split()[0]) for e in watcher.events
                          if "resuming at iteration" in e.log)
        assert resumed_at >= interrupted.progress.step  # from the checkpoint it wrote when the server stopped
        stub.CancelJob(jpb.CancelJobRequest(name=job.name), timeout=30)
        assert wait_ended(stub, job.name).state == S.JOB_STATE_CANCELLED
