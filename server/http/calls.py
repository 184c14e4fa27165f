"""One servicer call made over HTTP, checked, ended and mapped to HTTP as the gRPC interceptor does it over gRPC.

call_unary and call_stream refuse the call while the server drains or without a valid bearer token (the same
check_accepting as the interceptor's), end it with HttpContext.finish (which runs the servicer's done-callbacks),
and turn any exception that is no ServiceError into INTERNAL (logged, with the same message). A ServiceError
reaches the FastAPI app's exception handler, which answers error_response(e): the conventional HTTP status and
{"error": {"code": "INVALID_ARGUMENT", "message": "<the gRPC status's message>"}}. Requests are counted by the
app's middleware (ulm_http_requests_total, by route and HTTP status), not here: a request FastAPI refuses before
any call is counted too.

sse_response streams a call's messages as Server-Sent Events; an error after the first event (the HTTP status is
sent by then) becomes a last event named "error" carrying the same JSON body.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.app import check_accepting, internal_error
from server.errors import ServiceError
from server.http.context import HttpContext

log = logging.getLogger(__name__)

Code = grpc.StatusCode
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400, Code.OUT_OF_RANGE: 400, Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.FAILED_PRECONDITION: 409, Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 429, Code.CANCELLED: 499, Code.UNIMPLEMENTED: 501, Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
RETRY_AFTER_S = 1  # a full queue drains within a few decode steps: try again soon
SSE_PING_S = 15  # a comment line this often keeps proxies from closing a quiet stream (a job between steps)
_END = object()


class ClientGone(ServiceError):
    """The client left in the middle of its request (an upload cut short). nginx's 499: the client never sees it;
    it is what the request is counted as."""

    code = Code.CANCELLED


def http_status(e: ServiceError) -> int:
    return getattr(e, "http_status", None) or HTTP_STATUS.get(e.code, 500)


def error_body(e: ServiceError) -> dict[str, Any]:
    return {"error": {"code": e.code.name, "message": e.message}}


def error_response(e: ServiceError) -> JSONResponse:
    return error_json(http_status(e), e.code.name, e.message)


def error_json(status: int, code: str, message: str) -> JSONResponse:
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: a 401 names the scheme it wants
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


async def call_unary(app, method: str, handler: Callable[[Any, HttpContext], Awaitable[Any]], request,
                     ctx: HttpContext):
    """`await handler(request, ctx)` as the interceptor runs it; app is the server's App (server.app)."""
    try:
        check_accepting(app, ctx.invocation_metadata())
        return await handler(request, ctx)
    except asyncio.CancelledError:
        ctx.finish(cancelled=True)
        raise
    except ServiceError:
        raise
    except Exception as e:
        raise internal_error(method, e) from e
    finally:
        ctx.finish(cancelled=False)  # a no-op once finished


async def call_stream(app, method: str, handler: Callable[[Any, HttpContext], AsyncIterator[Any]], request,
                      ctx: HttpContext) -> AsyncIterator[Any]:
    """Start `handler(request, ctx)` (a server-streaming servicer method) and wait for its first message, so that
    an error before it (a bad request, a full queue) becomes the HTTP status of the answer; the messages, the
    first among them, then come from the returned iterator, which raises ServiceError for a later error. Closing
    the iterator early (a client that left) cancels the call."""
    stream = None
    try:
        check_accepting(app, ctx.invocation_metadata())
        stream = handler(request, ctx)
        first = await anext(stream, _END)
    except BaseException as e:
        if stream is not None:
            await stream.aclose()
        ctx.finish(cancelled=isinstance(e, asyncio.CancelledError))
        if isinstance(e, (ServiceError, asyncio.CancelledError)) or not isinstance(e, Exception):
            raise
        raise internal_error(method, e) from e
    return _relay(first, stream, method, ctx)


async def _relay(first, stream: AsyncIterator[Any], method: str, ctx: HttpContext) -> AsyncIterator[Any]:
    cancelled = True  # until the stream ends or fails by itself: a close or cancellation here is the client's
    try:
        if first is not _END:
            yield first
            async for message in stream:
                yield message
        cancelled = False
    except ServiceError:
        cancelled = False
        raise
    except Exception as e:
        cancelled = False
        raise internal_error(method, e) from e
    finally:
        await stream.aclose()  # the servicer's cleanup (its finally) runs now, not when collected
        ctx.finish(cancelled)


def sse_response(events: AsyncIterator[str]) -> EventSourceResponse:
    """Server-Sent Events, one `data:` line each (the strings, JSON as a rule); a ServiceError raised by `events`
    ends the stream with an event named "error" whose data is error_body's JSON."""
    return EventSourceResponse(_with_error_event(events), ping=SSE_PING_S, sep="\n")


async def _with_error_event(events: AsyncIterator[str]) -> AsyncIterator[ServerSentEvent]:
    try:
        async for data in events:
            yield ServerSentEvent(data=data, sep="\n")
    except ServiceError as e:
        yield ServerSentEvent(data=json.dumps(error_body(e)), event="error", sep="\n")
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()  # the call's iterator: a client that left cancels the call now
