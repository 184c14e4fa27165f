"""The HTTP face against real servers on loopback ports, checked against the gRPC answers of the same server:
Tokenize, GetModelInfo and greedy/seeded Generate over SSE equal gRPC's; every error code with the gRPC status's
message; uploads (raw and multipart); the auth matrix on every API route of the OpenAPI document; a closed SSE
stream frees its slot; the bounded queue (429, Retry-After); HTTPS; request counting by route and code; SIGTERM
during SSE streams (they finish, new calls get 503, exit 0)."""
from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
import time

import grpc
import httpx
import pytest
from http_client import as_json, error_of, grpc_error, sse
from pipeline_client import upload_requests
from server_fixture import InProcessServer, SubprocessServer, make_toy_checkpoint

from protos.ulm.v1 import files_pb2 as fpb
from protos.ulm.v1 import files_pb2_grpc, jobs_pb2_grpc, models_pb2_grpc
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.auth import INVALID, MISSING
from server.http.routes import ROUTES

pytestmark = pytest.mark.usefixtures("single_thread")  # the servers' tiny model runs in this process
TOKEN = "http-token"
REQUEST_LIMIT = 100_000  # --max-request-bytes: above ON_LOOP_CHARS, so a long Tokenize answers bytes
FILE_LIMIT = 3000  # --max-file-bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(root), "--http-port", "0",
            "--max-request-bytes", str(REQUEST_LIMIT), "--max-file-bytes", str(FILE_LIMIT)]
    with InProcessServer(argv) as s:
        s.root = root
        yield s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


def generate_sse(http: httpx.Client, request: dict) -> list[dict]:
    with http.stream("POST", "/ulm/v1/generate", json=request) as r:
        assert r.status_code == 200, r.read()
        events = list(sse(r))
    assert {name for name, _ in events} == {"message"}, events
    return [data for _, data in events]


# -- answers equal gRPC's -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world", "héllo ✓ 🙂", "x" * 5000])  # the last is tokenized off the loop
def test_tokenize_equals_grpc(http, channel, text):
    r = http.post("/ulm/v1/tokenize", json={"text": text})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == as_json(pb_grpc.TextGenerationStub(channel).Tokenize(pb.TokenizeRequest(text=text)))
    assert len(r.json()["token_ids"]) >= len(text.encode()) // 4


def test_model_info_equals_grpc(http, channel):
    info = pb_grpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert http.get("/ulm/v1/model-info").json() == as_json(info)
    assert http.get("/ulm/v1/model-info", params={"model": info.name}).json() == as_json(info)
    assert http.get("/ulm/v1/model-info").json()["parameter_count"] == str(info.parameter_count)  # 64-bit: a string


@pytest.mark.parametrize("request_", [
    {"prompt": "The quick brown", "max_new_tokens": 40},
    {"prompt": "ab", "max_new_tokens": 60, "temperature": 0.9, "top_k": 20, "seed": "7", "stop": ["q", "zz"]},
], ids=["greedy", "seeded-with-stops"])
def test_generate_over_sse_equals_the_grpc_stream(http, channel, request_):
    messages = list(pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(**{
        k: int(v) if k == "seed" else v for k, v in request_.items()}), timeout=30))
    events = generate_sse(http, request_)
    assert [t for e in events for t in e["token_ids"]] == [t for m in messages for t in m.token_ids]
    assert "".join(e["text"] for e in events) == "".join(m.text for m in messages)
    finish = pb.FinishReason.Name(messages[-1].finish_reason)
    assert events[-1]["finish_reason"] == finish != "FINISH_REASON_UNSPECIFIED"
    assert events[-1]["usage"] == as_json(messages[-1].usage)
    assert all(e["finish_reason"] == "FINISH_REASON_UNSPECIFIED" and "usage" not in e for e in events[:-1])


# -- errors: the HTTP status for the code, the gRPC status's message ----------------------------------------------


def same_error(response: httpx.Response, error: grpc.RpcError, status: int) -> None:
    assert error_of(response) == (status, error.code().name, error.details())


