"""Datasets built by jobs through ulm.v1.Datasets on a real server: the job manager's child runs `python -m ulm
data build`, so the dataset a job makes is the one the CLI makes from the same upload and options (same id); its
sources stay and its name is taken while it runs; a corrupt upload fails its job and nothing else."""
from __future__ import annotations

import json
import time

import grpc
import pytest
from pipeline_client import rpc_error, upload
from server_fixture import InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc, jobs_pb2_grpc
from protos.ulm.v1 import files_pb2 as fpb
from protos.ulm.v1 import jobs_pb2 as jpb
from ulm.data.build import build_dataset
from ulm.data.dataset import dataset_id

pytest.importorskip("server.jobs.manager")  # written beside this service; these tests run once it exists
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)).encode()
RECORDS = "".join(json.dumps({"body": f"record {i}: " + "pack my box with five dozen liquor jugs " * (i % 4 + 1),
                              "id": i}) + "\n" for i in range(60)).encode()


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    checkpoint = make_toy_checkpoint(tmp_path_factory.mktemp("toy"))
    root = tmp_path_factory.mktemp("jobs") / "root"
    with InProcessServer(["--checkpoint", str(checkpoint), "--data-root", str(root)]) as s, \
            grpc.insecure_channel(s.target) as channel:
        yield root, files_pb2_grpc.FilesStub(channel), datasets_pb2_grpc.DatasetsStub(channel), channel


def job_state(channel, job_id: str):
    """The job as the Jobs service reports it, or None where this server has no Jobs service."""
    try:
        return jobs_pb2_grpc.JobsStub(channel).GetJob(jpb.GetJobRequest(name=job_id), timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


def wait_dataset(datasets, channel, name: str, job_id: str, timeout: float = 120) -> dpb.Dataset:
    """The dataset once job `job_id` has built it (failing early if the job fails)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (d := datasets.GetDataset(dpb.GetDatasetRequest(name=name), timeout=10)).job == job_id:
                return d
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, f"dataset {name} not built by job {job_id} within {timeout} s"
        job = job_state(channel, job_id)
        assert job is None or job.state != jpb.JOB_STATE_FAILED, job.error
        time.sleep(0.1)


def source(**kw) -> dpb.DatasetSource:
    return dpb.DatasetSource(**kw)


def listed(files) -> set[str]:
    return {f.name for f in files.ListFiles(fpb.ListFilesRequest()).files}


def built_here(tmp_path, name: str, data: bytes, **options) -> str:
    """The id `ulm data build` gives the same upload with the same options (the server's path must match it)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / name).write_bytes(data)
    out = build_dataset([tmp_path / "src" / name], tmp_path / "here", progress=False, log=None, **options)
    return dataset_id(out)


def test_a_dataset_job_builds_what_ulm_data_build_builds(job_server, tmp_path):
    root, files, datasets, channel = job_server
    info = upload(files, "corpus.txt", TEXT)
    job = datasets.CreateDataset(dpb.CreateDatasetRequest(name="built", sources=[source(file="corpus.txt")]))
    assert job.kind == jpb.JOB_KIND_DATASET and job.id
    assert job.state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING)
    assert json.loads(job.spec_json)["name"] == "built"
    # while it runs, its source stays and its name is taken (a child's start takes far longer than these calls)
    err = rpc_error(files.DeleteFile, fpb.DeleteFileRequest(name="corpus.txt"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in err.details()
    err = rpc_error(datasets.CreateDataset, dpb.CreateDatasetRequest(name="built", sources=[source(file="corpus.txt")]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in err.details()

    d = wait_dataset(datasets, channel, "built", job.id)
    assert d.job == job.id and d.tokenizer == "char"
    assert d.id == built_here(tmp_path, "corpus.txt", TEXT)
    manifest = json.loads(d.manifest_json)
    assert manifest["sources"][0]["files"] == [{"name": "corpus.txt", "bytes": len(TEXT), "sha256": info.sha256}]
    assert str(root) not in d.manifest_json  # the server's disk layout does not leak
    assert [x.job for x in datasets.ListDatasets(dpb.ListDatasetsRequest()).datasets if x.name == "built"] == [job.id]
    err = rpc_error(datasets.CreateDataset, dpb.CreateDatasetRequest(name="built", sources=[source(file="corpus.txt")]))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    files.DeleteFile(fpb.DeleteFileRequest(name="corpus.txt"))  # the job has ended: free again
    datasets.DeleteDataset(dpb.DeleteDatasetRequest(name="built"))


def test_every_option_reaches_the_build(job_server, tmp_path):
    root, files, datasets, channel = job_server
    upload(files, "records.jsonl", RECORDS)
    request = dpb.CreateDatasetRequest(name="records", sources=[source(file="records.jsonl")], jsonl_field="body",
                                       tokenizer="bytes", val_fraction=0.2, test_fraction=0.2, text_unit="line",
                                       normalization="NFKC", no_whitespace_cleanup=True, no_dedup=True,
                                       min_chars=20, shuffle_seed=3)
    job = datasets.CreateDataset(request)
    d = wait_dataset(datasets, channel, "records", job.id)
    assert d.tokenizer == "byte" and [s.name for s in d.splits] == ["train", "val", "test"]
    assert d.id == built_here(tmp_path, "records.jsonl", RECORDS, jsonl_field="body", tokenizer="byte",
                              val_fraction=0.2, test_fraction=0.2, text_unit="line", normalization="NFKC",
                              whitespace=False, dedup=False, min_chars=20, shuffle_seed=3)
    overwrite = dpb.CreateDatasetRequest(name="records", sources=[source(file="records.jsonl")], jsonl_field="body",
                                         overwrite=True)
    d2 = wait_dataset(datasets, channel, "records", datasets.CreateDataset(overwrite).id)
    assert d2.tokenizer == "char" and d2.id != d.id


def test_a_corrupt_local_copy_fails_its_job_and_nothing_else(job_server):
    pytest.importorskip("server.services.jobs")
    root, files, datasets, channel = job_server
    upload(files, "not-shakespeare.txt", b"to be or not to be\n" * 10)
    job = datasets.CreateDataset(dpb.CreateDatasetRequest(
        name="shakespeare", sources=[source(corpus="tinyshakespeare", local_copy="not-shakespeare.txt")]))
    deadline = time.monotonic() + 120
    while (j := job_state(channel, job.id)).state in (jpb.JOB_STATE_QUEUED, jpb.JOB_STATE_RUNNING):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert j.state == jpb.JOB_STATE_FAILED and "SHA-256" in j.error, j.error
    err = rpc_error(datasets.GetDataset, dpb.GetDatasetRequest(name="shakespeare"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "not-shakespeare.txt" in listed(files)
