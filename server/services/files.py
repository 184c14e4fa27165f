"""ulm.v1.Files: text and JSONL uploads in the data root's files/ folder, their size and SHA-256 in state.db.

An upload streams into a hidden temporary file inside files/, hashed and counted as it arrives (the disk work in
threads, off the event loop), and is renamed into place only when the client's stream ends whole: a broken
stream, a cap exceeded or a server killed mid-upload leaves no file (dead uploads' temporaries go at start).
Caps: --max-file-bytes per file, --max-files-bytes for all uploads together. The `files` table is reconciled
with the folder at start (a file renamed in just before a crash, or one put there by hand, gets its row).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import psutil

from protos.ulm.v1 import files_pb2 as pb
from protos.ulm.v1 import files_pb2_grpc as pb_grpc
from server.data_root import check_name
from server.db import connect
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from server.services import ServiceSpec, register
from server.shared import Shared
from ulm.util import file_sha256

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""
TEMP_PREFIX = ".upload-"  # + "<pid>-<random>": a name check_name never accepts, so it cannot meet an upload's


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("files (uploads)")
    g.add_argument("--max-file-bytes", type=int, default=256 * 2**20,
                   help="the largest upload; a larger one gets RESOURCE_EXHAUSTED and nothing is kept")
    g.add_argument("--max-files-bytes", type=int, default=4 * 2**30,
                   help="all uploads together (in progress included); past it an upload gets RESOURCE_EXHAUSTED")


class FileTable:
    """The `files` table. Executor threads share its connection, so every statement runs under one lock."""

    def __init__(self, path: Path):
        self.db = connect(path, SCHEMA)
        self.lock = threading.Lock()

    def get(self, name: str) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()

    def all(self) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute("SELECT * FROM files ORDER BY name").fetchall()

    def total_bytes(self, excluding: str) -> int:
        with self.lock:
            return self.db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM files WHERE name != ?",
                                   (excluding,)).fetchone()[0]

    def put(self, name: str, size: int, sha256: str, created_at: float) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO files (name, size_bytes, sha256, created_at) VALUES (?, ?, ?, ?)",
                            (name, size, sha256, created_at))

    def delete(self, name: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM files WHERE name = ?", (name,))

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Upload:
    """One upload in progress: its temporary file in files/ and the hash of what it holds. write and discard take
    a lock, so a cancelled call never closes the file under a write still running in a thread."""

    def __init__(self, folder: Path):
        self.temp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.file = open(self.temp, "xb")  # noqa: SIM115 (closed by finish or discard)
        self.hash = hashlib.sha256()
        self.size = 0
        self.lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        with self.lock:
            if not self.file.closed:
                self.file.write(chunk)
                self.hash.update(chunk)

    def finish(self, dest: Path) -> str:
        """Flush to disk and rename into place; the hex SHA-256."""
        with self.lock:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, dest)
            return self.hash.hexdigest()

    def discard(self) -> None:
        with self.lock:
            self.file.close()
            self.temp.unlink(missing_ok=True)


class FilesService(pb_grpc.FilesServicer):
    name = pb.DESCRIPTOR.services_by_name["Files"].full_name

    def __init__(self, args: argparse.Namespace, shared: Shared):
        for flag in ("max_file_bytes", "max_files_bytes"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        self.args = args
        self.shared = shared
        self.root = shared.data_root
        self.folder = self.root.folder("files")
        self.table = FileTable(self.root.db)
        self.receiving: dict[str, int] = {}  # name -> bytes so far, of the uploads in progress

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_FilesServicer_to_server(self, server)

    async def start(self) -> None:
        await asyncio.to_thread(self._tidy)

    async def drain(self, timeout: float) -> None:
        pass  # an upload cut short by the shutdown leaves nothing: it is renamed in only when whole

    async def close(self) -> None:
        self.table.close()

    # -- RPCs -------------------------------------------------------------------------------------------

    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        requests = aiter(request_iterator)
        header = await first_header(requests)
        dest = self._destination(header)
        self.receiving[header.name] = 0  # reserved: another upload of this name is refused until this one ends
        try:
            return await self._receive(header, dest, requests, context)
        finally:
            del self.receiving[header.name]

    async def ListFiles(self, request: pb.ListFilesRequest, context) -> pb.ListFilesResponse:
        rows = await asyncio.to_thread(self.table.all)
        return pb.ListFilesResponse(files=[file_info(r) for r in rows])

    async def GetFile(self, request: pb.GetFileRequest, context) -> pb.FileInfo:
        self.root.existing("files", request.name, "name", "file")
        row = await asyncio.to_thread(self.table.get, request.name)
        if row is None:
            raise NotFound(f"name: no file named {request.name!r}")
        return file_info(row)

    async def DeleteFile(self, request: pb.DeleteFileRequest, context) -> pb.DeleteFileResponse:
        path = self.root.existing("files", request.name, "name", "file")
        self._check_unused(request.name, "name")
        await asyncio.to_thread(self._remove, request.name, path)
        return pb.DeleteFileResponse()

    # -- helpers ----------------------------------------------------------------------------------------

    def _destination(self, header: pb.UploadFileHeader) -> Path:
        """Where the upload goes, once its name is valid, free (or overwritable) and not being uploaded already."""
        dest = self.root.path_for("files", header.name, "header.name")
        if header.name in self.receiving:
            raise FailedPrecondition(f"header.name: another upload of {header.name!r} is in progress")
        if dest.exists():
            if not header.overwrite:
                raise AlreadyExists(f"header.name: a file named {header.name!r} exists (set header.overwrite to "
                                    "replace it)")
            self._check_unused(header.name, "header.name")
        return dest

    def _check_unused(self, name: str, field: str) -> None:
        job = self.shared.jobs.in_use(f"files/{name}") if self.shared.jobs is not None else None
        if job:
            raise FailedPrecondition(f"{field}: file {name!r} is read by job {job}, which has not ended")

    async def _receive(self, header: pb.UploadFileHeader, dest: Path, requests, context) -> pb.FileInfo:
        name = header.name
        upload = Upload(self.folder)  # on the loop: a cancellation cannot come between its creation and the try
        try:
            async for message in requests:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header: only the first message carries the header; later ones carry "
                                          "chunk")
                self._count(name, upload, len(message.chunk))
                await asyncio.to_thread(upload.write, message.chunk)
            check_whole(header, upload.size, context)
            created = time.time()
            # shielded: once the stream is whole, a client that leaves cannot stop the rename half-recorded
            sha256 = await asyncio.shield(asyncio.to_thread(self._keep, upload, name, dest, created))
        finally:
            upload.discard()  # a no-op after _keep renamed it
        return pb.FileInfo(name=name, size_bytes=upload.size, sha256=sha256, created_at=created)

    def _count(self, name: str, upload: Upload, more: int) -> None:
        """Count `more` bytes into the upload; ResourceExhausted naming the flag when a cap would be passed."""
        upload.size += more
        self.receiving[name] = upload.size
        if upload.size > self.args.max_file_bytes:
            raise ResourceExhausted(f"header.name: {name!r} is over {self.args.max_file_bytes} bytes "
                                    "(--max-file-bytes)")
        # on the loop: a SUM over the small files table, not disk work (WAL readers never wait for a writer)
        total = self.table.total_bytes(excluding=name) + sum(self.receiving.values())
        if total > self.args.max_files_bytes:
            raise ResourceExhausted(f"header.name: {name!r} would bring the uploads to {total} bytes, over "
                                    f"{self.args.max_files_bytes} (--max-files-bytes)")

    def _keep(self, upload: Upload, name: str, dest: Path, created: float) -> str:
        sha256 = upload.finish(dest)
        self.table.put(name, upload.size, sha256, created)
        return sha256

    def _remove(self, name: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.table.delete(name)

    def _tidy(self) -> None:
        """At start: remove dead uploads' temporaries, drop rows whose file is gone, add rows for files without."""
        for temp in self.folder.glob(TEMP_PREFIX + "*"):
            pid = temp.name.removeprefix(TEMP_PREFIX).partition("-")[0]
            if not pid.isdigit() or not psutil.pid_exists(int(pid)):
                temp.unlink(missing_ok=True)
        rows = {r["name"]: r for r in self.table.all()}
        for name, row in rows.items():
            path = self.folder / name
            if path.is_symlink() or not path.is_file():
                self.table.delete(name)
        for path in sorted(self.folder.iterdir()):
            if is_name(path.name) and not path.is_symlink() and path.is_file():
                row = rows.get(path.name)
                st = path.stat()
                if row is None or row["size_bytes"] != st.st_size:
                    self.table.put(path.name, st.st_size, file_sha256(path), st.st_mtime)


async def first_header(requests) -> pb.UploadFileHeader:
    """The stream's first message, which must be the header."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("header: the first message must carry the header (the file's name)")
    return first.header


def is_name(name: str) -> bool:
    try:
        return bool(check_name(name, "name"))
    except InvalidArgument:
        return False


def file_info(row: sqlite3.Row) -> pb.FileInfo:
    return pb.FileInfo(name=row["name"], size_bytes=row["size_bytes"], sha256=row["sha256"],
                       created_at=row["created_at"])


register(ServiceSpec(FilesService.name, FilesService, add_arguments))


def check_whole(header: pb.UploadFileHeader, received: int, context) -> None:
    """The stream ended: keep it only if the client did not leave and the declared size (if any) arrived."""
    if context.cancelled():
        raise asyncio.CancelledError()
    if header.HasField("size_bytes") and received != header.size_bytes:
        raise InvalidArgument(f"header.size_bytes: {header.size_bytes} bytes declared, {received} arrived")

