"""The data root (--data-root): every file a request names lives under it, in one folder per kind.

  files/<name>       uploads          datasets/<name>/  built datasets     models/<name>/  runs and exports
  jobs/<id>/         job logs         downloads/        named corpora      state.db        jobs, uploads (SQLite)

Names are checked before any path is made from them (one pattern: no separators, no `..`, no NUL), and a path
is refused when it resolves outside the root (a symlink that leads out), so nothing is read or written elsewhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from server.errors import InvalidArgument, NotFound, PermissionDenied
from ulm.util import cache_root

KINDS = ("files", "datasets", "models", "jobs", "downloads")
MAX_NAME = 128
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DB = "state.db"


def default_data_root() -> Path:
    return cache_root() / "data"


def check_name(name: str, field: str) -> str:
    """`name` if it is a valid resource name; InvalidArgument naming `field` otherwise."""
    if not name:
        raise InvalidArgument(f"{field} is empty")
    if "\0" in name:
        raise InvalidArgument(f"{field} contains a NUL character")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"{field} is {len(name)} characters, over {MAX_NAME}")
    if not NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"{field} {name!r} must be letters, digits, '.', '_' or '-', starting with a letter "
                              "or digit (no path separators, no '..')")
    return name


class DataRoot:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()
        for kind in KINDS:
            (self.path / kind).mkdir(parents=True, exist_ok=True)

    @property
    def db(self) -> Path:
        return self.path / DB

    def folder(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown data root folder {kind!r}")
        return self.path / kind

    def path_for(self, kind: str, name: str, field: str) -> Path:
        """Where the resource `name` of `kind` lives (it may not exist yet), checked to stay inside the root."""
        path = self.folder(kind) / check_name(name, field)
        self.check_inside(path, field)
        return path

    def existing(self, kind: str, name: str, field: str, what: str | None = None) -> Path:
        """path_for, and NotFound naming the field when nothing is there."""
        path = self.path_for(kind, name, field)
        if not path.exists():
            raise NotFound(f"{field}: no {what or kind.rstrip('s')} named {name!r}")
        return path

    def check_inside(self, path: Path, field: str) -> None:
        """PermissionDenied when `path` (or a symlink on the way to it) leads outside the root."""
        if path.is_symlink() or not path.resolve().is_relative_to(self.path):
            raise PermissionDenied(f"{field}: {path.name!r} leads outside the data root")
