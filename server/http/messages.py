"""Proto messages to and from JSON, by the proto3 JSON mapping with the proto's own field names.

Requests: ParseDict of the JSON body, with the path's and the query's fields set over it; an unknown field, a
value of the wrong type or out of range is INVALID_ARGUMENT naming the field (ParseDict's message names it).
Responses: MessageToDict (preserving_proto_field_name; every field without presence printed, at its default
value too; 64-bit integers are strings, enums their names). A servicer may answer bytes (a large message it
serialized in a thread, e.g. Tokenize of a long text); such an answer is parsed and converted in a thread too.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from server.errors import InvalidArgument

QUERY_TRUE, QUERY_FALSE = ("true", "1", "yes"), ("false", "0", "no")


def message_class(descriptor: Descriptor) -> type[Message]:
    return GetMessageClass(descriptor)


def parse(cls: type[Message], fields: dict[str, Any]) -> Message:
    """The message of a JSON object; InvalidArgument naming the field when it is not one."""
    message = cls()
    try:
        json_format.ParseDict(fields, message)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise InvalidArgument(f"request body: {e}".replace("\n", " ")) from None
    return message


def query_fields(descriptor: Descriptor, query: dict[str, str]) -> dict[str, Any]:
    """Query parameters as JSON values of the message's fields (a bool from true/false/1/0; the rest as strings,
    which the proto3 JSON mapping accepts for numbers and enums)."""
    out: dict[str, Any] = {}
    for key, value in query.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            raise InvalidArgument(f"{key}: not a query parameter of this route (known: "
                                  f"{', '.join(descriptor.fields_by_name)})")
        if field.type == FieldDescriptor.TYPE_BOOL:
            if value.lower() not in QUERY_TRUE + QUERY_FALSE:
                raise InvalidArgument(f"{key}: expected true or false, got {value!r}")
            out[key] = value.lower() in QUERY_TRUE
        else:
            out[key] = value
    return out


def to_dict(message: Message) -> dict[str, Any]:
    """Every field that has no presence is printed, at its default value too (an empty list is [], a zero 0): an
    answer always has the same keys. Unset messages and optional fields are left out."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def to_json(message: Message) -> str:
    """Compact JSON (json.dumps escapes every control character, so it is always one line: one SSE data line)."""
    return json.dumps(to_dict(message), ensure_ascii=False, separators=(",", ":"))


async def answer_json(cls: type[Message], answer: Message | bytes) -> str:
    """A servicer's answer as JSON; a serialized one (it is large) is parsed and converted in a thread."""
    if isinstance(answer, bytes):
        return await asyncio.to_thread(lambda: to_json(cls.FromString(answer)))
    return to_json(answer)
