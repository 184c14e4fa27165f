"""Small helpers every layer shares: atomic writes, hashing, JSON manifests, the cache root, folder swaps, threads."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj, indent: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=indent))
    return path


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in `path`; `error` naming the file when it is unreadable, not JSON or not an object."""
    try:
        obj = json.loads(path.read_bytes())
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object, not {type(obj).__name__}")
    return obj


JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number", type(None): "null"}


def check_json_types(obj: dict, types: dict[str, type | tuple[type, ...]], path: Path,
                     error: type[ValueError] = ValueError) -> None:
    """`error` naming the file and the field when a field of `types` that is present has another JSON type."""
    for key, want in types.items():
        if key in obj and not is_json_type(obj[key], want):
            names = " or ".join(JSON_NAMES[t] for t in (want if isinstance(want, tuple) else (want,)))
            raise error(f"{path}: field {key!r} must be {names}, got {JSON_NAMES.get(type(obj[key]), 'other')}")


def is_json_type(value, want: type | tuple[type, ...]) -> bool:
    wants = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool):  # a bool is an int to isinstance, not to JSON
        return bool in wants
    return isinstance(value, wants) or (float in wants and isinstance(value, int))


def file_in(directory: str | os.PathLike, name: str, what: str, error: type[ValueError] = ValueError,
            missing: str | None = None) -> Path:
    """directory/name once both exist; `error` saying which is missing (`missing`: the message for the file)."""
    d = Path(directory)
    if not d.is_dir():
        raise error(f"{what} {d}: " + ("not a directory" if d.exists() else "no such directory (it does not exist)"))
    path = d / name
    if not path.is_file():
        raise error(missing or f"{d} is not a {what}: no {name}")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Downloads and the default model: $ULM_CACHE_DIR, or ~/.cache/ulm."""
    return Path(os.environ.get("ULM_CACHE_DIR") or Path.home() / ".cache" / "ulm")


def replace_dir(src: Path, dst: Path, set_aside: Path) -> None:
    """Swap the finished folder `src` in at `dst`. An older `dst` waits at `set_aside` until `src` is in place, so
    a complete copy exists at every moment (after a crash between the two renames, the caller restores it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(set_aside, ignore_errors=True)
        os.replace(dst, set_aside)
    os.replace(src, dst)
    shutil.rmtree(set_aside, ignore_errors=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int | None = None, processes: int = 1) -> int:
    """torch's intra-op threads: `threads`, or the usable cores shared among `processes` on this machine."""
    import torch  # here: the rest of this module serves processes without torch (the tokenizer worker)

    n = threads or max(1, usable_cores() // processes)
    torch.set_num_threads(n)
    return n
