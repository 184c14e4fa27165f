"""The native REST API's routes: one table row per ulm.v1 method (HTTP verb, path, service, rpc, and which of
the request's fields the query string fills), resource-style paths under /ulm/v1.

A route's request message is filled from three places: the path's parameters (`{name}`, and `{id}`, which is
the request's `name`), the query string (the fields in `query`), and, for POST and PUT, the JSON body (every
other field). Server-streaming methods (Generate, WatchJob) answer Server-Sent Events. UploadFile, a client
stream, has routes of its own (server/http/rest.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import MethodDescriptor

from protos.ulm.v1 import datasets_pb2, files_pb2, jobs_pb2, models_pb2, text_generation_pb2
from server.http.schema import NAME_SCHEMA, REF, Schemas

PACKAGE = "ulm.v1"
FILES = {m.DESCRIPTOR.package + "." + name: s for m in (datasets_pb2, files_pb2, jobs_pb2, models_pb2,
                                                        text_generation_pb2)
         for name, s in m.DESCRIPTOR.services_by_name.items()}
PATH_FIELDS = {"id": "name"}  # a path parameter that fills a field of another name
ERROR = "Error"


@dataclass(frozen=True)
class Route:
    verb: str
    path: str
    service: str  # the proto service's name in ulm.v1
    rpc: str
    query: tuple[str, ...] = ()
    summary: str = ""

    @property
    def method(self) -> MethodDescriptor:
        return FILES[f"{PACKAGE}.{self.service}"].methods_by_name[self.rpc]

    @property
    def full_method(self) -> str:
        """As the gRPC server names it (log lines, errors): ulm.v1.Jobs/GetJob."""
        return f"{PACKAGE}.{self.service}/{self.rpc}"

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    def path_fields(self, params: dict[str, str]) -> dict[str, str]:
        return {PATH_FIELDS.get(k, k): v for k, v in params.items()}

    @property
    def body_fields(self) -> list[str]:
        """The request's fields that the JSON body carries (none for GET and DELETE)."""
        if self.verb not in ("POST", "PUT"):
            return []
        taken = {PATH_FIELDS.get(p, p) for p in self.path_params} | set(self.query)
        return [f.name for f in self.method.input_type.fields if f.name not in taken]

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming


R = Route
ROUTES = [
    R("POST", "/ulm/v1/generate", "TextGeneration", "Generate", summary="Generate text (Server-Sent Events)"),
    R("POST", "/ulm/v1/tokenize", "TextGeneration", "Tokenize", summary="Token ids of a text"),
    R("GET", "/ulm/v1/model-info", "TextGeneration", "GetModelInfo", query=("model",),
      summary="A loaded model's info (empty model = the default)"),
    R("GET", "/ulm/v1/files", "Files", "ListFiles", summary="Uploaded files"),
    R("GET", "/ulm/v1/files/{name}", "Files", "GetFile", summary="An uploaded file's size and SHA-256"),
    R("DELETE", "/ulm/v1/files/{name}", "Files", "DeleteFile", summary="Delete an uploaded file"),
    R("POST", "/ulm/v1/datasets", "Datasets", "CreateDataset", summary="Build a dataset (starts a job)"),
    R("GET", "/ulm/v1/datasets", "Datasets", "ListDatasets", summary="Built datasets"),
    R("GET", "/ulm/v1/datasets/{name}", "Datasets", "GetDataset", summary="A dataset and its manifest"),
    R("DELETE", "/ulm/v1/datasets/{name}", "Datasets", "DeleteDataset", summary="Delete a dataset"),
    R("POST", "/ulm/v1/jobs:train", "Jobs", "StartTraining", summary="Start a training job"),
    R("POST", "/ulm/v1/jobs:export", "Jobs", "StartExport", summary="Start an ONNX export job"),
    R("GET", "/ulm/v1/jobs", "Jobs", "ListJobs", query=("kind", "state", "page_size", "page_token"),
      summary="Jobs, newest first, a page at a time"),
    # before GET /ulm/v1/jobs/{id}, whose {id} would take "<id>:watch" as well
    R("GET", "/ulm/v1/jobs/{id}:watch", "Jobs", "WatchJob", query=("since_sequence", "replay_all"),
      summary="Follow a job: its state, then its events until it ends (Server-Sent Events)"),
    R("GET", "/ulm/v1/jobs/{id}", "Jobs", "GetJob", summary="A job"),
    R("POST", "/ulm/v1/jobs/{id}:cancel", "Jobs", "CancelJob", summary="Cancel a queued or running job"),
    R("POST", "/ulm/v1/jobs/{id}:resume", "Jobs", "ResumeJob", summary="Resume a training job"),
    R("GET", "/ulm/v1/models", "Models", "ListModels", summary="The models in the data root"),
    R("GET", "/ulm/v1/models/{name}", "Models", "GetModel", summary="A model and its lineage"),
    R("DELETE", "/ulm/v1/models/{name}", "Models", "DeleteModel", summary="Delete a model"),
    R("POST", "/ulm/v1/models/{name}:load", "Models", "LoadModel", summary="Serve a model"),
    R("POST", "/ulm/v1/models/{name}:unload", "Models", "UnloadModel", summary="Stop serving a model"),
    R("GET", "/ulm/v1/loaded-models", "Models", "ListLoadedModels", summary="The models this server serves"),
]


