"""StartTraining and StartExport requests, checked against the data root and turned into JobSpecs whose commands
are the CLIs' (`python -m ulm train`, under torchrun for nproc > 1; `python -m export`). Errors name the field."""
from __future__ import annotations

from pathlib import Path

from google.protobuf.json_format import MessageToDict

from protos.ulm.v1 import jobs_pb2 as jpb
from server.data_root import DataRoot, check_name
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from server.jobs.manager import JobManager
from server.jobs.spec import JobSpec
from ulm.train_config import read_recipe, recipe_names
from ulm.training.metrics import METRICS
from ulm.training.state import BEST, find_last, saved_config

MAX_NPROC = 64
QUANTIZE = {"": "onnx", "int8": "int8"}  # --quantize value: the default export name's suffix


def training_spec(r: jpb.StartTrainingRequest, root: DataRoot, jobs: JobManager, threads: int) -> JobSpec:
    """`ulm train --out models/<model> ...`; with resume_from, `--resume` of that model's run."""
    model = model_name(r)
    out = root.existing("models", model, "resume_from") if r.resume_from else root.path_for("models", model, "model")
    check_target(r, out, jobs)
    dataset_args, uses = dataset_arg(r, root, out)
    nproc = r.nproc or 1
    if nproc > MAX_NPROC:
        raise InvalidArgument(f"nproc is {nproc}, over {MAX_NPROC}")
    for i, item in enumerate(r.overrides):
        if "\0" in item:
            raise InvalidArgument(f"overrides[{i}] contains a NUL character")
    train = ["-m", "ulm", "train", "--out", str(out), *(["--preset", r.recipe] if r.recipe else []), *dataset_args,
             *(["--seed", str(r.seed)] if r.HasField("seed") else [])]
    settings = ["--set", f"threads={max(1, threads // nproc)}", *r.overrides]  # the request's own threads= wins
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    resume = ["--resume"] if r.resume_from else []
    return JobSpec(kind="training", request=as_dict(r), argv=[*launcher, *train, *resume, *settings], uses=uses,
                   result=f"models/{model}", metrics_file=str(out / METRICS),
                   resume_argv=[*launcher, *train, "--resume", *settings], nproc=nproc)


def model_name(r: jpb.StartTrainingRequest) -> str:
    if r.resume_from:
        check_name(r.resume_from, "resume_from")
        if r.model and r.model != r.resume_from:
            raise InvalidArgument(f"model must be empty or {r.resume_from!r} (resume_from continues that run in "
                                  "place)")
        return r.resume_from
    if r.recipe not in recipe_names():
        raise InvalidArgument(f"recipe {r.recipe!r} is not one of {', '.join(recipe_names())}"
                              if r.recipe else f"recipe is empty; choose one of {', '.join(recipe_names())}")
    return check_name(r.model, "model")


def check_target(r: jpb.StartTrainingRequest, out: Path, jobs: JobManager) -> None:
    model = out.name
    if job := jobs.writer(f"models/{model}"):
        raise AlreadyExists(f"{'resume_from' if r.resume_from else 'model'}: job {job} is writing model {model!r}")
    if r.resume_from:
        if find_last(out) is None:
            raise FailedPrecondition(f"resume_from: model {model!r} has no last checkpoint to continue from (it is "
                                     "not a training run)")
    elif out.exists() or out.is_symlink():
        raise AlreadyExists(f"model: a model named {model!r} exists already (continue its run with resume_from, or "
                            "choose another name)")


def dataset_arg(r: jpb.StartTrainingRequest, root: DataRoot, out: Path) -> tuple[list[str], list[str]]:
    """`--dataset DIR` and the resources the run reads: the named dataset, else the run's own (resume_from)."""
    if r.dataset:
        path = root.existing("datasets", r.dataset, "dataset")
        return ["--dataset", str(path)], [f"datasets/{r.dataset}"]
    if r.resume_from:
        saved = Path((saved_config(out) or {}).get("dataset") or "/")
        inside = saved.parent == root.folder("datasets")
        return [], [f"datasets/{saved.name}"] if inside else []
    if read_recipe(r.recipe).get("task", "lm") == "lm":
        raise InvalidArgument(f"dataset is empty; recipe {r.recipe!r} trains on a dataset")
    return [], []


def export_spec(r: jpb.StartExportRequest, root: DataRoot, jobs: JobManager, threads: int) -> JobSpec:
    """`python -m export --checkpoint models/<model>/best --out models/<name> [--quantize int8]`."""
    source = root.existing("models", r.model, "model")
    if not (source / BEST / "config.json").is_file():
        raise FailedPrecondition(f"model: {r.model!r} is not a training run with a best checkpoint")
    if job := jobs.writer(f"models/{r.model}"):
        raise FailedPrecondition(f"model: job {job} is still writing model {r.model!r}")
    if r.quantize not in QUANTIZE:
        raise InvalidArgument(f"quantize must be '' (fp32) or 'int8'; got {r.quantize!r}")
    name = r.name or f"{r.model}-{QUANTIZE[r.quantize]}"
    out = root.path_for("models", name, "name")
    if out.exists() or out.is_symlink():
        raise AlreadyExists(f"name: a model named {name!r} exists already")
    if job := jobs.writer(f"models/{name}"):
        raise AlreadyExists(f"name: job {job} is writing model {name!r}")
    argv = ["-m", "export", "--checkpoint", str(source / BEST), "--out", str(out), "--threads", str(threads),
            *(["--quantize", r.quantize] if r.quantize else [])]
    return JobSpec(kind="export", request=as_dict(r), argv=argv, uses=[f"models/{r.model}"], result=f"models/{name}")


def as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)
