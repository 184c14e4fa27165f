"""ulm.v1.Files and ulm.v1.Datasets against a real server on a loopback port, through the generated stubs:
uploads (chunks, hashes, caps, broken streams, restarts), datasets in the data root, CreateDataset's checks
(datasets built by jobs: test_dataset_jobs.py)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
from pipeline_client import rpc_error, tree, upload, upload_requests
from server_fixture import InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc
from protos.ulm.v1 import files_pb2 as fpb
from ulm.checkpoint import save_checkpoint
from ulm.config import gpt_preset
from ulm.data.build import build_dataset
from ulm.model import GPT

MAX_FILE, MAX_TOTAL = 65536, 524288
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)).encode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The data root, with one dataset built in place before the server starts (no job manager needed)."""
    root = tmp_path_factory.mktemp("data") / "root"
    text = tmp_path_factory.mktemp("text") / "planted.txt"
    text.write_bytes(TEXT)
    build_dataset([text], root / "datasets" / "planted", progress=False, log=None)
    return root


@pytest.fixture(scope="module")
def server(checkpoint, root):
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(root), "--max-file-bytes", str(MAX_FILE),
            "--max-files-bytes", str(MAX_TOTAL)]
    with InProcessServer(argv) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture
def files(channel):
    """The Files stub; every file a test uploads is deleted after it."""
    stub = files_pb2_grpc.FilesStub(channel)
    before = {f.name for f in stub.ListFiles(fpb.ListFilesRequest()).files}
    yield stub
    for f in stub.ListFiles(fpb.ListFilesRequest()).files:
        if f.name not in before:
            stub.DeleteFile(fpb.DeleteFileRequest(name=f.name))


@pytest.fixture
def datasets(channel):
    return datasets_pb2_grpc.DatasetsStub(channel)


def listed(files) -> dict[str, fpb.FileInfo]:
    return {f.name: f for f in files.ListFiles(fpb.ListFilesRequest()).files}


def test_an_upload_is_stored_with_its_size_and_sha256(files):
    data = bytes(range(256)) * 40 + b"tail"
    t0 = time.time()
    info = upload(files, "mixed.bin", data, chunk=1000)
    assert (info.name, info.size_bytes, info.sha256) == ("mixed.bin", len(data), hashlib.sha256(data).hexdigest())
    assert t0 - 1 <= info.created_at <= time.time() + 1
    assert files.GetFile(fpb.GetFileRequest(name="mixed.bin")) == info
    assert listed(files)["mixed.bin"] == info
    empty = upload(files, "empty.txt", b"")
    assert (empty.size_bytes, empty.sha256) == (0, hashlib.sha256(b"").hexdigest())


