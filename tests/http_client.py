"""Client-side helpers for the HTTP face's tests: Server-Sent Events read off an httpx response, and gRPC
answers as the JSON the HTTP face gives for them."""
from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
from google.protobuf.json_format import MessageToDict


def sse(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event name, JSON data) of each event of a text/event-stream response, as they arrive."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def as_json(message) -> dict:
    """A proto message as the HTTP face prints it."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    try:
        result = call(*args, timeout=30, **kwargs)
        if hasattr(result, "__iter__"):
            list(result)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the gRPC call succeeded")


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    """(HTTP status, code, message) of an error answer."""
    body = response.json()
    assert set(body) == {"error"}, body
    return response.status_code, body["error"]["code"], body["error"]["message"]


class OpenApi:
    """Checks answers against the server's own OpenAPI document (its components: the proto messages' schemas)."""

    def __init__(self, doc: dict):
        self.doc = doc

    def component(self, name: str, value) -> None:
        """`value` conforms to #/components/schemas/<name> (AssertionError naming what does not)."""
        import jsonschema_rs  # schemathesis's validator

        schema = {"components": self.doc["components"], "$ref": f"#/components/schemas/{name}"}
        errors = [f"{e.instance_path}: {e.message}" for e in jsonschema_rs.validator_for(schema).iter_errors(value)]
        assert not errors, (name, errors, value)

    def answer(self, verb: str, path: str, response: httpx.Response) -> dict:
        """The JSON of a 200 answer of the route `verb path` (the template), checked against its schema."""
        assert response.status_code == 200, response.text
        schema = self.doc["paths"][path][verb.lower()]["responses"]["200"]["content"]["application/json"]["schema"]
        self.component(schema["$ref"].removeprefix("#/components/schemas/"), body := response.json())
        return body