def test_invalid_argument_is_400(http, channel):
    stub = pb_grpc.TextGenerationStub(channel)
    same_error(http.post("/ulm/v1/generate", json={"prompt": "x", "temperature": -1}),
               grpc_error(stub.Generate, pb.GenerateRequest(prompt="x", temperature=-1)), 400)
    same_error(http.get("/ulm/v1/jobs/no..pe"), grpc_error(jobs_pb2_grpc.JobsStub(channel).GetJob,
                                                            jpb.GetJobRequest(name="no..pe")), 400)
    # what only HTTP can get wrong names the field (or says what is wrong with the body)
    for response, words in [(http.post("/ulm/v1/tokenize", json={"txt": "a"}), "txt"),
                            (http.post("/ulm/v1/tokenize", json={"text": 5}), "text"),
                            (http.post("/ulm/v1/generate", json={"max_new_tokens": -1}), "max_new_tokens"),
                            (http.post("/ulm/v1/tokenize", content=b"{not json"), "not JSON"),
                            (http.post("/ulm/v1/tokenize", content=b"[1]"), "JSON object"),
                            (http.get("/ulm/v1/model-info", params={"modle": "x"}), "modle"),
                            (http.get("/ulm/v1/files", params={"a": "b"}), "takes no query parameters"),
                            (http.post("/ulm/v1/jobs/j:cancel", json={"force": True}), "force"),
                            (http.get("/ulm/v1/jobs", params={"state": "JOB_STATE_NOPE"}), "JOB_STATE_NOPE")]:
        status, code, message = error_of(response)
        assert (status, code) == (400, "INVALID_ARGUMENT") and words in message, message


def test_not_found_is_404(http, channel):
    same_error(http.get("/ulm/v1/model-info", params={"model": "nope"}),
               grpc_error(pb_grpc.TextGenerationStub(channel).GetModelInfo, pb.GetModelInfoRequest(model="nope")), 404)
    same_error(http.post("/ulm/v1/jobs/nojob:cancel"),
               grpc_error(jobs_pb2_grpc.JobsStub(channel).CancelJob, jpb.CancelJobRequest(name="nojob")), 404)
    assert error_of(http.get("/ulm/v1/nothing-here"))[:2] == (404, "NOT_FOUND")
    assert error_of(http.delete("/ulm/v1/generate"))[:2] == (405, "UNIMPLEMENTED")


