"""The model in a process of its own, so that its forward passes never share a GIL with the event loop.

In one process, the model thread and the event loop take turns at the GIL: torch lets it go around every op, and
the loop's streams (text, messages, gRPC writes) take it in between, so a toy model's decode step took 1.6x to 5x
as long in the server as alone, and the streams waited for the model in turn (docs/performance-log.md, "The model
in its own process"). Here the server process keeps the scheduler, the text and the wire; the model process (one
per loaded model, forked from a forkserver that has imported torch once) loads the backend and runs
server.model_runner's passes on the slots' sequences, which it keeps itself.

  server -> model  a command per pass: ("prefill", released slots, [(slot, TokenRequest)]),
                   ("decode", released slots, slots, steps, seconds), ("threads", n), ("info",)
  model -> server  one reply per command, in order: ("ok", each slot's tokens, context slides) or ("error", text)

Frames are an 8-byte length and a pickle, over a socket pair; the server reads its end on the event loop. A
sequence ended by its caller (cancelled, a stop string, shutdown) is flagged in a shared byte per slot, which the
model process reads before each step of a pass; deadlines are on time.monotonic(), the same clock in both. A model
process that dies fails the passes in flight (their sequences end with an error) and another is started; requests
that arrive meanwhile wait for it (`ProcessRunner.ready`).
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from server.sequence import Sequence, TokenRequest
from ulm.config import GPTConfig
from ulm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
FRAME = struct.Struct("<Q")
_context = None


def forkserver():
    """multiprocessing's forkserver context, started with torch and the model's modules imported: a model process
    starts in milliseconds, not the seconds of a fresh interpreter importing torch."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["server.model_process", "server.model_runner", "server.backends"])
    return _context


@dataclass
class BackendInfo:
    """What the server knows of a backend loaded in a model process: server.backends.base.Backend's description."""

    name: str
    device: str
    dtype: str
    model_name: str
    config: GPTConfig
    tokenizer: Tokenizer
    max_batch: int
    num_params: int
    torch_threads: int | None


class Pipe(NamedTuple):
    """A model process and the server's ends of what connects them."""

    process: multiprocessing.process.BaseProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    flags: object  # a shared byte array: one per slot (the sequence left), then "requests wait"


class ModelProcessEnded(RuntimeError):
    """The model process exited (killed, out of memory, crashed)."""


class ProcessRunner:
    """The server side: sends each pass to the model process and resolves its future with the reply."""

    def __init__(self, settings, pipe: Pipe):
        self.settings = settings
        self.pending: deque[asyncio.Future] = deque()
        self.ended: str | None = None  # why passes fail at once: the process ended (and is being restarted)
        self.ready = asyncio.Event()  # cleared while a new process is being started: the scheduler holds requests
        self.closing = False
        self.threads: int | None = None  # the torch threads last set (Engine.share_cores)
        self._restarting: asyncio.Task | None = None
        self._attach(pipe)

    @classmethod
    async def start(cls, settings) -> tuple[ProcessRunner, BackendInfo]:
        """Fork a model process that loads `settings` (server.engine.EngineSettings); raises what loading raised."""
        pipe, info = await spawn(settings)
        return cls(settings, pipe), info

    def _attach(self, pipe: Pipe) -> None:
        self.process, self.reader, self.writer, self.flags = pipe
        self._replies = asyncio.get_running_loop().create_task(self._read_replies(), name="model-process replies")
        self.ready.set()

    # -- passes -----------------------------------------------------------------------------------------

    def prefill(self, released: list[int], seqs: list[Sequence], slots: list[int]) -> asyncio.Future:
        for slot in slots:
            self.flags[slot] = 0
        return self._ask(("prefill", released, [(slot, s.req) for slot, s in zip(slots, seqs)]))

    def decode(self, released: list[int], seqs: list[Sequence], slots: list[int], steps: int,
               seconds: float) -> asyncio.Future:
        return self._ask(("decode", released, slots, steps, seconds))

    def left(self, seq: Sequence) -> None:
        """Its caller or the server ended `seq`: the model process leaves it out of its next step."""
        if seq.slot is not None:
            self.flags[seq.slot] = 1

    def waiting(self, yes: bool) -> None:
        """Requests wait for free slots: decode passes run a quarter of their time (ModelRunner.decode)."""
        self.flags[-1] = int(yes)

    async def set_threads(self, n: int) -> None:
        self.threads = n  # a restarted process takes it too
        await self._ask(("threads", n))

    async def info(self) -> dict:
        """The model process's own view: its torch threads (and its ONNX Runtime session's)."""
        return (await self._ask(("info",)))[0]

    async def close(self) -> None:
        self.closing = True
        self.ready.set()
        if self._restarting is not None:
            self._restarting.cancel()
        self.writer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
        self._replies.cancel()

    # -- the pipe ---------------------------------------------------------------------------------------

    def _ask(self, command: tuple) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.ended:
            future.set_exception(ModelProcessEnded(self.ended))
            return future
        self.pending.append(future)
        payload = pickle.dumps(command, protocol=5)
        self.writer.write(FRAME.pack(len(payload)) + payload)
        return future

    async def _read_replies(self) -> None:
        try:
            while True:
                kind, *rest = await read_frame(self.reader)
                future = self.pending.popleft()
                if future.done():
                    continue
                if kind == "error":
                    future.set_exception(RuntimeError(rest[0]))
                else:
                    future.set_result(tuple(rest))  # (each slot's tokens, context slides)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended = "the model process ended"  # from now on passes fail at once
            if not self.closing:
                self.ready.clear()  # and the scheduler holds new requests for the next process
            await asyncio.get_running_loop().run_in_executor(None, self.process.join, 1)
            self.ended = f"the model process ended (exit {self.process.exitcode})"
            if self.pending:
                log.error("%s with %d passes in flight", self.ended, len(self.pending))
            while self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_exception(ModelProcessEnded(self.ended))
            if not self.closing:
                log.error("%s; starting another", self.ended)
                self._restarting = asyncio.get_running_loop().create_task(self._restart(), name="model-process restart")

    async def _restart(self) -> None:
        """A fresh model process for the same model: the sequences of the old one have failed, their slots are free
        on the scheduler's side, and the new process holds none."""
        try:
            pipe, _ = await spawn(self.settings)
        except Exception as e:  # it cannot load now either: passes keep failing with the reason
            self.ended = f"{self.ended}, and a new one failed to load: {e}"
            log.error("%s", self.ended)
            self.ready.set()  # passes fail at once, with the reason
            return
        self._attach(pipe)
        self.ended = None
        if self.threads is not None:
            self._ask(("threads", self.threads))
        log.warning("model process restarted (pid %d)", self.process.pid)


