"""Large texts are tokenized in a worker process, so that the server process's GIL stays with the event loop.

In a thread, encoding megabytes and turning millions of ids into Python lists and a serialized response holds
the GIL in many short slices, and every other call waits behind them (docs/performance-log.md). The worker
(`python -m server.tokenize_worker`, started once by the generation service) reads requests from its stdin and
answers on its stdout; the server only moves bytes through pipes on its event loop:

  request:  8-byte length, then a pickled (operation, tokenizer folder, text)
  response: 1 status byte (0 ok, 1 error), 8-byte length, then the ids as uint32s ("ids") or a serialized
            TokenizeResponse ("response"); or the error's one-line message

One request at a time; a request whose caller left is still read to its end, so the pipes stay in step.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import sys
from array import array
from pathlib import Path

from server.errors import Internal

log = logging.getLogger(__name__)
LENGTH = struct.Struct("<Q")
OK, ERROR = 0, 1
PIPE_LIMIT = 1 << 20  # the stream reader's buffer; larger answers are read in pieces of this size
NICENESS = 10  # bulk work: on a busy machine the server's own threads (the loop, the model) get the cores first


class TokenizeWorker:
    """The server side: starts the worker and sends it texts; restarts it if it died."""

    def __init__(self):
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def encode(self, folder: str, text: str) -> list[int]:
        """tokenizer.encode(text) of the tokenizer saved in `folder`."""
        return array("I", await self._ask("ids", folder, text)).tolist()

    async def tokenize_response(self, folder: str, text: str) -> bytes:
        """A serialized TokenizeResponse for `text` (the interceptor passes bytes through)."""
        return await self._ask("response", folder, text)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()

    async def _ask(self, operation: str, folder: str, text: str) -> bytes:
        # shielded: a caller that leaves mid-answer must not leave the answer in the pipe for the next caller
        return await asyncio.shield(self._exchange(pickle.dumps((operation, folder, text), protocol=5)))

    async def _exchange(self, request: bytes) -> bytes:
        async with self.lock:
            proc = await self._running()
            try:
                proc.stdin.write(LENGTH.pack(len(request)) + request)
                await proc.stdin.drain()
                status = (await proc.stdout.readexactly(1))[0]
                (n,) = LENGTH.unpack(await proc.stdout.readexactly(LENGTH.size))
                payload = await proc.stdout.readexactly(n)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                log.error("the tokenizer worker ended (exit %s); starting another", proc.returncode)
                self.proc = None
                raise Internal("the tokenizer worker process ended while tokenizing; try again") from e
        if status == ERROR:
            raise Internal(f"tokenizing failed: {payload.decode()}")
        return payload

    async def _running(self) -> asyncio.subprocess.Process:
        if self.proc is None or self.proc.returncode is not None:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.tokenize_worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=PIPE_LIMIT, cwd=Path(__file__).resolve().parents[1])
        return self.proc


# -- the worker process --------------------------------------------------------------------------------------

def answer(operation: str, folder: str, text: str, tokenizers: dict) -> bytes:
    from protos.ulm.v1 import text_generation_pb2 as pb
    from ulm.tokenizer import TOKENIZER_FILE, Tokenizer

    key = (folder, os.stat(Path(folder) / TOKENIZER_FILE).st_mtime_ns)  # a model saved again is loaded again
    if key not in tokenizers:
        tokenizers[key] = Tokenizer.load(folder)
    tok = tokenizers[key]
    ids = tok.encode(text)
    if operation == "ids":
        return array("I", ids).tobytes()
    return pb.TokenizeResponse(token_ids=ids, tokens=tok.token_strings(ids)).SerializeToString()


def serve(stdin, stdout) -> None:
    tokenizers: dict = {}
    while header := stdin.read(LENGTH.size):
        (n,) = LENGTH.unpack(header)
        operation, folder, text = pickle.loads(stdin.read(n))
        try:
            status, payload = OK, answer(operation, folder, text, tokenizers)
        except Exception as e:  # reported to the caller in a line; the worker goes on
            status, payload = ERROR, f"{type(e).__name__}: {e}".replace("\n", " ").encode()
        stdout.write(bytes([status]) + LENGTH.pack(len(payload)))
        stdout.write(payload)
        stdout.flush()


if __name__ == "__main__":
    os.nice(NICENESS)
    serve(sys.stdin.buffer, sys.stdout.buffer)