def error_schema() -> dict[str, Any]:
    """The body of every error answer."""
    detail = {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
              "required": ["code", "message"], "additionalProperties": False}
    return {"type": "object", "properties": {"error": detail}, "required": ["error"], "additionalProperties": False}


def json_text(ref: str) -> dict[str, Any]:
    """A string holding JSON of the schema `ref` (as an SSE event's data)."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": ref}}


def sse_events(data: dict[str, Any], description: str) -> dict[str, Any]:
    """A Server-Sent Events answer's itemSchema (OpenAPI 3.2's: one event, {data, event, id, retry}; Schemathesis
    checks every event by it): `data` for its events, an Error as JSON for an event named `error`. (A "schema"
    beside an itemSchema would describe the whole stream, as an array of events, so there is none.)"""
    return {"type": "object", "description": description, "required": ["data"],
            "if": {"properties": {"event": {"const": "error"}}, "required": ["event"]},
            "then": {"properties": {"data": json_text(REF + ERROR)}}, "else": {"properties": {"data": data}}}


def error_responses() -> dict[int | str, Any]:
    return {"4XX": {"description": "The request was refused (the gRPC status's code and message)",
                    "content": {"application/json": {"schema": {"$ref": REF + ERROR}}}},
            "5XX": {"description": "The server could not answer (draining, an internal error)",
                    "content": {"application/json": {"schema": {"$ref": REF + ERROR}}}}}


def openapi_of(route: Route, schemas: Schemas) -> tuple[dict[str, Any], dict[int | str, Any]]:
    """The route's OpenAPI pieces: (openapi_extra: its parameters and request body, responses)."""
    request = route.method.input_type
    params = [{"name": p, "in": "path", "required": True, "schema": NAME_SCHEMA} for p in route.path_params]
    params += [{"name": q, "in": "query", "required": False,
                "schema": schemas.field(request.fields_by_name[q], request=True)} for q in route.query]
    extra: dict[str, Any] = {"parameters": params} if params else {}
    if route.body_fields:
        taken = frozenset(f.name for f in request.fields) - set(route.body_fields)
        body = schemas.object(request, True, exclude=taken)
        extra["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    answer = schemas.message(route.method.output_type, request=False)
    if route.streaming:
        name = answer["$ref"].removeprefix(REF)
        content = {"text/event-stream": {"itemSchema": sse_events(json_text(answer["$ref"]), (
            f"Server-Sent Events: each event's data is one {name} as JSON; an error after the first event "
            f"ends the stream with an event named `error` whose data is an {ERROR}"))}}
    else:
        content = {"application/json": {"schema": answer}}
    return extra, {200: {"description": "OK", "content": content}, **error_responses()}
