"""The whole loop through the API alone (a real server on a loopback port, the generated stubs; the test never
looks at the data root): upload a text, build a char dataset, train a tiny model while two watchers follow it (one
from the start, one that joins late and replays), export it to int8, load the checkpoint (torch) and the export
(onnx), and generate from each by name."""
from __future__ import annotations

import threading

import grpc
import pytest
from pipeline_client import LOOP_ITERS, LOOP_TEXT, LOOP_TRAINING, upload
from server_fixture import InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc, jobs_pb2_grpc, models_pb2_grpc
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import text_generation_pb2 as gpb
from protos.ulm.v1 import text_generation_pb2_grpc as gpb_grpc

S = jpb.JobState


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    argv = ["--checkpoint", str(make_toy_checkpoint(tmp / "toy")), "--data-root", str(tmp / "root"),
            "--job-threads", "1"]
    with InProcessServer(argv) as server, grpc.insecure_channel(server.target) as channel:
        yield channel


def watch(jobs, name: str, **request) -> list[jpb.JobEvent]:
    return list(jobs.WatchJob(jpb.WatchJobRequest(name=name, **request), timeout=300))


def final_job(events: list[jpb.JobEvent]) -> jpb.Job:
    return [e.job for e in events if e.WhichOneof("event") == "job"][-1]


def states(events: list[jpb.JobEvent]) -> list[str]:
    return [S.Name(e.job.state).removeprefix("JOB_STATE_") for e in events[1:] if e.WhichOneof("event") == "job"]


def train_watched_twice(jobs, job: jpb.Job) -> tuple[list[jpb.JobEvent], list[jpb.JobEvent]]:
    """One watcher from the start; a second one joins once steps flow and replays everything."""
    first: list[jpb.JobEvent] = []
    stepping = threading.Event()

    def follow():
        for event in jobs.WatchJob(jpb.WatchJobRequest(name=job.name), timeout=300):
            first.append(event)
            if event.WhichOneof("event") == "step":
                stepping.set()
        stepping.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert stepping.wait(120)
    late = watch(jobs, job.name, replay_all=True)
    thread.join(300)
    return first, late


def test_from_raw_text_to_served_models(channel):
    files = files_pb2_grpc.FilesStub(channel)
    datasets = datasets_pb2_grpc.DatasetsStub(channel)
    jobs = jobs_pb2_grpc.JobsStub(channel)
    models = models_pb2_grpc.ModelsStub(channel)
    generation = gpb_grpc.TextGenerationStub(channel)

    assert upload(files, "pets.txt", LOOP_TEXT.encode()).size_bytes == len(LOOP_TEXT)
    built = datasets.CreateDataset(dpb.CreateDatasetRequest(
        name="pets", sources=[dpb.DatasetSource(file="pets.txt")], tokenizer="char"), timeout=10)
    assert final_job(watch(jobs, built.name)).state == S.JOB_STATE_SUCCEEDED
    dataset = datasets.GetDataset(dpb.GetDatasetRequest(name="pets"), timeout=10)
    assert dataset.tokenizer == "char" and {s.name for s in dataset.splits} >= {"train", "val"}

    job = jobs.StartTraining(jpb.StartTrainingRequest(dataset="pets", recipe="shakespeare-char", model="m",
                                                      overrides=LOOP_TRAINING, seed=1), timeout=10)
    first, late = train_watched_twice(jobs, job)
    assert final_job(first).state == S.JOB_STATE_SUCCEEDED, final_job(first).error
    assert states(late) == ["QUEUED", "RUNNING", "SUCCEEDED"] and states(first)[-1] == "SUCCEEDED"
    sequences = [e.sequence for e in first[1:]]
    assert sequences == sorted(set(sequences))  # in order, none twice
    assert [e.sequence for e in late[1:]] == list(range(1, late[-1].sequence + 1))  # the whole history
    live = {e.sequence: e for e in late}
    assert all(live[e.sequence] == e for e in first[1:])  # the late watcher saw the same events
    losses = [e.step.loss for e in late if e.WhichOneof("event") == "step"]
    assert [e.step.step for e in late if e.WhichOneof("event") == "step"][-1] == LOOP_ITERS
    assert losses[-1] < 0.6 * losses[0], losses
    assert final_job(late).result == "m"

    export = jobs.StartExport(jpb.StartExportRequest(model="m", quantize="int8"), timeout=10)
    exported = final_job(watch(jobs, export.name))
    assert exported.state == S.JOB_STATE_SUCCEEDED, exported.error
    onnx_name = exported.result
    with pytest.raises(grpc.RpcError) as again:  # an export is done once: no resume, no second export of the name
        jobs.ResumeJob(jpb.ResumeJobRequest(name=export.name), timeout=10)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as again:
        jobs.StartExport(jpb.StartExportRequest(model="m", quantize="int8"), timeout=10)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS and "name" in again.value.details()

    assert models.LoadModel(mpb.LoadModelRequest(name="m"), timeout=60).backend == "torch"
    assert models.LoadModel(mpb.LoadModelRequest(name=onnx_name), timeout=60).backend == "onnx"
    lineage = models.GetModel(mpb.GetModelRequest(name=onnx_name), timeout=10)
    assert lineage.source_model == "m" and lineage.quantization == "int8" and lineage.loaded
    assert models.GetModel(mpb.GetModelRequest(name="m"), timeout=10).training_job == job.id
    for name in ("m", onnx_name):
        out = list(generation.Generate(gpb.GenerateRequest(model=name, prompt="the cat", max_new_tokens=24),
                                       timeout=60))
        text = "".join(r.text for r in out)
        assert out[-1].usage.completion_tokens == 24 and len(text) == 24  # char model: a character a token
        assert set(text) <= set(LOOP_TEXT)
