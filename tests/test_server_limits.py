"""The server under hostile-but-fair requests: huge inputs, undecodable bytes, oversize messages, deadlines.
Every call is counted once with the code the client saw, and none of them stalls the others."""
from __future__ import annotations

import logging
import threading
import time

import grpc
import psutil
import pytest
from server_fixture import CONTEXT, LONG, InProcessServer, SubprocessServer, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from ulm.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
SERVICE = "ulm.v1.TextGeneration"
GENERATE, TOKENIZE = f"{SERVICE}/Generate", f"{SERVICE}/Tokenize"
LIMIT = 2 * 2**20
BIG = 2**20  # a client sends up to this, over --max-request-bytes when asked to
OPTIONS = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with InProcessServer(["--checkpoint", str(checkpoint), "--max-request-bytes", str(LIMIT)]) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, options=OPTIONS) as c:
        yield c


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.TextGenerationStub(channel)


def text_of(n: int) -> str:
    return ("All the world's a stage, and all the men and women merely players. " * (n // 60 + 1))[:n]


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server, stub):
    before = server.metric("ulm_requests_total", method=GENERATE, code="INVALID_ARGUMENT")
    t = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt=text_of(LIMIT - 100), max_new_tokens=1), timeout=30))
    assert time.perf_counter() - t < 1.0  # the toy's byte tokenizer took ~2 s over it
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in e.value.details() and f"context length {CONTEXT}" in e.value.details()
    assert server.metric("ulm_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == before + 1
    prompt = text_of(CONTEXT - 1)  # the longest that fits still does (byte tokens, BOS first)
    assert len(list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=1), timeout=30))) == 1


def test_a_large_tokenize_neither_stalls_other_calls_nor_loses_tokens(server, stub, checkpoint):
    text = text_of(LIMIT - 100)
    result: dict = {}

    def tokenize():
        result["response"] = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=60)
        result["done"] = time.perf_counter()

    worker = threading.Thread(target=tokenize)
    worker.start()
    latencies = []
    while worker.is_alive():
        t = time.perf_counter()
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        latencies.append(time.perf_counter() - t)
    worker.join()
    tokenizer = load_checkpoint(checkpoint)[1]
    ids = tokenizer.encode(text)
    assert list(result["response"].token_ids) == ids  # serialized by the worker process, passed through
    assert list(result["response"].tokens) == tokenizer.token_strings(ids)
    assert len(latencies) > 3 and max(latencies) < 0.5, max(latencies)  # the whole encode held the GIL: seconds


def test_large_texts_are_tokenized_by_the_worker_process_not_the_server(checkpoint):
    # CPU time, not latency: the server process's own share stays small whatever else the machine runs
    server = SubprocessServer(["--checkpoint", str(checkpoint), "--max-request-bytes", str(LIMIT)])
    try:
        with grpc.insecure_channel(server.target, options=OPTIONS) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            prompt = text_of(CONTEXT)[:CONTEXT - 1] + " " * (8192 - CONTEXT)  # over ON_LOOP_CHARS, fits
            assert stub.Tokenize(pb.TokenizeRequest(text=prompt), timeout=60).token_ids  # starts the worker
            proc = psutil.Process(server.proc.pid)
            (worker,) = [c for c in proc.children() if "server.tokenize_worker" in c.cmdline()]  # not the model's
            before = proc.cpu_times(), worker.cpu_times()
            for _ in range(3):
                stub.Tokenize(pb.TokenizeRequest(text=text_of(LIMIT - 100)), timeout=60)
            after = proc.cpu_times(), worker.cpu_times()
    finally:
        server.terminate()
        server.proc.wait(30)
        server.close()
    server_s, worker_s = (sum(a[:2]) - sum(b[:2]) for a, b in zip(after, before))
    print(f"server {server_s:.3f} s, worker {worker_s:.3f} s")
    assert server_s < 0.25 * worker_s, (server_s, worker_s)


def test_a_request_over_the_size_limit_is_refused_and_counted(server, stub):
    before = server.metric("ulm_requests_total", method=TOKENIZE, code="RESOURCE_EXHAUSTED")
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(text="x" * (LIMIT + 1)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-request-bytes" in e.value.details() and str(LIMIT) in e.value.details()
    assert server.metric("ulm_requests_total", method=TOKENIZE, code="RESOURCE_EXHAUSTED") == before + 1


@pytest.mark.parametrize("method", [GENERATE, TOKENIZE])
def test_invalid_utf8_is_invalid_argument_without_a_traceback(server, channel, method, caplog):
    """Field 2 (prompt / text) holding bytes that are not UTF-8: gRPC said UNKNOWN and logged a traceback."""
    raw = b"\x12\x04\xff\xfehi"
    before = server.metric("ulm_requests_total", method=method, code="INVALID_ARGUMENT")
    call = (channel.unary_stream if method == GENERATE else channel.unary_unary)(f"/{method}")
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as e:
        response = call(raw, timeout=10)
        list(response) if method == GENERATE else response
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decoded" in e.value.details() and "\n" not in e.value.details()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert server.metric("ulm_requests_total", method=method, code="INVALID_ARGUMENT") == before + 1


def test_every_expired_call_is_counted_as_a_deadline(server, stub):
    """The client's deadline fires first: its cancellation reached the server just before the server's own
    deadline, and 1-3 calls in 100 were counted CANCELLED."""
    calls = 100
    codes = {c: server.metric("ulm_requests_total", method=GENERATE, code=c)
             for c in ("DEADLINE_EXCEEDED", "CANCELLED")}
    finished = server.metric("ulm_finished_requests_total", reason="deadline")
    seen = []

    def expire(n: int):
        for _ in range(n):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(prompt="slow", max_new_tokens=LONG), timeout=0.05))
            seen.append(e.value.code())

    threads = [threading.Thread(target=expire, args=(calls // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [grpc.StatusCode.DEADLINE_EXCEEDED] * calls
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=5)
    assert server.wait_until(lambda: server.metric("ulm_requests_total", method=GENERATE, code="DEADLINE_EXCEEDED")
                             == codes["DEADLINE_EXCEEDED"] + calls, timeout=5)
    assert server.metric("ulm_requests_total", method=GENERATE, code="CANCELLED") == codes["CANCELLED"]
    assert server.metric("ulm_finished_requests_total", reason="deadline") == finished + calls
