"""JSON Schemas of proto messages, by the proto3 JSON mapping, for the OpenAPI document.

Each message becomes a component (#/components/schemas/<full name>), closed (additionalProperties: false; the
API refuses an unknown field), its fields under the proto's names. Answers and requests differ where the mapping
lets a parser accept more than a printer writes, so a message has a schema per direction (a request's components
end in ".Input"): a 64-bit integer is printed as a decimal string but parsed from a string or a number; an enum
is printed as its name but parsed from its name or number; a float may be "NaN", "Infinity" or "-Infinity" both
ways. An answer carries every field without presence (at its default value too), so those are required there;
a request may leave out any field.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.data_root import MAX_NAME

F = FieldDescriptor
REF = "#/components/schemas/"
INT_RANGES = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
              F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
              F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1),
              F.TYPE_SFIXED64: (-2**63, 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1)}
WIDE = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64, F.TYPE_UINT64, F.TYPE_FIXED64}
FLOAT_MAX = 3.4028234663852886e38
NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
NAME_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": MAX_NAME}


class Schemas:
    """The components made so far; message() returns a $ref to one, making it (and what it refers to) first."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def message(self, descriptor: Descriptor, request: bool) -> dict[str, Any]:
        name = descriptor.full_name + (".Input" if request else "")
        if name not in self.components:
            self.components[name] = {}  # claimed first: a message that contains itself refers to its own name
            self.components[name] = self.object(descriptor, request)
        return {"$ref": REF + name}

    def object(self, descriptor: Descriptor, request: bool, exclude: frozenset[str] = frozenset()
               ) -> dict[str, Any]:
        """The schema of a message itself (inline), without the fields in `exclude` (a route fills them)."""
        properties = {f.name: self.field(f, request) for f in descriptor.fields if f.name not in exclude}
        schema: dict[str, Any] = {"type": "object", "title": descriptor.name, "properties": properties,
                                  "additionalProperties": False}
        if not request:  # an answer prints every field without presence (server/http/messages.py: to_dict)
            if required := [f.name for f in descriptor.fields if not f.has_presence and f.name in properties]:
                schema["required"] = required
        oneofs = [o for o in descriptor.oneofs if len(o.fields) > 1]  # a proto3 `optional` is a oneof of one
        if oneofs:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.name for f in o.fields)}" for o in oneofs)
        return schema

    def field(self, field: FieldDescriptor, request: bool) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]  # the keys are strings in JSON, whatever their type
            return {"type": "object", "additionalProperties": self.single(value, request)}
        one = self.single(field, request)
        return {"type": "array", "items": one} if field.is_repeated else one

    def single(self, field: FieldDescriptor, request: bool) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message(field.message_type, request)
        if field.enum_type is not None:
            names = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
            if not request:
                return names
            return {"anyOf": [names, {"type": "integer", "enum": [v.number for v in field.enum_type.values]}]}
        return scalar(field, request)


def scalar(field: FieldDescriptor, request: bool) -> dict[str, Any]:
    t = field.type
    if t in INT_RANGES:
        low, high = INT_RANGES[t]
        number = {"type": "integer", "minimum": low, "maximum": high}
        if t not in WIDE:
            return number
        decimal = {"type": "string", "pattern": "^-?[0-9]+$" if low < 0 else "^[0-9]+$"}
        return {"anyOf": [decimal, number]} if request else decimal
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        number: dict[str, Any] = {"type": "number"}
        if t == F.TYPE_FLOAT and request:  # a larger one does not fit and is refused
            number.update(minimum=-FLOAT_MAX, maximum=FLOAT_MAX)
        return {"anyOf": [number, NON_FINITE]}
    if t == F.TYPE_BOOL:
        return {"type": "boolean"}
    if t == F.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    return {"type": "string"}