def test_a_name_taken_is_already_exists_unless_overwrite(files):
    upload(files, "notes.txt", b"first")
    err = rpc_error(files.UploadFile, upload_requests("notes.txt", b"second"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "header.name" in err.details()
    assert files.GetFile(fpb.GetFileRequest(name="notes.txt")).sha256 == hashlib.sha256(b"first").hexdigest()
    info = upload(files, "notes.txt", b"second", overwrite=True)
    assert info.sha256 == hashlib.sha256(b"second").hexdigest()
    assert listed(files)["notes.txt"].sha256 == info.sha256


def test_delete_file(files):
    upload(files, "gone.txt", b"x")
    files.DeleteFile(fpb.DeleteFileRequest(name="gone.txt"))
    assert "gone.txt" not in listed(files)
    for call, request in [(files.GetFile, fpb.GetFileRequest(name="gone.txt")),
                          (files.DeleteFile, fpb.DeleteFileRequest(name="gone.txt"))]:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "name" in err.details()


def test_the_first_message_is_the_header_and_only_the_first(files, root):
    before = tree(root)
    cases = [[], [fpb.UploadFileRequest(chunk=b"text first")],
             [*upload_requests("twice.txt", b"abc"), fpb.UploadFileRequest(header=fpb.UploadFileHeader(name="x"))]]
    for requests in cases:
        err = rpc_error(files.UploadFile, iter(requests))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in err.details()
    assert "twice.txt" not in listed(files)
    assert tree(root) == before


def test_an_upload_over_the_file_cap_keeps_nothing(files, root):
    before = tree(root)
    err = rpc_error(files.UploadFile, upload_requests("big.txt", b"a" * (MAX_FILE + 1), chunk=8192))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-file-bytes" in err.details()
    assert "big.txt" not in listed(files)
    assert tree(root) == before  # no temporary left behind either
    assert upload(files, "big.txt", b"a" * MAX_FILE).size_bytes == MAX_FILE  # the cap itself is allowed


def test_the_total_cap_counts_every_upload(files, root):
    stored = sum(f.size_bytes for f in listed(files).values())
    size = 60000
    names = [f"part{i}.txt" for i in range((MAX_TOTAL - stored) // size)]
    for name in names:
        upload(files, name, b"b" * size)
    before = tree(root)
    err = rpc_error(files.UploadFile, upload_requests("one-more.txt", b"b" * size))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-files-bytes" in err.details()
    assert tree(root) == before
    # replacing a file counts its new size instead of its old one
    assert upload(files, names[0], b"c" * size, overwrite=True).size_bytes == size
    files.DeleteFile(fpb.DeleteFileRequest(name=names[1]))
    assert upload(files, "one-more.txt", b"b" * size).size_bytes == size


def test_a_broken_upload_leaves_nothing_and_other_calls_flow_meanwhile(files, server, root):
    service = next(s for s in server.app.services if s.name == "ulm.v1.Files")
    release = threading.Event()

    def stalled():  # declares 20 bytes, sends 10, then waits
        yield fpb.UploadFileRequest(header=fpb.UploadFileHeader(name="broken.txt", size_bytes=20))
        yield fpb.UploadFileRequest(chunk=b"half of it")
        release.wait(30)

    before = tree(root)
    call = files.UploadFile.future(stalled(), timeout=30)
    try:
        assert server.wait_until(lambda: service.receiving.get("broken.txt") == 10)
        assert len(list(root.glob("files/.upload-*"))) == 1  # it is written into files/ as it arrives
        t0 = time.perf_counter()
        assert "broken.txt" not in listed(files)  # the loop is free while the upload waits
        assert time.perf_counter() - t0 < 1.0
        err = rpc_error(files.UploadFile, upload_requests("broken.txt", b"again"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in err.details()
        call.cancel()
        assert server.wait_until(lambda: not service.receiving)
    finally:
        release.set()
    assert tree(root) == before
    assert upload(files, "broken.txt", b"whole").size_bytes == 5


def test_an_upload_shorter_than_declared_is_refused_and_not_kept(files, root):
    before = tree(root)
    short = [fpb.UploadFileRequest(header=fpb.UploadFileHeader(name="short.txt", size_bytes=20)),
             fpb.UploadFileRequest(chunk=b"half of it")]
    err = rpc_error(files.UploadFile, iter(short))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "header.size_bytes" in err.details()
    assert tree(root) == before


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_uploads_survive_a_restart_and_the_table_follows_the_folder(checkpoint, tmp_path):
    root = tmp_path / "root"
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(root)]
    with InProcessServer(argv) as s, grpc.insecure_channel(s.target) as channel:
        stub = files_pb2_grpc.FilesStub(channel)
        kept, lost = upload(stub, "kept.txt", b"kept"), upload(stub, "lost.txt", b"lost")
    (root / "files" / "lost.txt").unlink()  # removed by hand while the server was down
    (root / "files" / "by-hand.txt").write_bytes(b"put there")
    temp = root / "files" / f".upload-{dead_pid()}-0123456789abcdef"
    temp.write_bytes(b"a dead upload's bytes")
    with InProcessServer(argv) as s, grpc.insecure_channel(s.target) as channel:
        now = listed(files_pb2_grpc.FilesStub(channel))
    assert now["kept.txt"] == kept and "lost.txt" not in now and lost.name == "lost.txt"
    assert now["by-hand.txt"].sha256 == hashlib.sha256(b"put there").hexdigest()
    assert not temp.exists()


# -- Datasets -------------------------------------------------------------------------------------------------


def test_a_dataset_built_in_place_is_listed_with_its_manifest(datasets, root):
    d = datasets.GetDataset(dpb.GetDatasetRequest(name="planted"))
    manifest_text = (root / "datasets" / "planted" / "manifest.json").read_text()
    assert d.manifest_json == manifest_text and json.loads(d.manifest_json)["format"] == "ulm-dataset/1"
    assert d.id == hashlib.sha256(manifest_text.encode()).hexdigest()
    manifest = json.loads(d.manifest_json)
    assert (d.tokenizer, d.vocab_size) == ("char", manifest["tokenizer"]["vocab_size"])
    assert d.vocab_size > len(set(TEXT.decode()))
    assert [s.name for s in d.splits] == ["train", "val"]
    for split in d.splits:  # char-level, one document per split: a token per character
        info = manifest["splits"][split.name]
        assert (split.num_tokens, split.num_documents, split.dtype, split.sha256) == (
            info["num_chars"], 1, info["dtype"], info["sha256"])
    assert len(TEXT) - 3 <= sum(s.num_tokens for s in d.splits) <= len(TEXT)  # trailing space and a cut newline
    assert d.job == ""  # not built by a job
    assert [x.name for x in datasets.ListDatasets(dpb.ListDatasetsRequest()).datasets] == ["planted"]


def test_unfinished_and_hidden_folders_are_not_datasets(datasets, root):
    (root / "datasets" / "half").mkdir()
    (root / "datasets" / ".half.tmp-1").mkdir()
    try:
        assert [x.name for x in datasets.ListDatasets(dpb.ListDatasetsRequest()).datasets] == ["planted"]
        err = rpc_error(datasets.GetDataset, dpb.GetDatasetRequest(name="half"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "name" in err.details()
    finally:
        (root / "datasets" / "half").rmdir()
        (root / "datasets" / ".half.tmp-1").rmdir()


def test_delete_dataset_unless_a_model_was_trained_on_it(datasets, tmp_path, root):
    text = tmp_path / "doomed.txt"
    text.write_bytes(TEXT)
    build_dataset([text], root / "datasets" / "doomed", progress=False, log=None)
    assert "doomed" in {x.name for x in datasets.ListDatasets(dpb.ListDatasetsRequest()).datasets}
    model = root / "models" / "trained-on-doomed"
    save_checkpoint(model / "best", GPT(gpt_preset("toy")), extra={"dataset": str(root / "datasets" / "doomed")})
    try:
        err = rpc_error(datasets.DeleteDataset, dpb.DeleteDatasetRequest(name="doomed"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "trained-on-doomed" in err.details()
        assert (root / "datasets" / "doomed" / "manifest.json").is_file()
    finally:
        shutil.rmtree(model)
    datasets.DeleteDataset(dpb.DeleteDatasetRequest(name="doomed"))
    assert not (root / "datasets" / "doomed").exists() and not list((root / "datasets").glob(".doomed*"))
    err = rpc_error(datasets.GetDataset, dpb.GetDatasetRequest(name="doomed"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def source(**kw) -> dpb.DatasetSource:
    return dpb.DatasetSource(**kw)


BAD_REQUESTS = [  # (request fields, code, what the message names)
    (dict(sources=[]), "INVALID_ARGUMENT", "sources"),
    (dict(sources=[source()]), "INVALID_ARGUMENT", "sources[0]"),
    (dict(sources=[source(file="src.txt"), source(file="missing.txt")]), "NOT_FOUND", "sources[1].file"),
    (dict(sources=[source(corpus="no-such-corpus")]), "INVALID_ARGUMENT", "sources[0].corpus"),
    (dict(sources=[source(file="src.txt", local_copy="src.txt")]), "INVALID_ARGUMENT", "sources[0].local_copy"),
    (dict(sources=[source(corpus="tinyshakespeare", local_copy="missing.txt")]), "NOT_FOUND",
     "sources[0].local_copy"),
    (dict(tokenizer="word"), "INVALID_ARGUMENT", "tokenizer"),
    (dict(vocab_size=300), "INVALID_ARGUMENT", "vocab_size"),
    (dict(tokenizer="bpe", vocab_size=100), "INVALID_ARGUMENT", "vocab_size"),
    (dict(val_fraction=1.0), "INVALID_ARGUMENT", "val_fraction"),
    (dict(val_fraction=-0.1), "INVALID_ARGUMENT", "val_fraction"),
    (dict(val_fraction=math.nan), "INVALID_ARGUMENT", "val_fraction"),
    (dict(val_fraction=0.6, test_fraction=0.5), "INVALID_ARGUMENT", "test_fraction"),
    (dict(text_unit="word"), "INVALID_ARGUMENT", "text_unit"),
    (dict(normalization="NFX"), "INVALID_ARGUMENT", "normalization"),
    (dict(name="planted"), "ALREADY_EXISTS", "name"),
]


@pytest.mark.parametrize("fields, code, field", BAD_REQUESTS, ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_REQUESTS)])
def test_create_dataset_checks_every_field_up_front(files, datasets, root, fields, code, field):
    upload(files, "src.txt", TEXT)
    request = dpb.CreateDatasetRequest(**{"name": "fresh", "sources": [source(file="src.txt")], **fields})
    before = tree(root)
    err = rpc_error(datasets.CreateDataset, request)
    assert err.code() == getattr(grpc.StatusCode, code) and field in err.details(), err.details()
    assert tree(root) == before