async def spawn(settings) -> tuple[Pipe, BackendInfo]:
    """Fork a model process that loads `settings` and wait until it is ready: (its pipe, what it loaded)."""
    ctx = forkserver()
    ours, theirs = socket.socketpair()
    flags = ctx.Array("b", settings.max_batch + 1, lock=False)  # a byte per slot, then "requests wait"
    process = ctx.Process(target=serve, args=(settings, theirs, flags), name="ulm-model", daemon=True)
    await asyncio.get_running_loop().run_in_executor(None, process.start)
    theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        kind, payload = await read_frame(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        writer.close()
        raise ModelProcessEnded(f"the model process ended while loading (exit {process.exitcode})") from e
    if kind == "error":
        writer.close()
        raise payload  # the loading error itself, for the caller's message
    return Pipe(process, reader, writer, flags), payload


async def read_frame(reader: asyncio.StreamReader):
    (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return pickle.loads(await reader.readexactly(n))


# -- the model process ---------------------------------------------------------------------------------------

class FlaggedSequence(Sequence):
    """A sequence as the model process keeps it: ended also when the server flags its slot."""

    def __init__(self, req: TokenRequest, slot: int, flags):
        super().__init__(req, listener=None)
        self.slot, self.flags = slot, flags

    def dropped(self, now: float) -> str | None:
        return "cancelled" if self.flags[self.slot] else super().dropped(now)


def serve(settings, sock: socket.socket, flags) -> None:
    """The model process: load, say ready (or why not), then answer commands until the server closes its end."""
    import torch

    from server.backends.base import model_threads, warmup
    from server.model_runner import ModelRunner

    stream = sock.makefile("rwb")
    try:
        backend = load(settings)
        warmup(backend)
    except BaseException as e:  # the server raises it as LoadModel's or the server's start's error
        send(stream, ("error", e if picklable(e) else RuntimeError(f"{type(e).__name__}: {e}")))
        return
    send(stream, ("ready", BackendInfo(backend.name, backend.device, backend.dtype, backend.model_name,
                                       backend.config, backend.tokenizer, backend.max_batch, backend.num_params,
                                       model_threads(backend, settings.threads))))
    runner, seqs = ModelRunner(backend), {}
    runner.requests_wait = lambda: flags[-1] == 1
    while header := stream.read(FRAME.size):
        command = pickle.loads(stream.read(FRAME.unpack(header)[0]))
        try:
            reply = ("ok", *run(command, runner, seqs, flags, torch))
        except Exception as e:  # the pass's sequences fail; the process goes on
            reply = ("error", f"{type(e).__name__}: {e}")
        send(stream, reply)


def load(settings):
    """The backend, loaded on every core, then on its own thread count (server.backends.base.model_threads)."""
    import torch

    from server.backends import load_backend
    from server.backends.base import model_threads
    from ulm.util import usable_cores

    torch.set_num_threads(settings.threads or usable_cores())
    backend = load_backend(settings.backend, settings.checkpoint, settings.device, settings.max_batch, serving=True,
                           quantize=settings.quantize)
    torch.set_num_threads(model_threads(backend, settings.threads) or usable_cores())
    return backend


def run(command: tuple, runner, seqs: dict[int, FlaggedSequence], flags, torch) -> tuple:
    kind, *args = command
    slides = runner.slides
    if kind == "prefill":
        released, requests = args
        for slot in released:
            seqs.pop(slot, None)
        new = [FlaggedSequence(req, slot, flags) for slot, req in requests]
        seqs.update((s.slot, s) for s in new)
        tokens = runner.prefill(released, new, [s.slot for s in new])
    elif kind == "decode":
        released, slots, steps, seconds = args
        for slot in released:
            seqs.pop(slot, None)
        tokens = runner.decode(released, [seqs[slot] for slot in slots], slots, steps, seconds)
    elif kind == "threads":
        torch.set_num_threads(args[0])
        return None, 0
    elif kind == "info":
        session = getattr(runner.backend, "session", None)
        return {"torch_threads": torch.get_num_threads(),
                "intra_op_threads": session.get_session_options().intra_op_num_threads if session else None}, 0
    else:
        raise ValueError(f"unknown command {kind!r}")
    return tokens, runner.slides - slides


def picklable(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


def send(stream, reply: tuple) -> None:
    payload = pickle.dumps(reply, protocol=5)
    stream.write(FRAME.pack(len(payload)) + payload)
    stream.flush()
