"""The model in its own process (server/model_process.py) and what the server sizes by the model: several tokens
per message for a fast model (--stream-interval), slots by KV cache size (--max-batch 0), one thread for a tiny
model; a model process that dies fails its streams, not the server, and another takes its place."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types

import grpc
import pytest
from server_fixture import ROOT, InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.backends.base import model_threads
from server.model_catalog import auto_max_batch
from ulm.checkpoint import load_checkpoint
from ulm.config import GPT_PRESETS
from ulm.generate import generate_ids

PROMPT, NEW = "Once upon a time", 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


def stream(target: str, **fields) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(target) as channel:
        request = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW, **fields)
        return list(pb_grpc.TextGenerationStub(channel).Generate(request, timeout=60))


def test_a_fast_model_gets_several_tokens_per_message_and_the_same_stream(checkpoint):
    """A toy model decodes a token in well under a millisecond, so a pass runs several steps and each message
    carries that pass's tokens; with --stream-interval 1 a pass is one step. Both streams are in-process
    generation's tokens and text."""
    with InProcessServer(["--checkpoint", str(checkpoint)]) as s:
        several = stream(s.target)
        slots = s.engine.backend.max_batch
    with InProcessServer(["--checkpoint", str(checkpoint), "--stream-interval", "1"]) as s:
        one = stream(s.target)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    expected = generate_ids(model, tokenizer.encode(PROMPT), NEW, eos_id=tokenizer.eos_id)
    for msgs in (several, one):
        assert [t for m in msgs for t in m.token_ids] == expected
        assert "".join(m.text for m in msgs) == tokenizer.decode(expected)
    assert len(several) < len(one) and max(len(m.token_ids) for m in several) > 1
    assert slots == 64  # --max-batch 0: a toy model's KV cache is small (auto_max_batch)


def test_slots_are_sized_by_the_kv_cache_budget():
    assert auto_max_batch(GPT_PRESETS["toy"] | {"block_size": 128}) == 64  # the most: 64
    assert auto_max_batch(GPT_PRESETS["gpt2-small"]) == 35  # 72 MiB a slot in 2.5 GiB
    assert auto_max_batch(GPT_PRESETS["gpt-250m"]) == 20
    assert auto_max_batch({"n_layer": "x"}) == 64  # a damaged config: loading it says what is wrong


def test_a_tiny_model_runs_on_one_thread_unless_told(checkpoint):
    tiny = types.SimpleNamespace(torch_threads=None, num_params=120_000)
    larger = types.SimpleNamespace(torch_threads=None, num_params=2_000_000)
    onnx = types.SimpleNamespace(torch_threads=1, num_params=124_000_000)
    assert [model_threads(b, 0) for b in (tiny, larger, onnx)] == [1, None, 1]  # None: one per core jobs leave
    assert [model_threads(b, 3) for b in (tiny, larger, onnx)] == [3, 3, 1]


def test_a_bad_stream_interval_is_one_line_and_exit_2(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", "0",
                           "--stream-interval", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "--stream-interval must be >= 1, got 0" in errors[0], proc.stderr


def test_a_killed_model_process_fails_its_streams_and_another_takes_over(checkpoint):
    with InProcessServer(["--checkpoint", str(checkpoint), "--stream-interval", "1"]) as s:
        first, failed = threading.Event(), {}

        def long_stream():
            try:
                with grpc.insecure_channel(s.target) as channel:
                    request = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=4000)
                    for _ in pb_grpc.TextGenerationStub(channel).Generate(request, timeout=60):
                        first.set()
            except grpc.RpcError as e:
                failed.update(code=e.code(), details=e.details())

        reader = threading.Thread(target=long_stream)
        reader.start()
        assert first.wait(30)
        killed = s.engine.runner.process.pid
        os.kill(killed, signal.SIGKILL)
        reader.join(30)
        assert failed["code"] == grpc.StatusCode.INTERNAL and "model process ended" in failed["details"]
        with grpc.insecure_channel(s.target) as channel:  # the server answers, and a new model process serves
            stub = pb_grpc.TextGenerationStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).max_batch == 64
            # sent while the new process may still be starting: it waits for it rather than failing
            served = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=NEW), timeout=30))
        model, tokenizer, _ = load_checkpoint(checkpoint)
        assert [t for m in served for t in m.token_ids] == generate_ids(model, tokenizer.encode(PROMPT), NEW,
                                                                       eos_id=tokenizer.eos_id)
        assert s.engine.runner.process.pid != killed


def test_requests_held_for_a_replacement_that_cannot_load_fail_with_the_reason(checkpoint, tmp_path):
    """The checkpoint is gone when the model process dies: the replacement fails to load, and a request sent then
    ends with INTERNAL saying so instead of waiting for ever; the server still answers."""
    import shutil

    own = tmp_path / "toy"
    shutil.copytree(checkpoint, own)
    with InProcessServer(["--checkpoint", str(own)]) as s:
        assert len(stream(s.target)) > 0
        shutil.rmtree(own)
        os.kill(s.engine.runner.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not s.engine.runner.ended and time.monotonic() < deadline:  # a request sent before the server sees
            time.sleep(0.01)  # the end goes to the dead process and fails as the streams in flight do
        with pytest.raises(grpc.RpcError) as failed:
            stream(s.target)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "failed to load" in failed.value.details()
        with grpc.insecure_channel(s.target) as channel:
            assert pb_grpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).max_batch