def test_a_path_out_of_the_data_root_is_403(http, channel, server, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    (server.root / "files" / "evil.txt").symlink_to(outside)
    same_error(http.get("/ulm/v1/files/evil.txt"),
               grpc_error(files_pb2_grpc.FilesStub(channel).GetFile, fpb.GetFileRequest(name="evil.txt")), 403)
    same_error(http.delete("/ulm/v1/files/evil.txt"),
               grpc_error(files_pb2_grpc.FilesStub(channel).DeleteFile, fpb.DeleteFileRequest(name="evil.txt")), 403)
    assert outside.read_text() == "not yours"


def test_conflicts_are_409_and_models_load_unload_and_delete(http, channel, server):
    files, models = files_pb2_grpc.FilesStub(channel), models_pb2_grpc.ModelsStub(channel)
    assert http.put("/ulm/v1/files/twice.txt", content=b"one").status_code == 200
    same_error(http.put("/ulm/v1/files/twice.txt", content=b"two"),
               grpc_error(files.UploadFile, iter([fpb.UploadFileRequest(header=fpb.UploadFileHeader(
                   name="twice.txt"))])), 409)
    make_toy_checkpoint(server.root / "models" / "m2" / "best", seed=1)
    loaded = http.post("/ulm/v1/models/m2:load", json={"max_batch": 2})
    assert loaded.status_code == 200, loaded.text
    listed = models.ListLoadedModels(mpb.ListLoadedModelsRequest())
    assert loaded.json() == as_json(next(m for m in listed.models if m.name == "m2"))
    assert http.get("/ulm/v1/loaded-models").json() == as_json(listed)
    assert http.get("/ulm/v1/models/m2").json() == as_json(models.GetModel(mpb.GetModelRequest(name="m2")))
    assert http.get("/ulm/v1/models/m2").json()["loaded"] is True
    events = generate_sse(http, {"model": "m2", "prompt": "a", "max_new_tokens": 3})
    assert events[-1]["usage"]["completion_tokens"] == 3
    same_error(http.delete("/ulm/v1/models/m2"),
               grpc_error(models.DeleteModel, mpb.DeleteModelRequest(name="m2")), 409)
    assert http.post("/ulm/v1/models/m2:unload", json={"timeout_s": 5}).json() == {}
    assert http.delete("/ulm/v1/models/m2").json() == {}
    assert error_of(http.get("/ulm/v1/models/m2"))[:2] == (404, "NOT_FOUND")
    assert error_of(http.post("/ulm/v1/models/m2:load", json={"name": "other"}))[0] == 400  # body vs path


def test_a_file_over_the_cap_is_429_with_retry_after(http, channel):
    data = b"x" * (FILE_LIMIT + 1)
    r = http.put("/ulm/v1/files/big.txt", content=data)
    same_error(r, grpc_error(files_pb2_grpc.FilesStub(channel).UploadFile, upload_requests("big.txt", data)), 429)
    assert r.headers["retry-after"] == "1"
    assert error_of(http.get("/ulm/v1/files/big.txt"))[0] == 404  # nothing kept


def test_a_form_too_large_for_the_cap_is_refused_before_it_is_read(http):
    r = http.post("/ulm/v1/files", files={"file": ("big.txt", b"x" * 100_000)})
    status, code, message = error_of(r)
    assert (status, code) == (429, "RESOURCE_EXHAUSTED") and "the form is" in message  # not spooled, then counted
    assert "(--max-file-bytes)" in message
    assert error_of(http.get("/ulm/v1/files/big.txt"))[0] == 404


def test_a_body_over_the_request_limit_is_413(http):
    status, code, message = error_of(http.post("/ulm/v1/tokenize", json={"text": "y" * REQUEST_LIMIT}))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED")
    assert f"over this server's limit of {REQUEST_LIMIT} (--max-request-bytes)" in message


def test_an_unexpected_failure_is_500_with_grpcs_message(http, channel, server):
    tokenizer = default_tokenizer(server)

    def boom(text):
        raise RuntimeError("tokenizer exploded")
    tokenizer.encode = boom
    try:
        same_error(http.post("/ulm/v1/tokenize", json={"text": "a"}),
                   grpc_error(pb_grpc.TextGenerationStub(channel).Tokenize, pb.TokenizeRequest(text="a")), 500)
        assert error_of(http.post("/ulm/v1/tokenize", json={"text": "a"}))[2] == (
            "internal error: RuntimeError: tokenizer exploded")
    finally:
        del tokenizer.encode  # the class's method again
    assert http.post("/ulm/v1/tokenize", json={"text": "a"}).status_code == 200


def default_tokenizer(server):
    generation = next(s for s in server.app.services if s.name == "ulm.v1.TextGeneration")
    return generation.models.get("").tokenizer


# -- uploads ----------------------------------------------------------------------------------------------------


def test_uploads_raw_and_multipart(http, channel, server):
    files = files_pb2_grpc.FilesStub(channel)
    data = bytes(range(256)) * 8  # 2 KiB, every byte value
    r = http.put("/ulm/v1/files/raw.bin", content=data)
    assert r.status_code == 200, r.text
    assert r.json() == as_json(files.GetFile(fpb.GetFileRequest(name="raw.bin")))
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest() and r.json()["size_bytes"] == str(len(data))
    assert (server.root / "files" / "raw.bin").read_bytes() == data
    again = http.put("/ulm/v1/files/raw.bin", params={"overwrite": "true"}, content=b"shorter")
    assert again.json()["size_bytes"] == "7" and (server.root / "files" / "raw.bin").read_bytes() == b"shorter"

    def chunks():  # no Content-Length: chunked transfer encoding
        yield b"part one, "
        yield b"part two"
    assert http.put("/ulm/v1/files/chunked.txt", content=chunks()).json()["size_bytes"] == "18"
    form = http.post("/ulm/v1/files", files={"file": ("named-by-form.txt", b"from a form")}, data={"name": "f.txt"})
    assert form.json() == as_json(files.GetFile(fpb.GetFileRequest(name="f.txt")))
    assert http.post("/ulm/v1/files", files={"file": ("own-name.txt", b"x")}).json()["name"] == "own-name.txt"
    assert error_of(http.post("/ulm/v1/files", data={"name": "x"}))[:2] == (400, "INVALID_ARGUMENT")
    listed = http.get("/ulm/v1/files").json()
    assert listed == as_json(files.ListFiles(fpb.ListFilesRequest()))
    assert {"raw.bin", "chunked.txt", "f.txt", "own-name.txt"} <= {f["name"] for f in listed["files"]}
    assert http.delete("/ulm/v1/files/f.txt").json() == {}
    assert error_of(http.get("/ulm/v1/files/f.txt"))[:2] == (404, "NOT_FOUND")


# -- streams, counting ------------------------------------------------------------------------------------------


def test_a_closed_sse_stream_frees_its_slot(http, server):
    finished = server.metric("ulm_finished_requests_total", reason="cancelled")
    tokens = server.metric("ulm_generated_tokens_total")
    new = 4000
    with http.stream("POST", "/ulm/v1/generate", json={"prompt": "cancel me", "max_new_tokens": new}) as r:
        events = sse(r)
        for _ in range(3):
            next(events)
        assert server.scheduler.busy_slots == 1 and server.metric("ulm_running_requests") == 1
        at_close = server.metric("ulm_generated_tokens_total")
    # leaving the block closed the connection
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=2)
    assert server.metric("ulm_running_requests") == 0
    assert server.metric("ulm_finished_requests_total", reason="cancelled") == finished + 1
    after = server.metric("ulm_generated_tokens_total") - at_close
    assert after < 32, after  # it stopped within a few steps of the close (0-2 on an idle machine), not at 4000
    assert server.metric("ulm_generated_tokens_total") - tokens < new / 4


