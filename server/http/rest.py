"""The native REST API: one generic handler per row of server/http/routes.py, and the two upload routes.

A handler builds the request message (path, query, JSON body: server/http/messages.py), makes the call through
server/http/calls.py on the servicer object the gRPC server serves, and answers the response message as JSON, or
its stream as Server-Sent Events. Uploads stream into Files.UploadFile as the gRPC client stream would: a header
message, then the bytes as they arrive (PUT: the raw body; POST: a multipart form's `file`).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.message import Message
from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from protos.ulm.v1 import files_pb2 as fpb
from server.app import request_too_large
from server.errors import InvalidArgument, ResourceExhausted
from server.http.calls import ClientGone, call_stream, call_unary, sse_response
from server.http.context import HttpContext
from server.http.messages import QUERY_FALSE, QUERY_TRUE, answer_json, message_class, parse, query_fields, to_json
from server.http.routes import ROUTES, Route, error_responses, openapi_of
from server.http.schema import NAME_SCHEMA, Schemas

UPLOAD_CHUNK = 256 * 1024  # read from a multipart form's spooled file this much at a time
UPLOAD = "ulm.v1.Files/UploadFile"


class PayloadTooLarge(ResourceExhausted):
    """A body over --max-request-bytes: 413, not the 429 of a full queue (waiting will not help)."""

    http_status = 413


def native_router(app, schemas: Schemas) -> APIRouter:
    """Every ulm.v1 method as a route; `app` is the server's App, whose services answer."""
    services = {s.name: s for s in app.services}
    router = APIRouter()
    for route in ROUTES:
        service = services.get(f"ulm.v1.{route.service}")
        if service is None:  # a server built without this service
            continue
        extra, responses = openapi_of(route, schemas)
        router.add_api_route(route.path, handler(app, route, getattr(service, route.rpc)), methods=[route.verb],
                             name=route.rpc, summary=route.summary, openapi_extra=extra, responses=responses,
                             tags=[route.service],
                             response_class=EventSourceResponse if route.streaming else JSONResponse)
    if "ulm.v1.Files" in services:
        add_upload_routes(router, app, services["ulm.v1.Files"], schemas)
    return router


def handler(app, route: Route, method):
    in_cls, out_cls = message_class(route.method.input_type), message_class(route.method.output_type)

    async def handle(request: Request) -> Response:
        fields = await body_fields(request, app.max_request_bytes) if route.verb in ("POST", "PUT") else {}
        path = route.path_fields(request.path_params)
        for key in set(fields) & set(path):  # the body may repeat the path's value, not contradict it
            if fields[key] != path[key]:
                raise InvalidArgument(f"{key}: the body says {fields[key]!r}, the path {path[key]!r}")
        fields.update(query_fields(route.method.input_type, dict(request.query_params)) if route.query else
                      reject_query(request))
        fields.update(path)
        message = parse(in_cls, fields)
        ctx = HttpContext.from_headers(request.headers)
        if route.streaming:
            stream = await call_stream(app, route.full_method, method, message, ctx)
            return sse_response(json_events(stream))
        answer = await call_unary(app, route.full_method, method, message, ctx)
        return Response(await answer_json(out_cls, answer), media_type="application/json")
    handle.__name__ = route.rpc
    return handle


async def json_events(stream: AsyncIterator[Message]) -> AsyncIterator[str]:
    """Each message of a call's stream as JSON; closing this closes the stream now (a client that left cancels
    the call), not when the garbage collector finds it."""
    async with contextlib.aclosing(stream):
        async for message in stream:
            yield to_json(message)


def reject_query(request: Request) -> dict[str, Any]:
    """A route without query parameters takes none: one given would be silently ignored otherwise."""
    if request.query_params:
        raise InvalidArgument(f"{next(iter(request.query_params))}: this route takes no query parameters")
    return {}


