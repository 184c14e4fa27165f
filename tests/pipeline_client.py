"""Client-side helpers for the pipeline services' tests: uploads as chunked streams, a call's error, and a data
root's listing (to check that a refused call changed nothing)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.ulm.v1 import files_pb2 as fpb

# the whole loop's tests (gRPC and HTTP): a tiny grammar and a tiny model trained on it for a few seconds
LOOP_ITERS = 300
LOOP_TEXT = "".join(f"{w} sat on the {m} mat; " for w in ("the cat", "a dog", "my hen", "one fox") for m in
                    ("red", "big", "old", "wet", "new")) * 40
LOOP_TRAINING = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", f"max_iters={LOOP_ITERS}",
                 "eval_interval=100", "eval_iters=2", "log_interval=10", "warmup_iters=10", "lr_decay_iters=300",
                 "dtype=float32", "device=cpu"]


def upload_requests(name: str, data: bytes, chunk: int = 4096, overwrite: bool = False
                    ) -> Iterator[fpb.UploadFileRequest]:
    yield fpb.UploadFileRequest(header=fpb.UploadFileHeader(name=name, overwrite=overwrite, size_bytes=len(data)))
    for i in range(0, len(data), chunk):
        yield fpb.UploadFileRequest(chunk=data[i:i + chunk])


def upload(stub, name: str, data: bytes, chunk: int = 4096, overwrite: bool = False) -> fpb.FileInfo:
    return stub.UploadFile(upload_requests(name, data, chunk, overwrite), timeout=30)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError the call ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30, **kwargs)
    return info.value


def tree(root: Path, skip_prefix: str = "state.db") -> dict[str, tuple]:
    """Every path under `root` (links not followed) with what it is: a link's target, a file's size and mtime."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if name.startswith(skip_prefix):
                continue
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                st = path.stat()
                out[rel] = ("file", st.st_size, st.st_mtime_ns)
    return out
