"""ulm.v1.Datasets: datasets built by dataset jobs from uploads or named corpora, read from datasets/<name>/.

CreateDataset checks the whole request up front (names, sources, tokenizer, fractions, cleaning options) and
submits a job whose child runs `python -m ulm data build` (the CLI's own code path) on the uploads' paths in the
data root. The build writes a hidden folder beside datasets/<name> and renames it in when done, so a dataset is
listed once its manifest exists. Named corpora without a local copy download into the data root's downloads/.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from protos.ulm.v1 import datasets_pb2 as pb
from protos.ulm.v1 import datasets_pb2_grpc as pb_grpc
from protos.ulm.v1 import jobs_pb2
from server.data_root import DataRoot
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable
from server.jobs.spec import JobSpec
from server.services import ServiceSpec, register
from server.shared import Shared
from ulm.data.build import TOKENIZER_KINDS
from ulm.data.clean import NORMALIZATIONS
from ulm.data.dataset import MANIFEST, SPLITS, load_manifest
from ulm.data.sources import ALIASES, NAMED_CORPORA, TEXT_UNITS

TOKENIZER_ALIASES = {"": "char", "bytes": "byte"}  # the proto's names for the build's kinds
DEFAULT_VAL_FRACTION = 0.1
MIN_BPE_VOCAB, MAX_VOCAB = 259, 2**20  # 256 bytes + BOS/EOS/PAD; past 2**20 the BPE trainer would run for hours
UNREADABLE = (ValueError, OSError, KeyError, TypeError)  # a manifest that is missing, broken or not µLM's
DELETING = ".deleting-"  # a dataset being deleted is first renamed to the hidden .<name>.deleting-<pid>-<random>


class DatasetsService(pb_grpc.DatasetsServicer):
    name = pb.DESCRIPTOR.services_by_name["Datasets"].full_name

    def __init__(self, args: argparse.Namespace, shared: Shared):
        self.shared = shared
        self.root = shared.data_root
        self.folder = self.root.folder("datasets")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DatasetsServicer_to_server(self, server)

    async def start(self) -> None:
        await asyncio.to_thread(self._remove_half_deleted)

    async def drain(self, timeout: float) -> None:
        pass  # the builds run in the job manager's processes

    async def close(self) -> None:
        pass

    # -- RPCs -------------------------------------------------------------------------------------------

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context) -> jobs_pb2.Job:
        out = self.root.path_for("datasets", request.name, "name")
        sources, uses = source_args(request, self.root)
        options = option_args(request)
        self._check_target(request, out)
        if self.shared.jobs is None:
            raise Unavailable("CreateDataset: this server runs no job manager")
        argv = ["-m", "ulm", "data", "build", *sources, *options, f"--out={out}", "--no-progress",
                f"--cache-dir={self.root.folder('downloads')}"]  # nothing is written outside the data root
        if request.overwrite:
            argv.append("--overwrite")
        spec = JobSpec(kind="dataset", request=MessageToDict(request, preserving_proto_field_name=True),
                       argv=argv, uses=uses, result=f"datasets/{request.name}")
        return self.shared.jobs.submit(spec)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context) -> pb.ListDatasetsResponse:
        datasets = await asyncio.to_thread(self._read_all)
        for d in datasets:
            d.job = self._producer(d.name)
        return pb.ListDatasetsResponse(datasets=datasets)

    async def GetDataset(self, request: pb.GetDatasetRequest, context) -> pb.Dataset:
        path = self._existing(request.name)
        try:
            dataset = await asyncio.to_thread(read_dataset, path)
        except FileNotFoundError as e:
            raise NotFound(f"name: dataset {request.name!r} is not built yet (no {MANIFEST})") from e
        except UNREADABLE as e:
            raise FailedPrecondition(f"name: dataset {request.name!r} cannot be read: {e}") from e
        dataset.job = self._producer(request.name)
        return dataset

    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context) -> pb.DeleteDatasetResponse:
        path = self._existing(request.name)
        if job := self._job_using(request.name):
            raise FailedPrecondition(f"name: dataset {request.name!r} is in use by job {job}, which has not ended")
        models = self.shared.models.using_dataset(request.name) if self.shared.models is not None else []
        if models:
            raise FailedPrecondition(f"name: dataset {request.name!r} is the training data of model(s) "
                                     f"{', '.join(models)}; delete those first")
        await asyncio.to_thread(remove_folder, path)
        return pb.DeleteDatasetResponse()

    # -- helpers ----------------------------------------------------------------------------------------

    def _existing(self, name: str) -> Path:
        path = self.root.existing("datasets", name, "name", "dataset")
        self.root.check_inside(path / MANIFEST, "name")  # a manifest that is a link out is not read
        return path

    def _check_target(self, request: pb.CreateDatasetRequest, out: Path) -> None:
        exists = out.exists()
        if exists and not request.overwrite:
            raise AlreadyExists(f"name: a dataset named {request.name!r} exists (set overwrite to replace it)")
        if job := self._job_using(request.name):
            raise FailedPrecondition(f"name: dataset {request.name!r} is being built or read by job {job}")
        if exists and not (out / MANIFEST).is_file():
            raise FailedPrecondition(f"name: datasets/{request.name} holds no finished dataset; refusing to "
                                     "replace it")

    def _job_using(self, name: str) -> str | None:
        return self.shared.jobs.in_use(f"datasets/{name}") if self.shared.jobs is not None else None

    def _producer(self, name: str) -> str:
        return self.shared.jobs.producer(f"datasets/{name}") if self.shared.jobs is not None else ""

    def _read_all(self) -> list[pb.Dataset]:
        """Every finished dataset in the folder; hidden staging folders, links and unfinished builds are skipped."""
        datasets = []
        for path in sorted(self.folder.iterdir()):
            try:
                self._existing(path.name)
                datasets.append(read_dataset(path))
            except (ServiceError, *UNREADABLE):  # a staging folder, an unfinished build, a link out: not listed
                continue
        return datasets

    def _remove_half_deleted(self) -> None:
        for path in self.folder.glob(".*" + DELETING + "*"):
            shutil.rmtree(path, ignore_errors=True)


def source_args(request: pb.CreateDatasetRequest, root: DataRoot) -> tuple[list[str], list[str]]:
    """The build's --source arguments and the uploads they read ("files/<name>"); errors name sources[i]."""
    if not request.sources:
        raise InvalidArgument("sources is empty: give at least one uploaded file or named corpus")
    specs, uses = [], []
    for i, source in enumerate(request.sources):
        field = f"sources[{i}]"
        kind = source.WhichOneof("source")
        if kind == "file":
            if source.local_copy:
                raise InvalidArgument(f"{field}.local_copy applies to a corpus source only")
            specs.append(f"--source={uploaded(root, source.file, f'{field}.file')}")
            uses.append(f"files/{source.file}")
        elif kind == "corpus":
            corpus = ALIASES.get(source.corpus.lower(), source.corpus.lower())
            if corpus not in NAMED_CORPORA:
                raise InvalidArgument(f"{field}.corpus: {source.corpus!r} is not a named corpus (known: "
                                      f"{', '.join(NAMED_CORPORA)})")
            if source.local_copy:
                specs.append(f"--source={corpus}={uploaded(root, source.local_copy, f'{field}.local_copy')}")
                uses.append(f"files/{source.local_copy}")
            else:
                specs.append(f"--source={corpus}")
        else:
            raise InvalidArgument(f"{field}: set file (an uploaded file) or corpus (a named corpus)")
    return specs, uses


