"""The whole loop of the pipelines over HTTP alone, with httpx (a real server on a loopback port; the test never
looks at the data root): upload a text (a raw PUT), build a char dataset, train a tiny model while two SSE watchers
follow it (one from the start, one that joins late and replays), export it to int8, load the checkpoint (torch)
and the export (onnx), and generate from each by name over SSE. Every JSON answer and every event is checked
against the server's own OpenAPI schemas."""
from __future__ import annotations

import threading

import httpx
import pytest
from http_client import OpenApi, sse
from pipeline_client import LOOP_ITERS, LOOP_TEXT, LOOP_TRAINING
from server_fixture import InProcessServer, make_toy_checkpoint


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    argv = ["--checkpoint", str(make_toy_checkpoint(tmp / "toy")), "--data-root", str(tmp / "root"),
            "--job-threads", "1", "--http-port", "0"]
    with InProcessServer(argv) as server, httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def api(http):
    return OpenApi(http.get("/openapi.json").json())


def watch(http: httpx.Client, api: OpenApi, job_id: str, **query) -> list[dict]:
    """Every event of GET /ulm/v1/jobs/{id}:watch until the job ends, each checked against JobEvent's schema."""
    with http.stream("GET", f"/ulm/v1/jobs/{job_id}:watch", params=query, timeout=300) as r:
        assert r.status_code == 200, r.read()
        events = []
        for name, data in sse(r):
            assert name == "message", data
            api.component("ulm.v1.JobEvent", data)
            events.append(data)
    return events


def final_job(events: list[dict]) -> dict:
    return [e["job"] for e in events if "job" in e][-1]


def states(events: list[dict]) -> list[str]:
    return [e["job"]["state"].removeprefix("JOB_STATE_") for e in events[1:] if "job" in e]


def train_watched_twice(http, api, job: dict) -> tuple[list[dict], list[dict]]:
    """One watcher from the start; a second one joins once steps flow and replays everything."""
    first: list[dict] = []
    stepping = threading.Event()

    def follow():
        with httpx.Client(base_url=http.base_url, timeout=300) as own:  # its own connection
            for event in watch_live(own, job["id"]):
                first.append(event)
                if "step" in event:
                    stepping.set()
        stepping.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert stepping.wait(120)
    late = watch(http, api, job["id"], replay_all="true")
    thread.join(300)
    return first, late


def watch_live(http: httpx.Client, job_id: str):
    with http.stream("GET", f"/ulm/v1/jobs/{job_id}:watch") as r:
        for _, data in sse(r):
            yield data


def generate(http: httpx.Client, api: OpenApi, **request) -> list[dict]:
    with http.stream("POST", "/ulm/v1/generate", json=request) as r:
        assert r.status_code == 200, r.read()
        events = [data for _, data in sse(r)]
    for event in events:
        api.component("ulm.v1.GenerateResponse", event)
    return events


def test_from_raw_text_to_served_models_over_http(http, api):
    uploaded = api.answer("PUT", "/ulm/v1/files/{name}", http.put("/ulm/v1/files/pets.txt", content=LOOP_TEXT.encode()))
    assert uploaded["size_bytes"] == str(len(LOOP_TEXT))
    built = api.answer("POST", "/ulm/v1/datasets", http.post("/ulm/v1/datasets", json={
        "name": "pets", "sources": [{"file": "pets.txt"}], "tokenizer": "char"}))
    assert built["kind"] == "JOB_KIND_DATASET"
    assert final_job(watch(http, api, built["id"]))["state"] == "JOB_STATE_SUCCEEDED"
    dataset = api.answer("GET", "/ulm/v1/datasets/{name}", http.get("/ulm/v1/datasets/pets"))
    assert dataset["tokenizer"] == "char" and {s["name"] for s in dataset["splits"]} >= {"train", "val"}

    job = api.answer("POST", "/ulm/v1/jobs:train", http.post("/ulm/v1/jobs:train", json={
        "dataset": "pets", "recipe": "shakespeare-char", "model": "m", "overrides": LOOP_TRAINING, "seed": 1}))
    first, late = train_watched_twice(http, api, job)
    assert final_job(first)["state"] == "JOB_STATE_SUCCEEDED", final_job(first)["error"]
    assert states(late) == ["QUEUED", "RUNNING", "SUCCEEDED"] and states(first)[-1] == "SUCCEEDED"
    sequences = [int(e["sequence"]) for e in first[1:]]  # uint64: a string in JSON
    assert sequences == sorted(set(sequences))  # in order, none twice
    assert [int(e["sequence"]) for e in late[1:]] == list(range(1, int(late[-1]["sequence"]) + 1))  # all of it
    live = {e["sequence"]: e for e in late}
    assert all(live[e["sequence"]] == e for e in first[1:])  # the late watcher saw the same events
    steps = [e["step"] for e in late if "step" in e]
    assert steps[-1]["step"] == str(LOOP_ITERS) and steps[-1]["loss"] < 0.6 * steps[0]["loss"], steps
    assert final_job(late)["result"] == "m"
    listed = api.answer("GET", "/ulm/v1/jobs", http.get("/ulm/v1/jobs", params={"kind": "JOB_KIND_TRAINING"}))
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]

    export = api.answer("POST", "/ulm/v1/jobs:export", http.post("/ulm/v1/jobs:export", json={
        "model": "m", "quantize": "int8"}))
    exported = final_job(watch(http, api, export["id"]))
    assert exported["state"] == "JOB_STATE_SUCCEEDED", exported["error"]
    onnx_name = exported["result"]

    for name, backend in (("m", "torch"), (onnx_name, "onnx")):
        info = api.answer("POST", "/ulm/v1/models/{name}:load", http.post(f"/ulm/v1/models/{name}:load"))
        assert info["backend"] == backend and info["name"] == name
    lineage = api.answer("GET", "/ulm/v1/models/{name}", http.get(f"/ulm/v1/models/{onnx_name}"))
    assert lineage["source_model"] == "m" and lineage["quantization"] == "int8" and lineage["loaded"] is True
    assert http.get("/ulm/v1/models/m").json()["training_job"] == job["id"]
    loaded = api.answer("GET", "/ulm/v1/loaded-models", http.get("/ulm/v1/loaded-models"))
    assert {"m", onnx_name} <= {m["name"] for m in loaded["models"]}
    for name in ("m", onnx_name):
        events = generate(http, api, model=name, prompt="the cat", max_new_tokens=24)
        text = "".join(e["text"] for e in events)
        assert events[-1]["usage"]["completion_tokens"] == 24 and len(text) == 24  # char model: a character a token
        assert set(text) <= set(LOOP_TEXT)
