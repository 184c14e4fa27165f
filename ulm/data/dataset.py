"""Reading a built dataset: manifest.json, the tokenizer, and one flat token file per split.

Layout of a dataset directory (format "ulm-dataset/1"):
  manifest.json                     written last; its SHA-256 is the dataset id
  tokenizer.json, tokenizer_meta.json   (Tokenizer.save)
  train.bin, val.bin[, test.bin]    1-D token ids, raw little-endian uint16 (vocab < 65536) or uint32;
                                    documents encoded without BOS, joined with EOS between documents
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ulm.tokenizer import Tokenizer
from ulm.util import file_in, file_sha256

FORMAT = "ulm-dataset/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def load_manifest(directory: str | os.PathLike) -> dict:
    """The parsed manifest.json of a dataset directory; ValueError if it is missing or not a µLM dataset."""
    d = Path(directory)
    path = file_in(d, MANIFEST, "dataset", missing=f"dataset {d}: no {MANIFEST} (not a dataset, or a build that "
                                                    "did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset {d}: {MANIFEST} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"dataset {d}: {MANIFEST} field 'format' is {got!r}, expected {FORMAT!r}")
    for key in ("splits", "tokenizer"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"dataset {d}: {MANIFEST} has no {key!r} object")
    return manifest


def dataset_id(directory: str | os.PathLike) -> str:
    """SHA-256 of manifest.json: the same inputs and options build the same id."""
    load_manifest(directory)
    return file_sha256(Path(directory) / MANIFEST)


def load_split(directory: str | os.PathLike, split: str) -> np.memmap:
    """The token ids of one split as a read-only 1-D memmap (uint16 or uint32)."""
    d = Path(directory)
    manifest = load_manifest(d)
    info = manifest["splits"].get(split)
    if info is None:
        raise ValueError(f"dataset {d}: no split {split!r} (has: {', '.join(manifest['splits'])})")
    try:
        dtype = np.dtype(info["dtype"]).newbyteorder("<")
        path, n = d / info["file"], int(info["num_tokens"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"dataset {d}: split {split!r} in {MANIFEST} lacks field {e}") from e
    if not path.is_file():
        raise ValueError(f"dataset {d}: split {split!r} file {info['file']} is missing")
    size = path.stat().st_size
    if size != n * dtype.itemsize:
        raise ValueError(f"dataset {d}: {info['file']} has {size} bytes, manifest says {n} {dtype.name} tokens")
    if n == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer the dataset was encoded with (add_bos is False: the token files have no BOS)."""
    load_manifest(directory)
    return Tokenizer.load(directory)


def verify_dataset(directory: str | os.PathLike) -> None:
    """Re-hash the tokenizer and every split file against the manifest; ValueError on any mismatch."""
    d = Path(directory)
    manifest = load_manifest(d)
    want = manifest["tokenizer"].get("sha256")
    if want and file_sha256(d / "tokenizer.json") != want:
        raise ValueError(f"dataset {d}: tokenizer.json does not match the manifest's sha256")
    for split, info in manifest["splits"].items():
        load_split(d, split)
        if file_sha256(d / info["file"]) != info["sha256"]:
            raise ValueError(f"dataset {d}: {info['file']} does not match the manifest's sha256")