def uploaded(root: DataRoot, name: str, field: str) -> Path:
    path = root.existing("files", name, field, "uploaded file")
    if not path.is_file():
        raise NotFound(f"{field}: {name!r} is not an uploaded file")
    return path


def option_args(r: pb.CreateDatasetRequest) -> list[str]:
    """The build's other flags (as --flag=value, so a value that starts with '-' stays a value)."""
    tokenizer = TOKENIZER_ALIASES.get(r.tokenizer, r.tokenizer)
    if tokenizer not in TOKENIZER_KINDS:
        raise InvalidArgument(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)} (or bytes), got "
                              f"{r.tokenizer!r}")
    args = [f"--tokenizer={tokenizer}"]
    if r.vocab_size:
        if tokenizer != "bpe":
            raise InvalidArgument(f"vocab_size applies to the bpe tokenizer only ({tokenizer} sets its own)")
        if not MIN_BPE_VOCAB <= r.vocab_size <= MAX_VOCAB:
            raise InvalidArgument(f"vocab_size must be in [{MIN_BPE_VOCAB}, {MAX_VOCAB}], got {r.vocab_size}")
        args.append(f"--vocab-size={r.vocab_size}")
    val, test = r.val_fraction or DEFAULT_VAL_FRACTION, r.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):  # NaN fails too
        raise InvalidArgument(f"val_fraction ({r.val_fraction}) and test_fraction ({test}) must be in [0, 1) and "
                              "sum to less than 1")
    text_unit, normalization = r.text_unit or "file", r.normalization or "NFC"
    if text_unit not in TEXT_UNITS:
        raise InvalidArgument(f"text_unit must be one of {', '.join(TEXT_UNITS)}, got {r.text_unit!r}")
    if normalization not in NORMALIZATIONS:
        raise InvalidArgument(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {r.normalization!r}")
    if "\0" in r.jsonl_field:
        raise InvalidArgument("jsonl_field contains a NUL character")
    args += [f"--val-fraction={val!r}", f"--test-fraction={test!r}", f"--jsonl-field={r.jsonl_field or 'text'}",
             f"--text-unit={text_unit}", f"--normalization={normalization}", f"--min-chars={r.min_chars or 1}"]
    if r.no_whitespace_cleanup:
        args.append("--no-whitespace-cleanup")
    if r.no_dedup:
        args.append("--no-dedup")
    if r.HasField("shuffle_seed"):
        args.append(f"--shuffle-seed={r.shuffle_seed}")
    return args


def read_dataset(path: Path) -> pb.Dataset:
    """The Dataset message of a built dataset folder (without its job); ValueError or OSError if it is not one."""
    text = (path / MANIFEST).read_bytes()
    manifest = load_manifest(path)
    splits = [pb.SplitInfo(name=name, num_tokens=int(info["num_tokens"]), num_documents=int(info["num_documents"]),
                           dtype=str(info["dtype"]), sha256=str(info["sha256"]))
              for name in SPLITS if isinstance(info := manifest["splits"].get(name), dict)]
    tokenizer = manifest["tokenizer"]
    return pb.Dataset(name=path.name, id=hashlib.sha256(text).hexdigest(), tokenizer=str(tokenizer.get("kind", "")),
                      vocab_size=int(tokenizer.get("vocab_size", 0)), splits=splits,
                      manifest_json=text.decode("utf-8"), created_at=(path / MANIFEST).stat().st_mtime)


def remove_folder(path: Path) -> None:
    """Rename out of sight first (one step: the dataset is gone at once), then delete; start() ends a crashed one."""
    hidden = path.parent / f".{path.name}{DELETING}{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(path, hidden)
    shutil.rmtree(hidden)


register(ServiceSpec(DatasetsService.name, DatasetsService))