def test_an_error_mid_stream_ends_it_with_an_error_event(http, server):
    make_toy_checkpoint(server.root / "models" / "m3" / "best", seed=2)
    assert http.post("/ulm/v1/models/m3:load").status_code == 200
    with http.stream("POST", "/ulm/v1/generate", json={"model": "m3", "prompt": "a", "max_new_tokens": 4000}) as r:
        events = sse(r)
        assert next(events)[0] == "message"  # the answer has started: its status is 200 whatever comes
        with httpx.Client(base_url=server.http_url, timeout=30) as other:  # its streams get 50 ms
            assert other.post("/ulm/v1/models/m3:unload", json={"timeout_s": 0.05}).json() == {}
        rest = list(events)
    assert rest[-1] == ("error", {"error": {"code": "UNAVAILABLE",
                                            "message": "server shut down before the request finished"}})
    assert {name for name, _ in rest[:-1]} <= {"message"}
    assert http.delete("/ulm/v1/models/m3").json() == {}


def test_http_requests_are_counted_by_route_and_code(http, server):
    def count(route, code):
        return server.metric("ulm_http_requests_total", route=route, code=str(code))
    cases = [("POST /ulm/v1/tokenize", 200, lambda: http.post("/ulm/v1/tokenize", json={"text": "a"})),
             ("POST /ulm/v1/tokenize", 400, lambda: http.post("/ulm/v1/tokenize", json={"bad": 1})),
             ("POST /ulm/v1/jobs/{id}:cancel", 404, lambda: http.post("/ulm/v1/jobs/none:cancel")),
             ("GET /ulm/v1/jobs/{id}", 404, lambda: http.get("/ulm/v1/jobs/none")),
             ("POST /ulm/v1/generate", 200, lambda: generate_sse(http, {"prompt": "a", "max_new_tokens": 2})),
             ("unmatched", 404, lambda: http.get("/no/such/path")),
             ("GET /healthz", 200, lambda: http.get("/healthz"))]
    before = {(route, code): count(route, code) for route, code, _ in cases}
    for _, _, call in cases:
        call()
        call()
    assert {key: count(*key) - n for key, n in before.items()} == {key: 2 for key in before}
    assert 'ulm_http_requests_total{code="404",route="GET /ulm/v1/jobs/{id}"}' in httpx.get(server.metrics_url).text


def test_health_readiness_openapi_and_docs(http):
    assert http.get("/healthz").json() == {"status": "SERVING"}
    assert http.get("/readyz").json() == {"status": "SERVING"}
    doc = http.get("/openapi.json").json()
    for route in ROUTES:
        operation = doc["paths"][route.path][route.verb.lower()]
        assert operation["summary"] == route.summary
        answer = operation["responses"]["200"]["content"]
        assert "text/event-stream" in answer if route.streaming else "$ref" in answer["application/json"]["schema"]
        if route.body_fields:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert set(body["properties"]) == set(route.body_fields) and body["additionalProperties"] is False
    refs = {v for v in walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert refs and all(ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"] for ref in refs)
    assert "422" not in str(doc["paths"])  # FastAPI's validation answer is a 400 here
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)
    else:
        yield value


# -- servers of their own -----------------------------------------------------------------------------------------


def test_auth_matrix_on_every_api_route(checkpoint, tmp_path):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "root"), "--http-port", "0",
            "--auth-token-file", str(tmp_path / "tokens")]
    with InProcessServer(argv) as s, httpx.Client(base_url=s.http_url, timeout=30) as http:
        doc = http.get("/openapi.json").json()  # open, like health
        routes = [(verb.upper(), path) for path, ops in doc["paths"].items() for verb in ops
                  if path.startswith(("/ulm/", "/v1/"))]
        assert len(routes) >= len(ROUTES) + 2  # the uploads too
        for verb, path in routes:
            url = path.replace("{name}", "x").replace("{id}", "x")
            for headers, message in [({}, MISSING), ({"Authorization": "Bearer wrong"}, INVALID),
                                     ({"Authorization": f"Basic {TOKEN}"}, MISSING)]:
                r = http.request(verb, url, headers=headers, json={})
                assert error_of(r) == (401, "UNAUTHENTICATED", message), (verb, path)
                assert r.headers["www-authenticate"] == "Bearer"
        assert s.metric("ulm_http_requests_total", route="POST /ulm/v1/generate", code="401") == 3
        for open_path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert http.get(open_path).status_code == 200, open_path
        good = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
        assert http.get("/ulm/v1/model-info", headers=good).status_code == 200
        assert generate_sse(httpx.Client(base_url=s.http_url, headers=good), {"prompt": "a", "max_new_tokens": 2})
        assert http.put("/ulm/v1/files/a.txt", content=b"abc", headers=good).status_code == 200


