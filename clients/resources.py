"""`python -m clients files|datasets|models ...`: the data root's resources and the models a server serves.

  files upload PATH [--name N] [--overwrite] | list | delete NAME
  datasets create NAME --file F [--file F2] [--corpus C [--local-copy F]] [--tokenizer char|bpe|bytes]
           [--vocab-size N] [--val-fraction X] [--jsonl-field F] [--watch] | list | get NAME | delete NAME
  models list | get NAME | load NAME [--backend B] [--device D] | unload NAME | delete NAME | loaded
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import BinaryIO

from clients.channel import open_channel
from clients.jobs import started
from clients.output import compact_json, print_fields, print_json, size, when
from protos.ulm.v1 import datasets_pb2 as dpb
from protos.ulm.v1 import datasets_pb2_grpc, files_pb2_grpc, models_pb2_grpc
from protos.ulm.v1 import files_pb2 as fpb
from protos.ulm.v1 import models_pb2 as mpb

CHUNK_BYTES = 2**20  # an upload's message size: well under the server's --max-request-bytes (4 MiB)


def upload_requests(f: BinaryIO, name: str, overwrite: bool) -> Iterator[fpb.UploadFileRequest]:
    """The header, then the file in 1 MiB chunks, read as gRPC sends them (never the whole file in memory)."""
    size = f.seek(0, os.SEEK_END) - f.seek(0)  # the server keeps the file only if all of it arrived
    yield fpb.UploadFileRequest(header=fpb.UploadFileHeader(name=name, overwrite=overwrite, size_bytes=size))
    while chunk := f.read(CHUNK_BYTES):
        yield fpb.UploadFileRequest(chunk=chunk)


def file_line(f: fpb.FileInfo) -> str:
    return f"{f.name}  {size(f.size_bytes)}  sha256 {f.sha256[:16]}  {when(f.created_at)}"


def run_files(args: argparse.Namespace) -> None:
    with open_channel(args) as channel:
        stub = files_pb2_grpc.FilesStub(channel)
        if args.action == "upload":
            with open(args.path, "rb") as f:  # before the call: a missing file is the client's error
                info = stub.UploadFile(upload_requests(f, args.name or os.path.basename(args.path), args.overwrite),
                                       timeout=args.timeout)
            print(f"uploaded {file_line(info)}")
        elif args.action == "list":
            listed = stub.ListFiles(fpb.ListFilesRequest(), timeout=args.timeout)
            if args.json:
                print_json(listed)
            for f in [] if args.json else listed.files:
                print(file_line(f))
        else:
            stub.DeleteFile(fpb.DeleteFileRequest(name=args.name), timeout=args.timeout)
            print(f"deleted {args.name}")


def dataset_sources(args: argparse.Namespace) -> list[dpb.DatasetSource]:
    if len(args.local_copy) > len(args.corpus):
        raise ValueError("--local-copy goes with a --corpus (the n-th with the n-th)")
    copies = args.local_copy + [""] * (len(args.corpus) - len(args.local_copy))
    return [*(dpb.DatasetSource(file=f) for f in args.file),
            *(dpb.DatasetSource(corpus=c, local_copy=copy) for c, copy in zip(args.corpus, copies, strict=True))]


def create_dataset_request(args: argparse.Namespace) -> dpb.CreateDatasetRequest:
    request = dpb.CreateDatasetRequest(
        name=args.name, sources=dataset_sources(args), jsonl_field=args.jsonl_field, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        text_unit=args.text_unit or "", normalization=args.normalization or "", no_dedup=args.no_dedup,
        no_whitespace_cleanup=args.no_whitespace_cleanup, min_chars=args.min_chars, overwrite=args.overwrite)
    if args.shuffle_seed is not None:
        request.shuffle_seed = args.shuffle_seed
    return request


def dataset_line(d: dpb.Dataset) -> str:
    splits = ", ".join(f"{s.name} {s.num_tokens} tokens" for s in d.splits)
    return f"{d.name}  {d.id[:12]}  {d.tokenizer} vocab {d.vocab_size}  {splits}  {when(d.created_at)}"


def run_datasets(args: argparse.Namespace) -> int:
    with open_channel(args) as channel:
        stub = datasets_pb2_grpc.DatasetsStub(channel)
        if args.action == "create":
            return started(args, channel, stub.CreateDataset(create_dataset_request(args), timeout=args.timeout))
        if args.action == "list":
            listed = stub.ListDatasets(dpb.ListDatasetsRequest(), timeout=args.timeout)
            if args.json:
                print_json(listed)
            for d in [] if args.json else listed.datasets:
                print(dataset_line(d))
        elif args.action == "get":
            d = stub.GetDataset(dpb.GetDatasetRequest(name=args.name), timeout=args.timeout)
            if args.json:
                print_json(d)
            else:
                print_fields(d, skip=("manifest_json",))
                print(f"manifest_json: {compact_json(d.manifest_json)}")
        else:
            stub.DeleteDataset(dpb.DeleteDatasetRequest(name=args.name), timeout=args.timeout)
            print(f"deleted {args.name}")
    return 0


def model_line(m: mpb.Model) -> str:
    fmt = mpb.ModelFormat.Name(m.format).removeprefix("MODEL_FORMAT_").lower() + (
        f" {m.quantization}" if m.quantization else "")
    lineage = f"dataset {m.dataset}" if m.dataset else (f"from {m.source_model}" if m.source_model else "")
    best = f"best val loss {m.best_val_loss:.4f}" if m.best_val_loss else ""
    return "  ".join(x for x in (m.name, fmt, f"{m.parameter_count} params", size(m.size_bytes), lineage, best,
                                 "loaded" if m.loaded else "") if x)


def run_models(args: argparse.Namespace) -> None:
    with open_channel(args) as channel:
        stub = models_pb2_grpc.ModelsStub(channel)
        if args.action == "list":
            listed = stub.ListModels(mpb.ListModelsRequest(), timeout=args.timeout)
            if args.json:
                print_json(listed)
            for m in [] if args.json else listed.models:
                print(model_line(m))
        elif args.action == "get":
            m = stub.GetModel(mpb.GetModelRequest(name=args.name), timeout=args.timeout)
            if args.json:
                print_json(m)
            else:
                print_fields(m)
        elif args.action == "load":
            request = mpb.LoadModelRequest(name=args.name, backend=args.backend or "", device=args.device or "",
                                           max_batch=args.max_batch)
            print_fields(stub.LoadModel(request, timeout=args.timeout))
        elif args.action == "unload":
            stub.UnloadModel(mpb.UnloadModelRequest(name=args.name, timeout_s=args.drain_s), timeout=args.timeout)
            print(f"unloaded {args.name}")
        elif args.action == "delete":
            stub.DeleteModel(mpb.DeleteModelRequest(name=args.name), timeout=args.timeout)
            print(f"deleted {args.name}")
        else:
            loaded = stub.ListLoadedModels(mpb.ListLoadedModelsRequest(), timeout=args.timeout)
            if args.json:
                print_json(loaded)
            for info in [] if args.json else loaded.models:
                default = "  (default)" if info.name == loaded.default_model else ""
                print(f"{info.name}  {info.backend} {info.device}  {info.parameter_count} params  "
                      f"context {info.context_length}  max batch {info.max_batch}{default}")


def add_files_commands(sub, conn: argparse.ArgumentParser) -> None:
    files = sub.add_parser("files", help="text and JSONL uploads").add_subparsers(dest="action", required=True)
    up = files.add_parser("upload", parents=[conn], help="upload a file (streamed in 1 MiB chunks)")
    up.add_argument("path")
    up.add_argument("--name", default="", help="its name on the server (default: the file's own)")
    up.add_argument("--overwrite", action="store_true", help="replace a file of this name")
    files.add_parser("list", parents=[conn], help="a line per file").add_argument("--json", action="store_true")
    files.add_parser("delete", parents=[conn], help="delete an upload").add_argument("name")
    sub.choices["files"].set_defaults(func=run_files)


def add_datasets_commands(sub, conn: argparse.ArgumentParser) -> None:
    datasets = sub.add_parser("datasets", help="datasets built from uploads or corpora").add_subparsers(
        dest="action", required=True)
    c = datasets.add_parser("create", parents=[conn], help="start a dataset job")
    c.add_argument("name")
    c.add_argument("--file", action="append", default=[], help="an uploaded file (repeatable)")
    c.add_argument("--corpus", action="append", default=[], help="a named corpus, e.g. tinyshakespeare")
    c.add_argument("--local-copy", action="append", default=[], help="an upload to use for the --corpus")
    c.add_argument("--tokenizer", default="char", choices=["char", "bpe", "bytes"])
    c.add_argument("--vocab-size", type=int, default=0, help="bpe only; 0 = the default")
    c.add_argument("--val-fraction", type=float, default=0.0, help="0 = the default (0.1)")
    c.add_argument("--test-fraction", type=float, default=0.0)
    c.add_argument("--jsonl-field", default="", help="the JSONL records' text field (default text)")
    c.add_argument("--text-unit", choices=["file", "line", "paragraph"], help="a plain text's document (default file)")
    c.add_argument("--normalization", choices=["NFC", "NFKC", "none"], help="Unicode normalization (default NFC)")
    c.add_argument("--no-whitespace-cleanup", action="store_true")
    c.add_argument("--no-dedup", action="store_true")
    c.add_argument("--min-chars", type=int, default=0)
    c.add_argument("--shuffle-seed", type=int)
    c.add_argument("--overwrite", action="store_true", help="replace a dataset of this name")
    c.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    datasets.add_parser("list", parents=[conn], help="a line per dataset").add_argument("--json", action="store_true")
    g = datasets.add_parser("get", parents=[conn], help="a dataset and its manifest")
    g.add_argument("name")
    g.add_argument("--json", action="store_true")
    datasets.add_parser("delete", parents=[conn], help="delete a dataset no job or model uses").add_argument("name")
    sub.choices["datasets"].set_defaults(func=run_datasets)


def add_models_commands(sub, conn: argparse.ArgumentParser) -> None:
    models = sub.add_parser("models", help="checkpoints, exports and the loaded models").add_subparsers(
        dest="action", required=True)
    models.add_parser("list", parents=[conn], help="a line per model").add_argument("--json", action="store_true")
    g = models.add_parser("get", parents=[conn], help="a model and its lineage")
    g.add_argument("name")
    g.add_argument("--json", action="store_true")
    load = models.add_parser("load", parents=[conn], help="serve a model from the data root")
    load.add_argument("name")
    load.add_argument("--backend", choices=["torch", "onnx"], help="default: by its format")
    load.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu")
    load.add_argument("--max-batch", type=int, default=0, help="0 = the server's --max-batch")
    unload = models.add_parser("unload", parents=[conn], help="stop serving a model (its streams finish)")
    unload.add_argument("name")
    unload.add_argument("--drain-s", type=float, default=0.0, help="how long its streams may take; 0 = --grace")
    models.add_parser("delete", parents=[conn], help="delete a model that is not loaded").add_argument("name")
    models.add_parser("loaded", parents=[conn], help="the models this server serves").add_argument(
        "--json", action="store_true")
    sub.choices["models"].set_defaults(func=run_models)


def add_commands(sub, conn: argparse.ArgumentParser) -> None:
    add_files_commands(sub, conn)
    add_datasets_commands(sub, conn)
    add_models_commands(sub, conn)
