"""What models/<name> in the data root holds, read from disk: a training run or an ONNX export, and its lineage.

  a training run (`ulm train --out`)   best/ (the checkpoint served, torch backend), summary.json, last/, ...
  an export (`python -m export --out`) manifest.json, model.onnx(.data), config.json (onnx backend)

Lineage comes from what those files record: the checkpoint's config.json names the dataset folder it was trained
on (its name when it lies in <root>/datasets, and the dataset id: the SHA-256 of its manifest), the run's
summary.json or the checkpoint the best validation loss, an export's manifest the checkpoint it was made from and
its verification report. Nothing here loads weights; listing reads small JSON files only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from server.data_root import DataRoot
from server.errors import FailedPrecondition, PermissionDenied
from ulm.checkpoint import WEIGHTS_FILE, read_config
from ulm.config import GPTConfig
from ulm.data.dataset import dataset_id
from ulm.model import GPT
from ulm.util import read_json_object

CHECKPOINT, ONNX = "checkpoint", "onnx"
BACKEND_OF = {CHECKPOINT: "torch", ONNX: "onnx"}
BEST, SUMMARY = "best", "summary.json"
EXPORT_MANIFEST, EXPORT_CONFIG = "manifest.json", "config.json"
EXPORT_WEIGHTS = ("model.onnx", "model.onnx.data")
KV_BYTES = 4  # float32 keys and values
# --max-batch 0: as many slots as fit in this much KV cache, at most AUTO_SLOTS (a toy model gets 64 slots,
# GPT-2-small's 1024-token context 35, a 1 GB model's few)
KV_BUDGET, AUTO_SLOTS = 2560 << 20, 64


class NotAModel(ValueError):
    """models/<name> holds neither a usable checkpoint nor an export (a run before its first evaluation, a damaged
    or foreign folder)."""


class LeadsOut(NotAModel):
    """A file of the model is a symlink to somewhere outside the data root."""


@dataclass
class StoredModel:
    name: str
    folder: Path  # <root>/models/<name>
    format: str  # CHECKPOINT | ONNX
    path: Path  # what a backend loads: the run's best/ checkpoint, or the export folder
    config: dict  # the config.json beside the weights
    manifest: dict  # an export's manifest.json ({} for checkpoints)

    @property
    def backend(self) -> str:
        return BACKEND_OF[self.format]

    @property
    def model_config(self) -> dict:
        return self.config.get("model", {})

    @property
    def extras(self) -> dict:
        """What training recorded in the checkpoint (an export keeps its checkpoint's under "checkpoint")."""
        extras = self.config.get("checkpoint", {}) if self.format == ONNX else self.config
        return extras if isinstance(extras, dict) else {}

    def weights_bytes(self) -> int:
        files = [self.path / WEIGHTS_FILE] if self.format == CHECKPOINT else [self.path / f for f in EXPORT_WEIGHTS]
        return sum(f.stat().st_size for f in files if f.is_file())

    def kv_cache_bytes(self, max_batch: int) -> int:
        return kv_cache_bytes(self.model_config, max_batch)

    def parameter_count(self) -> int:
        if self.format == ONNX:
            return int(self.manifest.get("num_params", 0))
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights read
                return GPT(GPTConfig.from_dict(self.model_config)).num_params()
        except (KeyError, TypeError, ValueError):
            return 0  # a config the loader refuses too (LoadModel says why)

    def created_at(self) -> float:
        return (self.path / (EXPORT_MANIFEST if self.format == ONNX else "config.json")).stat().st_mtime


def kv_cache_bytes(model_config: dict, max_batch: int) -> int:
    """Keys and values of every layer for max_batch rows of a full context (the backends reserve that much)."""
    dims = [model_config.get(k) if isinstance(model_config, dict) else None for k in ("n_layer", "block_size",
                                                                                      "n_embd")]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return 0  # a damaged config: loading it reports what is wrong
    n_layer, block_size, n_embd = dims
    return 2 * n_layer * max_batch * block_size * n_embd * KV_BYTES


def auto_max_batch(model_config: dict) -> int:
    """The slots of a model served with --max-batch 0: the most, up to AUTO_SLOTS, whose KV cache fits in KV_BUDGET."""
    per_slot = kv_cache_bytes(model_config, 1)
    return max(1, min(AUTO_SLOTS, KV_BUDGET // per_slot)) if per_slot else AUTO_SLOTS


def config_of(directory: str | Path) -> dict:
    """The model config ("model" of config.json) of a checkpoint or export folder; {} when unreadable (loading
    it then reports what is wrong)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("model", {}) if isinstance(config, dict) else {}


def identify(name: str, folder: Path) -> StoredModel:
    """The model in `folder`; NotAModel with a one-line reason when there is none."""
    if (folder / EXPORT_MANIFEST).is_file():
        check_confined(name, folder, folder)
        manifest = read_json_object(folder / EXPORT_MANIFEST, NotAModel)
        config = read_json_object(folder / EXPORT_CONFIG, NotAModel)
        if not isinstance(manifest.get("files"), dict) or not isinstance(config.get("model"), dict):
            raise NotAModel(f"models/{name}: {EXPORT_MANIFEST} or {EXPORT_CONFIG} is not a µLM export's")
        return StoredModel(name, folder, ONNX, folder, config, manifest)
    best = folder / BEST
    if not best.is_dir():
        raise NotAModel(f"models/{name} holds neither a checkpoint ({BEST}/: a run writes it at its first "
                        f"evaluation) nor an export ({EXPORT_MANIFEST})")
    check_confined(name, folder, best)
    config = read_config(best)  # CheckpointError (a NotAModel's kind: ValueError) when damaged
    if not (best / WEIGHTS_FILE).is_file():
        raise NotAModel(f"models/{name}/{BEST} is not a complete checkpoint (no {WEIGHTS_FILE})")
    return StoredModel(name, folder, CHECKPOINT, best, config, {})


def check_confined(name: str, folder: Path, path: Path) -> None:
    """LeadsOut when `path` or a file in it is a symlink that resolves outside the model's folder."""
    top = folder.resolve()
    for p in [path, *path.iterdir()]:
        if not p.resolve().is_relative_to(top):
            raise LeadsOut(f"models/{name}: {p.relative_to(folder)} leads outside the data root")


def find(root: DataRoot, name: str, field: str = "name") -> StoredModel:
    """models/<name>: NotFound or InvalidArgument/PermissionDenied naming `field`, FailedPrecondition when the
    folder holds no usable model."""
    folder = root.existing("models", name, field, "model")
    try:
        return identify(name, folder)
    except LeadsOut as e:
        raise PermissionDenied(f"{field}: {e}") from e
    except ValueError as e:
        raise FailedPrecondition(f"{field}: {relative(str(e), root)}") from e


def list_models(root: DataRoot) -> list[StoredModel]:
    """Every usable model in the data root, by name; folders that hold none are left out."""
    models = []
    for folder in sorted(root.folder("models").iterdir()):
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            models.append(identify(folder.name, folder))
        except (ValueError, OSError):
            continue
    return models


def relative(message: str, root: DataRoot) -> str:
    """A message about files in the data root, with paths relative to it (clients see names, not the server's
    disk layout), on one line."""
    return " ".join(message.replace(f"{root.path}{os.sep}", "").split())


# -- lineage ------------------------------------------------------------------------------------------------

def inside(root: DataRoot, kind: str, path: str) -> str:
    """The name of the `kind` resource that `path` (absolute, or relative to the root) lies in, or ""."""
    if not path:
        return ""
    p = Path(path) if os.path.isabs(path) else root.path / path
    try:
        parts = p.resolve().relative_to(root.folder(kind)).parts
    except (ValueError, OSError):
        return ""
    return parts[0] if parts else ""


def dataset_of(stored: StoredModel, root: DataRoot) -> str:
    extras = stored.extras
    train_config = extras.get("train_config") if isinstance(extras.get("train_config"), dict) else {}
    path = extras.get("dataset") or train_config.get("dataset") or ""
    return inside(root, "datasets", path) if isinstance(path, str) else ""


def best_val_loss(stored: StoredModel) -> float:
    """The run's summary.json, else what the best checkpoint recorded; 0 when unknown."""
    best = {}
    if stored.format == CHECKPOINT and (stored.folder / SUMMARY).is_file():
        try:
            best = read_json_object(stored.folder / SUMMARY).get("best") or {}
        except ValueError:
            best = {}
    loss = best.get("val_loss", stored.extras.get("val_loss", 0.0)) if isinstance(best, dict) else 0.0
    return float(loss) if isinstance(loss, (int, float)) else 0.0


def lineage(stored: StoredModel, root: DataRoot) -> dict:
    """dataset, dataset_id, source_model, best_val_loss, quantization, export_report_json."""
    dataset = dataset_of(stored, root)
    manifest_path = root.folder("datasets") / dataset / "manifest.json" if dataset else None
    source = stored.manifest.get("source", {})
    return {
        "dataset": dataset,
        "dataset_id": dataset_id(manifest_path.parent) if manifest_path and manifest_path.is_file() else "",
        "source_model": inside(root, "models", source.get("checkpoint", "")) if isinstance(source, dict) else "",
        "best_val_loss": best_val_loss(stored),
        "quantization": "int8" if stored.manifest.get("dtype") == "int8" else "",
        "export_report_json": json.dumps(stored.manifest["verification"], sort_keys=True)
        if stored.format == ONNX and "verification" in stored.manifest else "",
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
