"""One job's child process: started through launch.py in its own process group (so a cancel reaches torchrun's
workers too), its stdout and stderr appended to jobs/<id>/log.txt, and that log and the run's metrics.jsonl
tailed while it runs. The child writes to files, not pipes: its output stays readable after the job ends, and
a slow server never blocks it. Cancel is SIGTERM to the group (training saves its checkpoint and exits), then
SIGKILL after a grace period.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.2  # how often the files are read and the process polled
MAX_LINE = 2000  # longer log lines are cut (a stray progress bar, a dumped tensor)
MAX_READ = 2**20  # of a log per poll: a job that floods its output cannot stall the event loop
LAUNCHER = Path(__file__).with_name("launch.py")
# the lines that say why a command failed, best first: our CLIs' one-line errors (a torchrun worker's among
# torchrun's own report), then a Python exception
FAILURE_LINES = (re.compile(r"^(ulm \w[\w-]*|export): "), re.compile(r"^\w+(\.\w+)*(Error|Exception)\b"))


class OutputTail:
    """The new complete lines of a file that only grows (the job's log), from `offset` on."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset, self.partial = path, offset, b""
        self.recent: deque[str] = deque(maxlen=200)  # for failure_line

    def read(self, final: bool = False) -> list[str]:
        """New lines, at most MAX_READ bytes of them; with `final` (the writer is gone), all of them, and the
        unterminated last one too."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read() if final else f.read(MAX_READ)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        parts = (self.partial + data).replace(b"\r", b"\n").split(b"\n")
        self.partial = b"" if final else parts.pop()
        if len(self.partial) > MAX_READ:  # a line that never ends: cut it here
            parts.append(self.partial)
            self.partial = b""
        lines = [p.decode("utf-8", "replace")[:MAX_LINE].rstrip() for p in parts]
        lines = [line for line in lines if line.strip()]
        self.recent.extend(lines)
        return lines

    def failure_line(self) -> str:
        """The line that best says why the process failed: the last error line of the best kind, else the last."""
        for pattern in FAILURE_LINES:
            for line in reversed(self.recent):
                if pattern.match(line.strip()):
                    return line.strip()
        return self.recent[-1].strip() if self.recent else ""


class RecordTail:
    """The new JSON records of a training run's metrics.jsonl. The trainer appends to it, and replaces it when a
    run resumes (cut back to the checkpoint's iteration): then it is read again from the start."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self.inode, self.offset, self.partial = None, 0, b""

    def read(self) -> list[dict]:
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode or os.fstat(f.fileno()).st_size < self.offset:
                    self.inode, self.offset, self.partial = inode, 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        parts = (self.partial + data).split(b"\n")
        self.partial = parts.pop()
        records = []
        for part in parts:
            try:
                record = json.loads(part)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class ChildProcess:
    """A job's command (`python ARGV...`) in its own session, writing to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str], metrics_file: str = ""):
        self.argv, self.log_path, self.cwd, self.env = argv, log_path, cwd, env
        self.proc: subprocess.Popen | None = None
        self.log = OutputTail(log_path, log_path.stat().st_size if log_path.exists() else 0)
        self.metrics = RecordTail(metrics_file)
        self.killer: asyncio.TimerHandle | None = None

    def start(self) -> int:
        """Start the process; its process group's id. OSError when it cannot start."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(LAUNCHER), str(os.getpid()), *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, env=self.env, start_new_session=True)
        return self.proc.pid

    async def wait(self, on_output: Callable[[list[str], list[dict]], None]) -> int:
        """Poll until the process exits, handing every new log line and metrics record to `on_output`; its exit
        status (negative: the signal that ended it). Whatever else is left in its group is killed then."""
        while True:
            code = self.proc.poll()
            on_output(self.log.read(final=code is not None), self.metrics.read())
            if code is not None:
                break
            await asyncio.sleep(POLL_S)
        if self.killer is not None:
            self.killer.cancel()
        self.signal_group(signal.SIGKILL)  # torchrun's workers, if torchrun itself was killed
        return code

    def terminate(self, grace: float) -> None:
        """SIGTERM to the group now, SIGKILL after `grace` seconds if it is still there."""
        self.signal_group(signal.SIGTERM)
        if self.killer is None:
            self.killer = asyncio.get_running_loop().call_later(grace, self.signal_group, signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # gone already
            pass


def exit_description(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with status {code}"


def group_alive(pgid: int, job_id: str) -> bool:
    """Whether the process group `pgid` still runs job `job_id` (its leader's environment names the job), so an
    unrelated group that reused the id is never signalled. Linux (/proc); elsewhere: assume it is gone."""
    try:
        environ = Path(f"/proc/{pgid}/environ").read_bytes()
    except OSError:
        return False
    return f"ULM_JOB_ID={job_id}".encode() in environ.split(b"\0")


async def stop_leftover(pgid: int, job_id: str, grace: float) -> None:
    """Wait up to `grace` seconds for a dead server's job to end (it got SIGTERM with its server), then kill it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while group_alive(pgid, job_id) and loop.time() < deadline:
        await asyncio.sleep(POLL_S / 2)
    if group_alive(pgid, job_id):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
