"""The FastAPI application of the HTTP face: the native REST router, the OpenAI-compatible router, health, the
error answers, and a gate in front of it all (bearer token, request counting).

Errors are JSON everywhere: {"error": {"code": "<gRPC code name>", "message": ...}}, a ServiceError with the
status server/http/calls.py maps its code to, FastAPI's request validation errors as 400 naming the field (not
422), Starlette's own (an unknown path, a wrong verb) with their status. The gate checks the bearer token of every
API path (/ulm/..., /v1/...) before anything else, as the interceptor does on gRPC; health, the OpenAPI document
and the docs stay open. It counts every request in ulm_http_requests_total by route template and HTTP status.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from server.app import internal_error
from server.errors import InvalidArgument, ServiceError
from server.http.calls import error_json, error_response
from server.http.context import HttpContext
from server.http.rest import native_router
from server.http.routes import ERROR, error_schema
from server.http.schema import Schemas

PROTECTED = ("/ulm/", "/v1/")  # the API; /healthz, /readyz, /openapi.json and /docs stay open
VERBS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                405: "UNIMPLEMENTED", 409: "FAILED_PRECONDITION", 413: "RESOURCE_EXHAUSTED",
                429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
DESCRIPTION = """µLM's services over HTTP: the native API under `/ulm/v1` (the ulm.v1 gRPC methods, JSON field names
as in the protos, streams as Server-Sent Events) and the OpenAI-compatible API under `/v1`. With
`--auth-token-file`, send `Authorization: Bearer <token>`."""


def create_app(app) -> FastAPI:
    """The HTTP application of the server's App (server.app.App), whose services answer every route."""
    api = FastAPI(title="µLM", version="1", description=DESCRIPTION, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    schemas = Schemas()
    api.add_exception_handler(ServiceError, service_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(Exception, unexpected_error)
    add_health_routes(api, app)
    routers = [native_router(app, schemas)]
    if importlib.util.find_spec("server.http.openai") is not None:  # the OpenAI-compatible API
        from server.http.openai import openai_router
        routers.append(openai_router(app))
    for router in routers:
        api.include_router(router)
    api.openapi = lambda: openapi_document(api, schemas)
    api.add_middleware(Gate, app=app, routes=[route for router in routers for route in router.routes])
    return api


def add_health_routes(api: FastAPI, app) -> None:
    status = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    answers = {code: {"description": what, "content": {"application/json": {"schema": status}}}
               for code, what in ((200, "OK"), (503, "Not ready (starting, or draining)"))}

    @api.get("/healthz", summary="Liveness: the process answers", tags=["Health"], responses=answers)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "SERVING"})

    @api.get("/readyz", summary="Readiness: the gRPC health of the whole server is SERVING", tags=["Health"],
             responses=answers)
    async def readyz() -> JSONResponse:
        # the gRPC health servicer's own answer: ready here exactly when ready there
        checked = await app.health.Check(health_pb2.HealthCheckRequest(service=""), HttpContext())
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(checked.status)
        return JSONResponse({"status": name}, 200 if checked.status == health_pb2.HealthCheckResponse.SERVING
                            else 503)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as the API's 400, naming the first field at fault as the gRPC messages do."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
    return error_response(InvalidArgument(f"{where}: {first.get('msg', 'invalid')}"))


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path: 404, a verb the path does not take: 405, a broken form: 400)."""
    response = error_json(e.status_code, STATUS_CODES.get(e.status_code, "UNKNOWN"), str(e.detail))
    response.headers.update(e.headers or {})  # a 405's Allow
    return response


async def service_error(request: Request, e: ServiceError) -> JSONResponse:
    return error_response(e)


async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
    return error_response(internal_error(f"{request.method} {request.url.path}", e))


def openapi_document(api: FastAPI, schemas: Schemas) -> dict[str, Any]:
    """FastAPI's document with the proto messages' schemas as components, and 400 where FastAPI says 422."""
    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        components.update(schemas.components)
        components[ERROR] = error_schema()
        for operation in (op for path in doc["paths"].values() for op in path.values()):
            if operation.get("responses", {}).pop("422", None) is not None:
                operation["responses"].setdefault("400", {"description": "Invalid request", "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR}"}}}})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        api.openapi_schema = doc
    return api.openapi_schema


class Gate:
    """Pure ASGI middleware (so that streams pass through untouched): the bearer token first on the API's paths,
    then the app; every request counted by route template and status once it ended."""

    def __init__(self, asgi, app, routes: list[BaseRoute]):
        self.asgi, self.app = asgi, app
        self.routes = routes  # the API's routes, to name the route of a request refused before routing

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        status, counted = 500, False  # 500: what the client gets if the app fails before it answers

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.app.metrics.http_requests.labels(self.route_label(scope), str(status)).inc()

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()  # before the client can see the end of the answer
            await send(message)
        try:
            if scope["path"].startswith(PROTECTED):
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                try:
                    self.app.security.authenticate(HttpContext.from_headers(headers).invocation_metadata())
                except ServiceError as e:
                    return await error_response(e)(scope, receive, sending)
            await self.asgi(scope, receive, sending)
        finally:
            count()

    def route_label(self, scope) -> str:
        """"POST /ulm/v1/jobs/{id}:cancel": bounded, whatever the path (anything unrouted is "unmatched")."""
        route = scope.get("route") or matching_route(self.routes, scope)  # refused before routing: found here
        verb = scope["method"] if scope["method"] in VERBS else "OTHER"
        return f"{verb} {route.path}" if route is not None and hasattr(route, "path") else "unmatched"


def matching_route(routes: list[BaseRoute], scope) -> BaseRoute | None:
    """The route Starlette's router would pick (a full match, else the first partial one: a wrong verb)."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial
