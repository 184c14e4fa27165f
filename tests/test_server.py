"""The gRPC server against a real toy checkpoint on loopback ports: streaming, batching, sampling, errors,
cancellation, draining, health, reflection, metrics, memory."""
from __future__ import annotations

import asyncio
import gc
import re
import statistics
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_fixture import CONTEXT, LONG, InProcessServer, SubprocessServer, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.__main__ import build_app, build_parser
from server.detokenize import IncrementalDetokenizer, StopMatcher, TextStream
from ulm.checkpoint import load_checkpoint
from ulm.generate import SamplingParams, generate_ids
from ulm.tokenizer import byte_level, char_level

pytestmark = pytest.mark.usefixtures("single_thread")  # in-process reference generation of a tiny model
SERVICE = "ulm.v1.TextGeneration"
GENERATE = f"{SERVICE}/Generate"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint):
    with InProcessServer(["--checkpoint", str(checkpoint), "--max-batch", "32", "--max-queue", "64"]) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TextGenerationStub(channel)


def collect(stub, **request) -> tuple[list[str], list[int], list[pb.GenerateResponse]]:
    messages = list(stub.Generate(pb.GenerateRequest(**request), timeout=30))
    return [m.text for m in messages], [t for m in messages for t in m.token_ids], messages


def reference_ids(reference, prompt: str, max_new_tokens: int, **params) -> list[int]:
    model, tok = reference
    return generate_ids(model, tok.encode(prompt), max_new_tokens, SamplingParams(**params), tok.eos_id)


def check_stream(messages: list[pb.GenerateResponse]) -> None:
    """Only the last message finishes, and it carries the usage."""
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert messages[-1].usage.completion_tokens == sum(len(m.token_ids) for m in messages)


async def stream_async(stub, request: pb.GenerateRequest) -> tuple[float, list[int], str]:
    t0 = time.perf_counter()
    ids, text = [], []
    async for m in stub.Generate(request, timeout=60):
        ids += m.token_ids
        text.append(m.text)
    return time.perf_counter() - t0, ids, "".join(text)


# ----------------------------------------------------------------------------------------------------------
# Incremental detokenization and stop strings (units of the server)


def stream_text(tokenizer, ids: list[int], stops: list[str]) -> tuple[list[str], bool]:
    s = TextStream(tokenizer, stops)
    out = []
    for i in ids:
        text, stopped = s.push(i)
        out.append(text)
        if stopped:
            return out, True
    text, stopped = s.flush()
    return out + [text], stopped


@pytest.mark.parametrize("tokenizer", [byte_level(), char_level("abc hélo")], ids=["byte", "char"])
def test_detokenizer_never_splits_characters(tokenizer):
    text = "héllo wörld ✓ 😀 done"
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    pieces, _ = stream_text(tokenizer, ids, [])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # invalid UTF-8 (a lone lead byte, a truncated 4-byte character at the end) decodes as a full decode does
    bad = tokenizer.encode("a", add_bos=False) + byte_ids(tokenizer, b"\xc3") + tokenizer.encode("b", add_bos=False) \
        + byte_ids(tokenizer, "😀".encode()[:3])
    pieces, _ = stream_text(tokenizer, bad, [])
    assert "".join(pieces) == tokenizer.decode(bad)


def byte_ids(tokenizer, data: bytes) -> list[int]:
    if tokenizer.kind == "byte":  # byte b is token b
        return list(data)
    return [tokenizer.token_to_id(f"<0x{b:02X}>") for b in data]


def test_stop_strings_across_token_boundaries():
    tok = byte_level()
    text = "one two ✓ three END four"
    ids = tok.encode(text, add_bos=False)
    for stops, expected in [(["END"], "one two ✓ three "), (["✓ t"], "one two "), (["zz", "two"], "one "),
                            (["three", "e t"], "on"), (["nope"], text)]:
        pieces, stopped = stream_text(tok, ids, stops)
        assert "".join(pieces) == expected, stops
        assert stopped == (expected != text)
        for stop in stops:  # no piece ever showed any part of a stop string that then matched
            assert stop not in "".join(pieces)
    # text that only looks like the start of a stop string is held back, then released
    m = StopMatcher(["abc"])
    assert m.push("xab") == ("x", False)
    assert m.push("d") == ("abd", False)
    assert m.push("ab", final=True) == ("ab", False)


def test_detokenizer_flush_keeps_incomplete_tail():
    tok = byte_level()
    d = IncrementalDetokenizer(tok)
    assert d.push(0xE2) == "" and d.push(0x9C) == ""
    assert d.flush() == tok.decode([0xE2, 0x9C]) == "\ufffd"


# ----------------------------------------------------------------------------------------------------------
# The running server


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()
        service = DescriptorPool(db).FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} == {"Generate", "Tokenize", "GetModelInfo"}
        assert service.methods_by_name["Generate"].output_type.full_name == "ulm.v1.GenerateResponse"


def test_startup_objects_are_frozen_out_of_the_collector(server):
    # a full collection over them would stall every stream (~150 ms for a GPT-2-small server); new garbage is
    # still collected
    assert gc.get_freeze_count() > 10_000
    before = gc.get_freeze_count()
    gc.disable()  # the server's threads allocate too: an automatic collection could take the cycle first
    try:
        gc.collect()
        cycle = []
        cycle.append(cycle)
        del cycle  # unreachable now, but for the collector
        # the collection thaws nothing (a frozen object may still die by reference counting, as any object may)
        assert gc.collect() >= 1 and before - 1000 < gc.get_freeze_count() <= before
    finally:
        gc.enable()


def test_model_info_and_tokenize(stub, reference, checkpoint):
    model, tok = reference
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.vocab_size, info.context_length) == (checkpoint.name, 259, CONTEXT)
    assert info.parameter_count == model.num_params()
    assert (info.backend, info.device, info.dtype, info.max_batch) == ("torch", "cpu", "float32", 32)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(model=checkpoint.name)).name == checkpoint.name
    r = stub.Tokenize(pb.TokenizeRequest(text="héllo ✓"))
    assert list(r.token_ids) == tok.encode("héllo ✓")
    assert len(r.tokens) == len(r.token_ids) and r.tokens[0] == "<|bos|>"


@pytest.mark.parametrize("prompt", ["Hello", "héllo wörld ✓", "x" * 200])
def test_greedy_stream_equals_in_process_generation(stub, reference, prompt):
    texts, ids, messages = collect(stub, prompt=prompt, max_new_tokens=48)
    ref = reference_ids(reference, prompt, 48)
    assert ids == ref
    assert "".join(texts) == reference[1].decode(ref)
    check_stream(messages)
    last = messages[-1]
    assert last.finish_reason == (pb.FINISH_REASON_EOS if ref[-1] == reference[1].eos_id else pb.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens == len(reference[1].encode(prompt))


def test_seeded_sampling_equals_in_process_generation(stub, reference):
    params = dict(temperature=1.5, top_k=100, top_p=0.95, seed=1234)
    texts, ids, messages = collect(stub, prompt="Once", max_new_tokens=64, **params)
    ref = reference_ids(reference, "Once", 64, **params)
    assert ids == ref
    assert len(set(ids)) > 10  # really sampled
    # random bytes include broken UTF-8: the stream still adds up to a full decode
    assert "".join(texts) == reference[1].decode(ids)
    check_stream(messages)


def test_a_tiny_temperature_streams_the_greedy_text(stub, reference):
    """1e-45 overflowed the logits to inf: the server answered OK with empty text."""
    greedy = reference_ids(reference, "Tiny", 24)
    for temperature in (1e-45, 1e-38):
        _, ids, messages = collect(stub, prompt="Tiny", max_new_tokens=24, temperature=temperature, seed=1)
        assert ids == greedy and messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_generation_runs_past_the_context_as_in_process(server, stub, reference):
    """max_new_tokens 0 is the server's default (128), which this prompt only has room for by sliding its window:
    the stream equals in-process generation, which slides it alike."""
    prompt = "y" * (CONTEXT - 11)
    before = server.metric("ulm_context_slides_total")
    _, ids, messages = collect(stub, prompt=prompt, max_new_tokens=0)
    assert ids == reference_ids(reference, prompt, 128)
    assert len(ids) == 128 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.metric("ulm_context_slides_total") == before + 1  # 502 + 128 tokens: one slide to 256 + 118


def test_stop_sequence_over_the_wire(stub, reference):
    params = dict(prompt="Stop", max_new_tokens=80, temperature=1.0, seed=7)
    full_texts, full_ids, _ = collect(stub, **params)
    full = "".join(full_texts)
    stop = full[20:23]  # three byte tokens, so the match spans token boundaries
    texts, ids, messages = collect(stub, stop=["never-generated", stop], **params)
    assert "".join(texts) == full[:full.index(stop)]
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP
    assert ids == full_ids[:len(ids)] and len(ids) < len(full_ids)
    check_stream(messages)


def test_concurrent_streams_are_batched_and_correct(server, reference):
    n, new = 32, 64
    prompts = [f"request {i}: " for i in range(n)]
    params = [dict(temperature=0.0) if i % 2 else dict(temperature=0.9, top_k=50, seed=i) for i in range(n)]
    sizes = []

    async def run():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            one = pb.GenerateRequest(prompt=prompts[0], max_new_tokens=new)
            await stream_async(stub, one)  # warm up the channel
            single = statistics.median([(await stream_async(stub, one))[0] for _ in range(3)])
            sizes.extend([server.metric("ulm_decode_batch_size_sum"), server.metric("ulm_decode_batch_size_count")])
            t0 = time.perf_counter()
            results = await asyncio.gather(*(stream_async(stub, pb.GenerateRequest(
                prompt=p, max_new_tokens=new, **kw)) for p, kw in zip(prompts, params)))
            return single, time.perf_counter() - t0, results

    single, wall, results = asyncio.run(run())
    for prompt, kw, (_, ids, text) in zip(prompts, params, results):
        assert ids == reference_ids(reference, prompt, new, **kw)
        assert text == reference[1].decode(ids)
    ratio = wall / (n * single)
    mean_batch = (server.metric("ulm_decode_batch_size_sum") - sizes[0]) / (
        server.metric("ulm_decode_batch_size_count") - sizes[1])
    print(f"\n{n} streams x {new} tokens: {wall * 1e3:.0f} ms; one stream {single * 1e3:.1f} ms "
          f"({single / new * 1e3:.2f} ms/token); ratio wall({n}) / ({n} x wall(1)) = {ratio:.3f}; "
          f"mean decode batch {mean_batch:.1f}")
    assert ratio < 0.5
    assert mean_batch > 8


def test_streams_ending_at_different_steps_of_a_batch_equal_their_runs_alone(server, stub, reference):
    """A stop string and max_new_tokens end streams while the rest of the batch goes on (and the next decode step
    is already queued), and one stream's window slides past the context: each stream equals its run alone and
    in-process generation."""
    sampled = dict(prompt="Batch stop", max_new_tokens=60, temperature=1.0, top_k=40, seed=11)
    full_texts, full_ids, _ = collect(stub, **sampled)
    full = "".join(full_texts)
    stopping = dict(sampled, stop=[full[15:18]])
    alone_texts, alone_ids, _ = collect(stub, **stopping)
    others = [dict(prompt=f"other {i}", max_new_tokens=n, temperature=0.9 * (i % 2), seed=i)
              for i, n in enumerate([1, 2, 3, 9, 31, 64])]
    others.append(dict(prompt="y" * (CONTEXT - 11), max_new_tokens=40, temperature=0.8, seed=9))  # slides after 10

    async def run():
        async with grpc.aio.insecure_channel(server.target) as channel:
            s = pb_grpc.TextGenerationStub(channel)
            return await asyncio.gather(*(stream_async(s, pb.GenerateRequest(**r)) for r in [stopping, *others]))

    (_, ids, text), *rest = asyncio.run(run())
    assert (ids, text) == (alone_ids, "".join(alone_texts))
    assert text == full[:full.index(full[15:18])] and ids == full_ids[:len(ids)] and len(ids) < len(full_ids)
    for r, (_, ids, text) in zip(others, rest):
        params = {k: v for k, v in r.items() if k not in ("prompt", "max_new_tokens")}
        assert ids == reference_ids(reference, r["prompt"], r["max_new_tokens"], **params), r
        assert text == reference[1].decode(ids)


def test_same_seed_same_output_under_load(server, stub):
    req = dict(prompt="Seeded", max_new_tokens=48, temperature=1.0, top_p=0.9, seed=42)
    _, alone, _ = collect(stub, **req)

    async def run():
        async with grpc.aio.insecure_channel(server.target) as channel:
            s = pb_grpc.TextGenerationStub(channel)
            noise = [pb.GenerateRequest(prompt=f"noise {i}", max_new_tokens=40 + i, temperature=1.0, seed=i)
                     for i in range(12)]
            same = [pb.GenerateRequest(**req) for _ in range(3)]
            others = [pb.GenerateRequest(**{**req, "seed": 100 + i}) for i in range(3)]
            return await asyncio.gather(*(stream_async(s, r) for r in noise + same + others))

    results = [ids for _, ids, _ in asyncio.run(run())]
    assert all(ids == alone for ids in results[12:15])
    assert all(ids != alone for ids in results[15:])
    assert len({tuple(ids) for ids in results[15:]}) == 3


BAD_REQUESTS = [
    (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(top_p=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[1]"),
    (dict(stop=["s"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(max_new_tokens=4097), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(prompt="z" * CONTEXT), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
]


def test_bad_requests_get_their_codes_and_the_server_keeps_serving(server, stub):
    before = server.metric("ulm_requests_total", method=GENERATE, code="INVALID_ARGUMENT")
    for fields, code, word in BAD_REQUESTS:
        request = {"prompt": "hi", "max_new_tokens": 4, **fields}
        with pytest.raises(grpc.RpcError) as e:
            collect(stub, **request)
        assert e.value.code() == code, fields
        assert word in e.value.details(), (fields, e.value.details())
    for call, request in [(stub.Tokenize, pb.TokenizeRequest(model="x", text="a")),
                          (stub.GetModelInfo, pb.GetModelInfoRequest(model="x"))]:
        with pytest.raises(grpc.RpcError) as e:
            call(request)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.metric("ulm_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == before + 8
    _, ids, messages = collect(stub, prompt="still alive", max_new_tokens=5)
    assert len(ids) == 5 and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--default-max-new-tokens", "200", "--max-new-tokens", "100"], "--default-max-new-tokens (200) exceeds"),
])
def test_bad_generation_flags_are_refused_at_start(checkpoint, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_app(build_parser().parse_args(["--checkpoint", str(checkpoint), *flags]))


def test_requests_join_and_leave_a_running_batch(server, stub, reference):
    """A short request finishes while a long one runs; a bad one and a cancelled one leave it untouched."""
    long = stub.Generate(pb.GenerateRequest(prompt="long", max_new_tokens=300), timeout=60)
    first = next(long)
    _, ids, _ = collect(stub, prompt="short", max_new_tokens=5)
    assert ids == reference_ids(reference, "short", 5)
    assert server.scheduler.busy_slots == 1  # the long one is still going
    with pytest.raises(grpc.RpcError):
        collect(stub, prompt="bad", max_new_tokens=4, top_p=-1.0)
    other = stub.Generate(pb.GenerateRequest(prompt="other", max_new_tokens=300))
    next(other)
    other.cancel()
    rest = list(long)
    assert [*first.token_ids, *(t for m in rest for t in m.token_ids)] == reference_ids(reference, "long", 300)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_cancel_mid_stream_frees_the_slot(server, stub):
    finished = server.metric("ulm_finished_requests_total", reason="cancelled")
    tokens = server.metric("ulm_generated_tokens_total")
    call = stub.Generate(pb.GenerateRequest(prompt="cancel me", max_new_tokens=LONG))
    for _, _ in zip(call, range(3)):
        pass
    assert server.scheduler.busy_slots == 1
    call.cancel()
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=2)
    assert server.metric("ulm_finished_requests_total", reason="cancelled") == finished + 1
    assert server.metric("ulm_generated_tokens_total") - tokens < LONG  # it stopped generating
    assert server.metric("ulm_running_requests") == 0


def test_deadline_expiry_frees_the_slot(server, stub):
    finished = server.metric("ulm_finished_requests_total", reason="deadline")
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt="slow", max_new_tokens=LONG), timeout=0.1))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - t0 < 1.0
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=2)
    assert server.metric("ulm_finished_requests_total", reason="deadline") == finished + 1


def test_metrics_endpoint(server):
    body = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for name in ("ulm_requests_total", "ulm_queue_depth", "ulm_running_requests",
                 "ulm_time_to_first_token_seconds_bucket", "ulm_inter_token_latency_seconds_bucket",
                 "ulm_generated_tokens_total"):
        assert name in body
    assert f'ulm_requests_total{{code="OK",method="{GENERATE}"}}' in body
    assert server.metric("ulm_generated_tokens_total") > 100
    ttft = server.metric("ulm_time_to_first_token_seconds_sum") / server.metric("ulm_time_to_first_token_seconds_count")
    itl = server.metric("ulm_inter_token_latency_seconds_sum") / server.metric("ulm_inter_token_latency_seconds_count")
    print(f"\nserver-side mean TTFT {ttft * 1e3:.2f} ms, mean inter-token latency {itl * 1e3:.2f} ms")
    assert 0 < itl < 1 and 0 < ttft < 5


def test_full_queue_is_refused_at_once(checkpoint):
    with InProcessServer(["--checkpoint", str(checkpoint), "--max-batch", "1", "--max-queue", "1"]) as server:
        codes, times = [], []

        async def one(stub, i):
            t0 = time.perf_counter()
            try:
                _, ids, _ = await stream_async(stub, pb.GenerateRequest(prompt=f"q{i}", max_new_tokens=200))
                codes.append(len(ids) == 200 and grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
                times.append(time.perf_counter() - t0)

        async def run():
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.TextGenerationStub(channel)
                await asyncio.gather(*(one(stub, i) for i in range(6)))

        asyncio.run(run())
        assert codes.count(grpc.StatusCode.OK) >= 2  # one running, one queued
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert max(times) < 0.5  # refused at once, not after waiting
        with grpc.insecure_channel(server.target) as channel:  # and it keeps serving
            _, ids, _ = collect(pb_grpc.TextGenerationStub(channel), prompt="after", max_new_tokens=3)
        assert len(ids) == 3


# ----------------------------------------------------------------------------------------------------------
# `python -m server` as a process


@pytest.fixture(scope="module")
def process(checkpoint):
    """One `python -m server` for the tests below; the SIGTERM test, last in this file, ends it."""
    server = SubprocessServer(["--checkpoint", str(checkpoint), "--grace", "20"])
    yield server
    server.close()


def test_memory_stays_flat_over_500_requests(process):
    proc = psutil.Process(process.proc.pid)
    with grpc.insecure_channel(process.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        rss = []
        for i in range(500):
            collect(stub, prompt=f"request {i}", max_new_tokens=4, temperature=1.0, stop=["\n"])
            if i in (99, 499):
                rss.append(proc.memory_info().rss)
    growth = (rss[1] - rss[0]) / 2**20
    print(f"\nserver RSS {rss[0] / 2**20:.1f} MiB after 100 requests, {rss[1] / 2**20:.1f} MiB after 500")
    assert growth < 8, f"RSS grew {growth:.1f} MiB over 400 requests"


def test_sigterm_drains_in_flight_streams_and_exits_0(process):
    new = 300
    with grpc.insecure_channel(process.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        calls = [stub.Generate(pb.GenerateRequest(prompt=f"drain {i}", max_new_tokens=new)) for i in range(4)]
        firsts = [next(c) for c in calls]  # all four are running
        results = [None] * 4

        def finish(i):
            msgs = [firsts[i], *calls[i]]
            results[i] = (sum(len(m.token_ids) for m in msgs), msgs[-1].finish_reason)

        readers = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
        for t in readers:
            t.start()
        process.terminate()
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelInfo(pb.GetModelInfoRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(r is None for r in results)  # the streams were still running
        for t in readers:
            t.join(20)
    assert results == [(new, pb.FINISH_REASON_LENGTH)] * 4
    assert process.proc.wait(20) == 0, "".join(process.log)
