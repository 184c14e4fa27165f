"""The data root confines every name a request gives: a matrix of bad names and planted symlinks against every
Files and Datasets method that takes one. Each is refused with the right code, naming the field, and leaves the
data root and the folder outside it exactly as they were."""
from __future__ import annotations

import grpc
import pytest
from pipeline_client import rpc_error, tree, upload, upload_requests
from server_fixture import InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc
from protos.ulm.v1 import files_pb2 as fpb
from server.data_root import DataRoot

BAD_NAMES = ["../x", "/etc/passwd", "a/b", "a\0b", "x" * 300, "", "..", ".hidden", "-dash", "a b"]
SECRET = b"outside the data root\n"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """tmp/root (the data root, with links in files/ and datasets/ that lead out) and tmp/outside."""
    base = tmp_path_factory.mktemp("confinement")
    root = DataRoot(base / "root").path
    outside = base / "outside"
    (outside / "dataset").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "dataset" / "manifest.json").write_text("{}")
    (root / "files" / "link.txt").symlink_to(outside / "secret.txt")
    (root / "files" / "dangling.txt").symlink_to(outside / "nothing-here.txt")
    (root / "datasets" / "linkds").symlink_to(outside / "dataset", target_is_directory=True)
    return base


@pytest.fixture(scope="module")
def stubs(place, tmp_path_factory):
    checkpoint = make_toy_checkpoint(tmp_path_factory.mktemp("toy"))
    with InProcessServer(["--checkpoint", str(checkpoint), "--data-root", str(place / "root")]) as s, \
            grpc.insecure_channel(s.target) as channel:
        files = files_pb2_grpc.FilesStub(channel)
        upload(files, "dup.txt", b"the first upload")
        yield files, datasets_pb2_grpc.DatasetsStub(channel)


def calls_naming(name: str) -> list[tuple[str, str, object]]:
    """(method, the field that carries `name`, the call) for every method that takes a name."""
    ok = dpb.DatasetSource(file="dup.txt")
    local_copy = [] if not name else [  # an empty local_copy is none: the corpus would be downloaded
        ("CreateDataset", "sources[0].local_copy", lambda f, d: d.CreateDataset(dpb.CreateDatasetRequest(
            name="fresh", sources=[dpb.DatasetSource(corpus="tinyshakespeare", local_copy=name)]), timeout=10))]
    return [*local_copy,
        ("UploadFile", "header.name", lambda f, d: f.UploadFile(upload_requests(name, b"data", overwrite=True),
                                                                 timeout=10)),
        ("GetFile", "name", lambda f, d: f.GetFile(fpb.GetFileRequest(name=name), timeout=10)),
        ("DeleteFile", "name", lambda f, d: f.DeleteFile(fpb.DeleteFileRequest(name=name), timeout=10)),
        ("CreateDataset", "name", lambda f, d: d.CreateDataset(
            dpb.CreateDatasetRequest(name=name, sources=[ok], overwrite=True), timeout=10)),
        ("CreateDataset", "sources[0].file", lambda f, d: d.CreateDataset(
            dpb.CreateDatasetRequest(name="fresh", sources=[dpb.DatasetSource(file=name)]), timeout=10)),
        ("GetDataset", "name", lambda f, d: d.GetDataset(dpb.GetDatasetRequest(name=name), timeout=10)),
        ("DeleteDataset", "name", lambda f, d: d.DeleteDataset(dpb.DeleteDatasetRequest(name=name), timeout=10)),
    ]


def refused(stubs, place, call) -> grpc.RpcError:
    """The call's error, checking that nothing under tmp/ (the root but its database, and outside) changed."""
    before = tree(place)
    with pytest.raises(grpc.RpcError) as info:
        call(*stubs)
    assert tree(place) == before
    assert (place / "outside" / "secret.txt").read_bytes() == SECRET
    return info.value


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_bad_name_is_invalid_argument_everywhere(stubs, place, name):
    for method, field, call in calls_naming(name):
        err = refused(stubs, place, call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field, err.details())
        assert err.details().startswith(field), (method, err.details())


@pytest.mark.parametrize("name", ["link.txt", "dangling.txt"])
def test_a_file_link_that_leads_out_is_permission_denied(stubs, place, name):
    for method, field, call in calls_naming(name):
        if "Dataset" in method and field == "name":
            continue  # a dataset's name is looked up in datasets/, where these names are not
        err = refused(stubs, place, call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, field, err.details())
        assert err.details().startswith(field), (method, err.details())
    assert name not in {f.name for f in stubs[0].ListFiles(fpb.ListFilesRequest()).files}


def test_a_dataset_link_that_leads_out_is_permission_denied(stubs, place):
    for method, field, call in calls_naming("linkds"):
        if "Dataset" in method and field == "name":
            err = refused(stubs, place, call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err.details())
            assert err.details().startswith("name")
    assert "linkds" not in {d.name for d in stubs[1].ListDatasets(dpb.ListDatasetsRequest()).datasets}


def test_a_duplicate_upload_is_already_exists(stubs, place):
    err = refused(stubs, place, lambda f, d: f.UploadFile(upload_requests("dup.txt", b"another"), timeout=10))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and err.details().startswith("header.name")
    assert stubs[0].GetFile(fpb.GetFileRequest(name="dup.txt")).size_bytes == len(b"the first upload")


def test_a_corpus_name_is_no_path(stubs, place):
    for corpus in ["../x", "/etc/passwd", "tinyshakespeare/../x"]:
        request = dpb.CreateDatasetRequest(name="fresh", sources=[dpb.DatasetSource(corpus=corpus)])
        err = refused(stubs, place, lambda f, d, r=request: d.CreateDataset(r, timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("sources[0].corpus")


def test_a_good_name_that_is_not_there_is_not_found(stubs):
    files, datasets = stubs
    for call, request in [(files.GetFile, fpb.GetFileRequest(name="no-such")),
                          (files.DeleteFile, fpb.DeleteFileRequest(name="no-such")),
                          (datasets.GetDataset, dpb.GetDatasetRequest(name="no-such")),
                          (datasets.DeleteDataset, dpb.DeleteDatasetRequest(name="no-such"))]:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("name"), err.details()