async def body_fields(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the body ({} when empty); over --max-request-bytes it is refused unread."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(request_too_large(int(declared), limit).message)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(request_too_large(len(body), limit).message)
    if not body.strip():
        return {}
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"request body is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise InvalidArgument(f"request body must be a JSON object, not {type(fields).__name__}")
    return fields


# -- uploads -----------------------------------------------------------------------------------------------


def add_upload_routes(router: APIRouter, app, files, schemas: Schemas) -> None:
    info = schemas.message(fpb.FileInfo.DESCRIPTOR, request=False)
    responses = {200: {"description": "OK", "content": {"application/json": {"schema": info}}}, **error_responses()}
    put = {"parameters": [{"name": "name", "in": "path", "required": True, "schema": NAME_SCHEMA},
                          {"name": "overwrite", "in": "query", "required": False, "schema": {"type": "boolean"}}],
           "requestBody": {"required": True, "content": {"application/octet-stream": {
               "schema": {"type": "string", "format": "binary"}}}}}
    form = {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "name": {**NAME_SCHEMA, "description": "default: the "
                                                                                                "file's name"},
        "overwrite": {"type": "boolean"}}}
    post = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}

    async def upload_raw(request: Request) -> Response:
        name = request.path_params["name"]
        if unknown := set(request.query_params) - {"overwrite"}:
            raise InvalidArgument(f"{sorted(unknown)[0]}: not a query parameter of this route (known: overwrite)")
        size = request.headers.get("content-length", "")
        header = fpb.UploadFileHeader(name=name, overwrite=flag(request.query_params.get("overwrite", "false"),
                                                                "overwrite"),
                                      size_bytes=int(size) if size.isdigit() else None)
        return await upload(app, files, request, header, request.stream())

    async def upload_form(request: Request) -> Response:
        check_form_size(request, files.args.max_file_bytes)  # the form is spooled whole before the service sees it
        form = await request.form(max_files=1, max_fields=4)
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise InvalidArgument("file: the multipart form carries no file part named `file`")
            name = str(form.get("name") or file.filename or "")
            header = fpb.UploadFileHeader(name=name, overwrite=flag(str(form.get("overwrite", "false")),
                                                                    "overwrite"), size_bytes=file.size)
            return await upload(app, files, request, header, file_chunks(file))
        finally:
            await form.close()

    router.add_api_route("/ulm/v1/files/{name}", upload_raw, methods=["PUT"], name="UploadFile",
                         summary="Upload a file (the raw body)", openapi_extra=put, responses=responses,
                         tags=["Files"])
    router.add_api_route("/ulm/v1/files", upload_form, methods=["POST"], name="UploadFileForm",
                         summary="Upload a file (a multipart form)", openapi_extra=post, responses=responses,
                         tags=["Files"])


FORM_OVERHEAD = 64 * 1024  # a multipart form's boundaries and small fields, beyond the file itself


def check_form_size(request: Request, max_file_bytes: int) -> None:
    """ResourceExhausted, as the service gives it, for a form that cannot hold a file under --max-file-bytes."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > max_file_bytes + FORM_OVERHEAD:
        raise ResourceExhausted(f"file: the form is {size} bytes, over {max_file_bytes} (--max-file-bytes)")


async def upload(app, files, request: Request, header: fpb.UploadFileHeader, chunks: AsyncIterator[bytes]
                 ) -> Response:
    ctx = HttpContext.from_headers(request.headers)
    answer = await call_unary(app, UPLOAD, files.UploadFile, upload_messages(header, chunks), ctx)
    return Response(to_json(answer), media_type="application/json")


async def upload_messages(header: fpb.UploadFileHeader, chunks: AsyncIterator[bytes]
                          ) -> AsyncIterator[fpb.UploadFileRequest]:
    """The client stream of Files.UploadFile: the header, then the bytes as they arrive."""
    yield fpb.UploadFileRequest(header=header)
    try:
        async for chunk in chunks:
            if chunk:
                yield fpb.UploadFileRequest(chunk=chunk)
    except ClientDisconnect:  # the service discards what arrived: only a whole upload is kept
        raise ClientGone("the client left before the upload ended") from None


async def file_chunks(file: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(UPLOAD_CHUNK):
        yield chunk


def flag(value: str, field: str) -> bool:
    if value.lower() not in QUERY_TRUE + QUERY_FALSE:
        raise InvalidArgument(f"{field}: expected true or false, got {value!r}")
    return value.lower() in QUERY_TRUE
