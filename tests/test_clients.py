"""`python -m clients` against a real server on a loopback port."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import grpc
import pytest
from server_fixture import CONTEXT, ROOT, InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with InProcessServer(["--checkpoint", str(checkpoint)]) as s:
        yield s


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def server_text(target: str, **request) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        return "".join(m.text for m in stub.Generate(pb.GenerateRequest(**request)))


def test_generate_streams_the_completion(server):
    r = cli("generate", "Once upon", "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "40",
            "--top-p", "0.95", "--seed", "3", "--target", server.target, "-v")
    assert r.returncode == 0, r.stderr
    expected = server_text(server.target, prompt="Once upon", max_new_tokens=40, temperature=0.8, top_k=40,
                           top_p=0.95, seed=3)
    assert r.stdout == expected + "\n"
    assert "finish: length" in r.stderr and "completion 40 tokens" in r.stderr


def test_generate_with_stop(server):
    full = server_text(server.target, prompt="Hi", max_new_tokens=60, temperature=1.0, seed=6)
    assert len(full) >= 8, f"this seed's completion is too short to cut: {full!r}"
    stop = full[len(full) // 2:][:2]
    r = cli("generate", "Hi", "--max-new-tokens", "60", "--temperature", "1", "--seed", "6", "--stop", stop,
            "--stop", "unlikely", "--target", server.target, "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout == full[:full.index(stop)] + "\n"
    assert "finish: stop" in r.stderr


def test_info_and_tokenize(server, checkpoint):
    r = cli("info", "--target", server.target)
    assert r.returncode == 0, r.stderr
    info = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert info["name"] == checkpoint.name and info["context_length"] == str(CONTEXT)
    assert info["backend"] == "torch" and info["vocab_size"] == "259"
    r = cli("tokenize", "héllo ✓", "--target", server.target)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == Tokenizer.load(checkpoint).encode("héllo ✓")
    assert len(out["tokens"]) == len(out["token_ids"])


def test_errors_print_the_status(server):
    r = cli("generate", "x", "--model", "missing", "--target", server.target)
    assert r.returncode == 1 and "error: NOT_FOUND" in r.stderr
    r = cli("generate", "x", "--top-p", "2", "--target", server.target)
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "top_p" in r.stderr
    r = cli("info", "--target", "127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 1 and "error: UNAVAILABLE" in r.stderr


def test_bench_prints_the_batching_ratio(server):
    r = cli("bench", "--streams", "8", "--max-new-tokens", "16", "--target", server.target)
    assert r.returncode == 0, r.stderr
    m = re.search(r"batching ratio .* = ([\d.]+)", r.stdout)
    assert m and 0 < float(m.group(1)) < 1, r.stdout
