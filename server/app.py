"""The gRPC server: the registered services, health, reflection, and one interceptor for status codes.

Health starts NOT_SERVING, turns SERVING once every service has started (models loaded and warmed up), and
goes back to NOT_SERVING when the server drains. The interceptor wraps our services' methods: it checks the
bearer token first (server/auth.py; health and reflection stay open), refuses calls while draining, turns
ServiceError into its status code (anything else into INTERNAL, logged), and counts every call by method and
final status code. It also parses the requests itself, so that one that is too large or undecodable reaches the
handler as an error (counted, with a one-line status) instead of failing inside gRPC (uncounted, UNKNOWN and a
traceback). With --http-port the same services answer over HTTP too (server/http, which shares check_accepting and
internal_error with the interceptor): started here, stopped after the drain with what is left of the grace.
"""
from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.auth import Security
from server.errors import Internal, InvalidArgument, ResourceExhausted, ServiceError, Unavailable, call_end_code
from server.metrics import Metrics
from server.services import Service

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 4 * 2**20  # gRPC's own default, now a flag
CORE_LIMIT_FACTOR = 4  # gRPC refuses (uncounted) only requests this many times over the limit


class App:
    def __init__(self, services: list[Service], metrics: Metrics, host: str = "127.0.0.1", port: int = 50051,
                 metrics_port: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 security: Security | None = None, http=None):
        if max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
        self.services = services
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.host, self.port = host, port
        self.metrics_port = metrics_port
        self.security = security or Security()
        self.draining = False
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._prefixes = tuple(f"/{s.name}/" for s in services)
        self.http = http  # server.http.server.HttpServer: the same services over HTTP (--http-port), or None
        self.http_port: int | None = None

    def owns(self, method: str) -> bool:
        return method.startswith(self._prefixes)

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), then start the services; SERVING when all have started."""
        # without so_reuseport a second server on a taken port fails instead of sharing it
        self.server = grpc.aio.server(interceptors=[StatusInterceptor(self)], options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", min(2**31 - 1, CORE_LIMIT_FACTOR * self.max_request_bytes))])
        for s in self.services:
            s.add_to_server(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.name for s in self.services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.host}:{self.port}"
        credentials = self.security.credentials
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        await self.server.start()
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port, self.host)
            log.info("metrics on http://%s:%d/metrics", self.host, self.metrics_port)
        if self.http is not None:
            self.http_port = await self.http.start(self)
        log.info("listening on %s:%d%s", self.host, self.port, " (TLS)" if credentials is not None else "")
        t0 = time.perf_counter()
        await asyncio.gather(*(s.start() for s in self.services))
        # startup's long-lived objects (modules, the model), frozen: full collections skip them instead of stalling
        # every stream (docs/performance-log.md)
        gc.collect()
        gc.freeze()
        if not self.draining:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: %s started in %.1f s", ", ".join(names), time.perf_counter() - t0)

    async def shutdown(self, grace: float) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` seconds, then stop."""
        self.draining = True
        log.info("draining (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        await asyncio.gather(*(s.drain(grace) for s in self.services))
        left = max(1.0, grace - (time.monotonic() - t0))
        # the streams are done: this only lets their last messages go out (over HTTP, a closed connection too)
        await asyncio.gather(self.server.stop(left) if self.server is not None else asyncio.sleep(0),
                             self.http.stop(left) if self.http is not None else asyncio.sleep(0))
        await asyncio.gather(*(s.close() for s in self.services))
        self.metrics.close()
        log.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ["", *(s.name for s in self.services)]:  # "" is the whole server
            await self.health.set(name, status)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, app: App):
        self.app = app

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self.app.owns(details.method):
            return handler
        kinds = [("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler)]
        for kind, make in kinds:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):
                wrapped = self._wrap_stream(behavior, details.method)
            elif inspect.iscoroutinefunction(behavior):
                wrapped = self._wrap_unary(behavior, details.method)
            else:
                return handler
            parse = RequestParser(handler.request_deserializer, self.app.max_request_bytes)
            return make(wrapped, request_deserializer=parse, response_serializer=passing_bytes(
                handler.response_serializer))
        return handler

    def _wrap_unary(self, behavior, method: str):
        async def wrapper(request, context):
            outcome = _Outcome(self.app, method, context)
            try:
                outcome.check_accepting()
                return await behavior(checked(request), context)
            except BaseException as e:
                await outcome.fail(e)
            finally:
                outcome.count()
        return wrapper

    def _wrap_stream(self, behavior, method: str):
        async def wrapper(request, context):
            outcome = _Outcome(self.app, method, context)
            stream = None
            try:
                outcome.check_accepting()
                stream = behavior(checked(request), context)
                async for response in stream:
                    yield response
            except BaseException as e:
                await outcome.fail(e)
            finally:
                if stream is not None:
                    await stream.aclose()  # runs the handler's cleanup now, not when collected
                outcome.count()
        return wrapper


class _Outcome:
    """One call's final status code."""

    def __init__(self, app: App, method: str, context: grpc.aio.ServicerContext):
        self.app, self.method, self.context = app, method, context
        self.code = grpc.StatusCode.OK
        self.counted = False

    def check_accepting(self) -> None:
        check_accepting(self.app, self.context.invocation_metadata())

    async def fail(self, e: BaseException) -> None:
        """Record the code and re-raise, or abort with the code the exception maps to."""
        if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
            self.code = call_end_code(self.context)
            raise e
        if isinstance(e, grpc.aio.AbortError):  # the handler aborted by itself
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            raise e
        error = e if isinstance(e, ServiceError) else internal_error(self.method, e)
        self.code, message = error.code, error.message
        self.count()  # before the client can see the status
        await self.context.abort(self.code, message)

    def count(self) -> None:
        """Once per call."""
        if not self.counted:
            self.counted = True
            self.app.metrics.requests.labels(self.method.lstrip("/"), self.code.name).inc()


def check_accepting(app: App, metadata) -> None:
    """Raise unless the server takes this call now (gRPC and HTTP alike)."""
    # the token first: a caller without one learns nothing, not even that the server drains
    app.security.authenticate(metadata)
    if app.draining:
        raise Unavailable("server is shutting down")


def internal_error(method: str, e: BaseException) -> Internal:
    """An exception that is no ServiceError, logged with its traceback, as the INTERNAL error the client sees."""
    log.error("%s failed", method, exc_info=e)
    return Internal(f"internal error: {type(e).__name__}: {e}")


def request_too_large(size: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(f"request is {size} bytes, over this server's limit of {limit} (--max-request-bytes)")


class Unparsed:
    """A request the parser refused: the handler's wrapper raises its error, so the call is counted."""

    def __init__(self, error: ServiceError):
        self.error = error


class RequestParser:
    """gRPC's request deserializer, with the size limit (--max-request-bytes) and decode errors as statuses."""

    def __init__(self, deserialize, limit: int):
        self.deserialize, self.limit = deserialize, limit

    def __call__(self, data: bytes):
        if len(data) > self.limit:
            return Unparsed(request_too_large(len(data), self.limit))
        try:
            return self.deserialize(data) if self.deserialize is not None else data
        except Exception as e:  # protobuf's DecodeError, e.g. a string field that is not UTF-8
            return Unparsed(InvalidArgument(f"request could not be decoded (a string field that is not valid "
                                            f"UTF-8?): {type(e).__name__}: {e}".replace("\n", " ")))


def passing_bytes(serialize):
    """The response serializer, for handlers that may return their response serialized already (in a thread)."""
    if serialize is None:
        return None
    return lambda response: response if isinstance(response, bytes) else serialize(response)


def checked(request):
    """The request itself, or its parser's error raised; a request stream yields its messages so."""
    if isinstance(request, Unparsed):
        raise request.error
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests):
    async for request in requests:
        yield checked(request)
