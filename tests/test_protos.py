"""The API contract in protos/ and the committed stubs generated from it."""
from __future__ import annotations

import subprocess
import sys

from google.protobuf.descriptor import FieldDescriptor as F

from protos.generate import API_DIR, GENERATED_SUFFIXES, ROOT, generate
from protos.ulm.v1 import text_generation_pb2 as pb


def generated_files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in directory.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    generate(tmp_path)
    fresh, committed = generated_files(tmp_path), generated_files(API_DIR)
    assert "ulm/v1/text_generation_pb2_grpc.py" in fresh
    assert fresh.keys() == committed.keys(), "stale stubs: run `python -m protos.generate`"
    for name in fresh:
        assert fresh[name] == committed[name], f"{name} is stale: run `python -m protos.generate`"


def test_stubs_import_without_touching_the_ulm_package():
    code = ("import sys; import protos.ulm.v1.text_generation_pb2_grpc; "
            "print(sorted(m for m in sys.modules if m == 'ulm' or m.startswith('ulm.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import ulm  # the library and the stubs live side by side

    assert ulm.__file__ == str(ROOT / "ulm" / "__init__.py") and hasattr(ulm, "GPT")
    assert pb.__name__ == "protos.ulm.v1.text_generation_pb2" and pb.DESCRIPTOR.package == "ulm.v1"


def fields(message) -> dict[str, tuple[int, bool]]:
    """name -> (type, repeated)"""
    return {f.name: (f.type, f.is_repeated) for f in message.DESCRIPTOR.fields}


def test_api_contract():
    assert pb.DESCRIPTOR.package == "ulm.v1"
    service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
    assert service.full_name == "ulm.v1.TextGeneration"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {"Generate": ("GenerateRequest", "GenerateResponse", True),
                       "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
                       "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False)}
    want = {"model": (F.TYPE_STRING, False), "prompt": (F.TYPE_STRING, False),
            "max_new_tokens": (F.TYPE_UINT32, False), "temperature": (F.TYPE_FLOAT, False),
            "top_k": (F.TYPE_UINT32, False), "top_p": (F.TYPE_FLOAT, False), "seed": (F.TYPE_UINT64, False),
            "stop": (F.TYPE_STRING, True)}
    assert want.items() <= fields(pb.GenerateRequest).items()
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["seed"].has_presence  # `optional`
    assert not pb.GenerateRequest().HasField("seed") and pb.GenerateRequest(seed=0).HasField("seed")
    want = {"text": (F.TYPE_STRING, False), "token_ids": (F.TYPE_UINT32, True), "finish_reason": (F.TYPE_ENUM, False),
            "usage": (F.TYPE_MESSAGE, False)}
    assert want.items() <= fields(pb.GenerateResponse).items()
    assert {"prompt_tokens", "completion_tokens"} <= set(fields(pb.Usage))
    assert dict(pb.FinishReason.items()) == {"FINISH_REASON_UNSPECIFIED": 0, "FINISH_REASON_LENGTH": 1,
                                             "FINISH_REASON_STOP": 2, "FINISH_REASON_EOS": 3}
    assert {"name", "vocab_size", "context_length", "parameter_count", "backend", "device", "dtype"} <= set(
        fields(pb.ModelInfo))
