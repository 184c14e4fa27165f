"""HttpContext: what an HTTP call hands a servicer method in place of grpc.aio.ServicerContext.

The services use only time_remaining(), add_done_callback(fn) and cancelled() (server.errors.call_end_code reads
time_remaining); the interceptor's checks read invocation_metadata(). finish(cancelled) ends the call the way gRPC
ends an RPC: it runs the done-callbacks once. A client that closed its SSE stream finishes with cancelled=True,
and the Generate servicer's callback then frees its batch slot within one decode step, as on gRPC.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("authorization",)  # the headers a servicer or the checks may read, as gRPC metadata


class HttpContext:
    def __init__(self, timeout: float | None = None, metadata: Iterable[tuple[str, str]] = ()):
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._metadata = tuple(metadata)
        self._callbacks: list[Callable[[HttpContext], None]] = []
        self._cancelled = False
        self._done = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], timeout: float | None = None) -> HttpContext:
        """A context carrying the request's authorization header (Starlette's headers are case-insensitive)."""
        return cls(timeout, [(k, headers[k]) for k in FORWARDED_HEADERS if k in headers])

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline; None without one (HTTP calls have none unless given)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def cancelled(self) -> bool:
        return self._cancelled

    def add_done_callback(self, callback: Callable[[HttpContext], None]) -> None:
        if self._done:  # the call has ended already: run it now, as it would have run then
            callback(self)
        else:
            self._callbacks.append(callback)

    def finish(self, cancelled: bool) -> None:
        """The call ended (cancelled: the client left before its end); runs the done-callbacks once."""
        if self._done:
            return
        self._done, self._cancelled = True, cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one failing callback must not keep the others (a slot to free) from running
                log.exception("done-callback %r failed", callback)
