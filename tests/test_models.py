"""ulm.v1.Models and routing by GenerateRequest.model, against a real server on a loopback port through the stubs.

The data root holds a real tiny training run (models/a: `ulm train` on a char-level dataset built in datasets/d)
and its fp32 export (models/a-onnx); the server's default model is a toy checkpoint outside the root.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from server_fixture import InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import models_pb2_grpc, text_generation_pb2_grpc
from protos.ulm.v1 import text_generation_pb2 as pb
from ulm.checkpoint import load_checkpoint
from ulm.data import build_dataset, dataset_id
from ulm.generate import generate_ids
from ulm.train import train
from ulm.train_config import build_config

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "the lazy fox"
LONG = 1000  # tokens of a stream that is still running while its model is unloaded


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
    (base / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(400)))
    root = base / "root"
    ds = build_dataset([base / "corpus.txt"], root / "datasets" / "d", tokenizer="char", progress=False, log=None)
    cfg = build_config("shakespeare-char", overrides=[
        f"dataset={ds}", "block_size=32", "n_layer=1", "n_head=2", "n_embd=32", "batch_size=8", "max_iters=20",
        "warmup_iters=2", "lr_decay_iters=20", "eval_interval=10", "eval_iters=2", "threads=1"])
    train(cfg, root / "models" / "a", progress=False)
    from export.pipeline import ExportOptions, export_checkpoint
    export_checkpoint(ExportOptions(str(root / "models" / "a" / "best"), str(root / "models" / "a-onnx"), threads=1,
                                    log=lambda _: None))
    (root / "models" / "unfinished-run").mkdir()  # a run before its first evaluation: no best/ yet
    (root / "models" / "unfinished-run" / "metrics.jsonl").write_text("")
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def reference(root):
    """Greedy ids of model a, in process (ulm.generate)."""
    model, tok, _ = load_checkpoint(root / "models" / "a" / "best")
    return lambda prompt, n: generate_ids(model, tok.encode(prompt), n, eos_id=tok.eos_id)


def own_copy(root, tmp_path):
    """A copy of the data root for a second server (a data root serves one server at a time)."""
    return shutil.copytree(root, tmp_path / "root", ignore=shutil.ignore_patterns("state.db*", "*.lock", "jobs"))


def serve(root, toy, *flags: str) -> InProcessServer:
    return InProcessServer(["--data-root", str(root), "--checkpoint", str(toy), "--threads", "1", "--max-batch", "4",
                            *flags])


@pytest.fixture(scope="module")
def server(root, toy):
    with serve(root, toy) as s:
        yield s


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.target) as channel:
        yield models_pb2_grpc.ModelsStub(channel), text_generation_pb2_grpc.TextGenerationStub(channel)


@pytest.fixture(scope="module")
def loaded(stubs):
    models, _ = stubs
    a = models.LoadModel(mpb.LoadModelRequest(name="a", max_batch=2), timeout=60)
    onnx = models.LoadModel(mpb.LoadModelRequest(name="a-onnx"), timeout=60)
    return a, onnx


def generate(gen, model: str, prompt: str = PROMPT, n: int = 24) -> list[int]:
    messages = list(gen.Generate(pb.GenerateRequest(model=model, prompt=prompt, max_new_tokens=n), timeout=60))
    return [t for m in messages for t in m.token_ids]


def error(call, request) -> grpc.RpcError:
    """The error a call ends with (a stream's, once read)."""
    with pytest.raises(grpc.RpcError) as e:
        response = call(request, timeout=60)
        if not isinstance(response, Message):
            list(response)
    return e.value


def test_both_formats_load_and_generate_by_name(stubs, loaded, reference):
    models, gen = stubs
    a, onnx = loaded
    assert (a.name, a.backend, a.max_batch) == ("a", "torch", 2)
    assert (onnx.name, onnx.backend, onnx.dtype, onnx.max_batch) == ("a-onnx", "onnx", "float32", 4)
    want = reference(PROMPT, 24)
    assert len(want) > 0
    assert generate(gen, "a") == want
    assert generate(gen, "a-onnx") == want
    assert generate(gen, "") != want  # the default (toy, byte-level) is another model
    listed = models.ListLoadedModels(mpb.ListLoadedModelsRequest(), timeout=10)
    assert listed.default_model == "toy"
    assert sorted(m.name for m in listed.models) == ["a", "a-onnx", "toy"]
    assert gen.GetModelInfo(pb.GetModelInfoRequest(model="a-onnx"), timeout=10) == onnx
    assert gen.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "toy"
    ids = gen.Tokenize(pb.TokenizeRequest(model="a", text=PROMPT), timeout=10).token_ids
    assert len(ids) == len(PROMPT) and list(ids) != list(gen.Tokenize(pb.TokenizeRequest(text=PROMPT)).token_ids)


def test_list_models_shows_lineage(root, stubs, loaded):
    models, _ = stubs
    listed = {m.name: m for m in models.ListModels(mpb.ListModelsRequest(), timeout=30).models}
    assert sorted(listed) == ["a", "a-onnx"]  # the unfinished run holds no model yet
    a, onnx = listed["a"], listed["a-onnx"]
    summary = json.loads((root / "models" / "a" / "summary.json").read_text())
    assert a.format == mpb.MODEL_FORMAT_CHECKPOINT and a.loaded
    assert (a.dataset, a.dataset_id) == ("d", dataset_id(root / "datasets" / "d"))
    assert a.best_val_loss == pytest.approx(summary["best"]["val_loss"]) and a.best_val_loss > 0
    assert a.parameter_count == loaded[0].parameter_count > 0
    assert json.loads(a.config_json)["n_layer"] == 1 and a.size_bytes > 0 and a.created_at > 0
    assert onnx.format == mpb.MODEL_FORMAT_ONNX and onnx.loaded
    assert (onnx.source_model, onnx.dataset, onnx.dataset_id, onnx.quantization) == ("a", "d", a.dataset_id, "")
    assert json.loads(onnx.export_report_json)["float32"]["passed"]
    assert onnx.parameter_count == a.parameter_count
    assert models.GetModel(mpb.GetModelRequest(name="a"), timeout=10) == a


def test_bad_loads_get_their_codes_and_change_nothing(root, toy, stubs, loaded):
    models, gen = stubs
    broken = root / "models" / "broken" / "best"
    shutil.copytree(root / "models" / "a" / "best", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (root / "models" / "leaks").mkdir()
    (root / "models" / "leaks" / "best").symlink_to(toy)  # a checkpoint outside the data root
    cases = [
        (mpb.LoadModelRequest(name="a"), grpc.StatusCode.ALREADY_EXISTS, "already loaded"),
        (mpb.LoadModelRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (mpb.LoadModelRequest(name="a-onnx", backend="torch"), grpc.StatusCode.INVALID_ARGUMENT, "backend"),
        (mpb.LoadModelRequest(name="a-onnx", device="tpu"), grpc.StatusCode.INVALID_ARGUMENT, "device"),
        (mpb.LoadModelRequest(name="../a"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (mpb.LoadModelRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT, "name is empty"),
        (mpb.LoadModelRequest(name="unfinished-run"), grpc.StatusCode.FAILED_PRECONDITION, "best/"),
        (mpb.LoadModelRequest(name="broken"), grpc.StatusCode.FAILED_PRECONDITION, "model.safetensors"),
        (mpb.LoadModelRequest(name="leaks"), grpc.StatusCode.PERMISSION_DENIED, "outside the data root"),
    ]
    for request, code, text in cases:
        e = error(models.LoadModel, request)
        assert (e.code(), text in e.details()) == (code, True), (request, e.details())
        assert "\n" not in e.details() and str(root) not in e.details(), e.details()
    listed = models.ListLoadedModels(mpb.ListLoadedModelsRequest(), timeout=10)
    assert sorted(m.name for m in listed.models) == ["a", "a-onnx", "toy"]
    assert len(generate(gen, "a", n=4)) == 4  # and the loaded ones keep serving
    shutil.rmtree(root / "models" / "broken")
    shutil.rmtree(root / "models" / "leaks")


def test_running_requests_gauge_counts_every_model(server, stubs, loaded):
    _, gen = stubs
    calls = [gen.Generate(pb.GenerateRequest(model=m, prompt="the", max_new_tokens=4000)) for m in ("a", "toy")]
    firsts = [next(c) for c in calls]
    assert all(f.token_ids for f in firsts)
    assert server.wait_until(lambda: server.metric("ulm_running_requests") == 2, timeout=5)
    for c in calls:
        c.cancel()
    assert server.wait_until(lambda: server.metric("ulm_running_requests") == 0, timeout=5)


def test_unload_lets_a_running_stream_finish_then_requests_are_not_found(server, stubs, loaded, reference):
    models, gen = stubs
    want = reference(PROMPT, LONG)
    assert len(want) == LONG  # greedy runs the whole length (no EOS), so the stream is still going below
    call = gen.Generate(pb.GenerateRequest(model="a", prompt=PROMPT, max_new_tokens=LONG), timeout=60)
    got = list(next(call).token_ids)
    unloaded = []
    unloading = threading.Thread(target=lambda: unloaded.append(
        models.UnloadModel(mpb.UnloadModelRequest(name="a", timeout_s=30), timeout=60)))
    unloading.start()
    deadline = time.monotonic() + 5
    while "a" in [m.name for m in models.ListLoadedModels(mpb.ListLoadedModelsRequest()).models]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert unloaded == []  # it waits for the stream
    e = error(gen.Generate, pb.GenerateRequest(model="a", prompt=PROMPT, max_new_tokens=2))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "'a'" in e.details()
    messages = list(call)
    got += [t for m in messages for t in m.token_ids]
    unloading.join(30)
    assert unloaded == [mpb.UnloadModelResponse()]
    assert got == want and messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert error(models.UnloadModel, mpb.UnloadModelRequest(name="a")).code() == grpc.StatusCode.NOT_FOUND
    assert not models.GetModel(mpb.GetModelRequest(name="a"), timeout=10).loaded


def test_delete_is_refused_while_loaded_and_removes_the_model_after(root, stubs):
    models, gen = stubs
    shutil.copytree(root / "models" / "a-onnx", root / "models" / "b-onnx")
    models.LoadModel(mpb.LoadModelRequest(name="b-onnx"), timeout=60)
    e = error(models.DeleteModel, mpb.DeleteModelRequest(name="b-onnx"))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "unload" in e.details()
    assert len(generate(gen, "b-onnx", n=3)) == 3
    models.UnloadModel(mpb.UnloadModelRequest(name="b-onnx"), timeout=60)
    models.DeleteModel(mpb.DeleteModelRequest(name="b-onnx"), timeout=60)
    assert "b-onnx" not in [m.name for m in models.ListModels(mpb.ListModelsRequest(), timeout=30).models]
    assert error(models.GetModel, mpb.GetModelRequest(name="b-onnx")).code() == grpc.StatusCode.NOT_FOUND
    assert error(models.DeleteModel, mpb.DeleteModelRequest(name="b-onnx")).code() == grpc.StatusCode.NOT_FOUND
    assert error(models.DeleteModel, mpb.DeleteModelRequest(name="../a")).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (root / "models" / "a-onnx" / "manifest.json").is_file()  # only that folder went


def test_max_models_and_unloading_the_default_and_drain_on_shutdown(root, toy, reference, tmp_path):
    s = serve(own_copy(root, tmp_path), toy, "--max-models", "2").__enter__()
    stopping = threading.Thread(target=s.__exit__, args=(None, None, None))
    try:
        with grpc.insecure_channel(s.target) as channel:
            models, gen = models_pb2_grpc.ModelsStub(channel), text_generation_pb2_grpc.TextGenerationStub(channel)
            models.LoadModel(mpb.LoadModelRequest(name="a"), timeout=60)
            e = error(models.LoadModel, mpb.LoadModelRequest(name="a-onnx"))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in e.details()
            models.UnloadModel(mpb.UnloadModelRequest(name="toy"), timeout=60)
            e = error(gen.Generate, pb.GenerateRequest(prompt="x", max_new_tokens=2))
            assert e.code() == grpc.StatusCode.NOT_FOUND and "unloaded" in e.details()
            assert models.LoadModel(mpb.LoadModelRequest(name="a-onnx"), timeout=60).name == "a-onnx"  # room again
            listed = models.ListLoadedModels(mpb.ListLoadedModelsRequest(), timeout=10)
            assert (listed.default_model, sorted(m.name for m in listed.models)) == ("", ["a", "a-onnx"])
            # the server stops (as on SIGTERM): a loaded model's running stream is drained, not cut
            call = gen.Generate(pb.GenerateRequest(model="a-onnx", prompt=PROMPT, max_new_tokens=LONG), timeout=60)
            got = list(next(call).token_ids)
            stopping.start()
            got += [t for m in call for t in m.token_ids]
    finally:
        if not stopping.is_alive() and stopping.ident is None:
            s.__exit__(None, None, None)
    stopping.join(30)
    assert got == reference(PROMPT, LONG)


def test_a_load_over_the_memory_budget_is_refused(root, toy, tmp_path):
    s = serve(own_copy(root, tmp_path), toy, "--model-memory-mb", "1")
    with s, grpc.insecure_channel(s.target) as channel:
        models = models_pb2_grpc.ModelsStub(channel)
        e = error(models.LoadModel, mpb.LoadModelRequest(name="a"))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--model-memory-mb" in e.details()
        assert [m.name for m in models.ListLoadedModels(mpb.ListLoadedModelsRequest()).models] == ["toy"]
