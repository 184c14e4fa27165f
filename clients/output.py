"""How the command-line client prints resources: a line per item, `field: value` for one, JSON with --json."""
from __future__ import annotations

import json
import time

from google.protobuf import json_format
from google.protobuf.message import Message


def print_json(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, ensure_ascii=False))


def print_fields(message: Message, skip: tuple[str, ...] = ()) -> None:
    """One `field: value` line per field (times readable, nested messages on one line)."""
    for field in message.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        value = getattr(message, field.name)
        if field.name.endswith("_at"):
            value = when(value)
        elif field.is_repeated:
            value = json.dumps([json_format.MessageToDict(v, preserving_proto_field_name=True) for v in value]
                               if field.message_type is not None else list(value), ensure_ascii=False)
        elif field.enum_type is not None:
            value = enum_name(field.enum_type.values_by_number[value].name)
        elif field.message_type is not None:
            value = json_format.MessageToJson(value, preserving_proto_field_name=True, indent=None)
        print(f"{field.name}: {value}")


def enum_name(name: str) -> str:
    """JOB_STATE_SUCCEEDED -> SUCCEEDED, MODEL_FORMAT_ONNX -> ONNX (the enum's prefix dropped)."""
    for prefix in ("JOB_KIND_", "JOB_STATE_", "MODEL_FORMAT_"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def compact_json(text: str) -> str:
    """A JSON string field on one line (or as it is, if it is not JSON)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return text