def test_a_full_queue_is_429_at_once(checkpoint, tmp_path):
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "root"), "--http-port", "0",
            "--max-batch", "1", "--max-queue", "1"]
    with InProcessServer(argv) as s, grpc.insecure_channel(s.target) as channel:
        async def run():
            async with httpx.AsyncClient(base_url=s.http_url, timeout=30) as http:
                request = {"prompt": "long", "max_new_tokens": 3000}
                async with http.stream("POST", "/ulm/v1/generate", json=request) as running:
                    assert running.status_code == 200
                    queued = asyncio.create_task(http.post("/ulm/v1/generate", json=request))
                    while s.metric("ulm_queue_depth") < 1:  # its answer starts with its first token
                        await asyncio.sleep(0.01)
                    t0 = time.perf_counter()
                    refused = await http.post("/ulm/v1/generate", json=request)
                    waited = time.perf_counter() - t0
                    grpc_refused = grpc_error(pb_grpc.TextGenerationStub(channel).Generate,
                                              pb.GenerateRequest(**request))
                    queued.cancel()
                return refused, waited, grpc_refused
        refused, waited, grpc_refused = asyncio.run(run())
        same_error(refused, grpc_refused, 429)
        assert refused.headers["retry-after"] == "1" and waited < 0.5
        assert s.wait_until(lambda: s.scheduler.busy_slots == 0 and s.metric("ulm_queue_depth") == 0, timeout=5)


def test_https_with_the_grpc_servers_certificate(checkpoint, certificate, tmp_path):
    cert, key = certificate
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "root"), "--http-port", "0",
            "--tls-cert", str(cert), "--tls-key", str(key)]
    with InProcessServer(argv) as s:
        url = f"https://127.0.0.1:{s.app.http_port}"
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as https:
            assert https.post("/ulm/v1/tokenize", json={"text": "ab"}).json()["token_ids"]
            assert generate_sse(https, {"prompt": "a", "max_new_tokens": 2})
        with pytest.raises(httpx.HTTPError):  # plaintext is not served
            httpx.get(f"http://127.0.0.1:{s.app.http_port}/healthz", timeout=5)


def test_sigterm_during_sse_streams_lets_them_finish_and_exits_0(checkpoint):
    process = SubprocessServer(["--checkpoint", str(checkpoint), "--http-port", "0", "--grace", "30"])
    new, results, started = 1500, [None, None], threading.Barrier(3, timeout=30)

    def stream(i):
        with httpx.Client(base_url=process.http_url, timeout=60) as http, \
                http.stream("POST", "/ulm/v1/generate", json={"prompt": f"drain {i}", "max_new_tokens": new}) as r:
            events = sse(r)
            first = next(events)
            started.wait()
            rest = list(events)
        results[i] = (sum(len(d["token_ids"]) for _, d in [first, *rest]), rest[-1][1]["finish_reason"])
    try:
        readers = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in readers:
            t.start()
        started.wait()  # both streams are running
        process.terminate()
        with httpx.Client(base_url=process.http_url, timeout=10) as http:
            deadline = time.monotonic() + 5
            while http.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline, "readyz never went 503"
                time.sleep(0.005)
            assert http.get("/readyz").json() == {"status": "NOT_SERVING"}
            assert error_of(http.post("/ulm/v1/tokenize", json={"text": "a"})) == (
                503, "UNAVAILABLE", "server is shutting down")
        assert results == [None, None]  # the streams were still running
        for t in readers:
            t.join(60)
        assert results == [(new, "FINISH_REASON_LENGTH")] * 2
        assert process.proc.wait(30) == 0, "".join(process.log)
    finally:
        process.close()
