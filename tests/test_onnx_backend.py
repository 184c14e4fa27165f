"""The ONNX Runtime backend: continuous batching against the in-process reference, provider choice and
fallback, int8 on CUDA refused, errors, and greedy streams through the gRPC API identical to the torch backend's."""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from server_fixture import InProcessServer

from export.quantize import quantize_int8
from export.runtime import INT8_WEIGHT_BITS, ExportError, file_entries
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.backends import load_backend
from server.backends.base import warmup
from server.backends.onnx_backend import OnnxBackend
from server.backends.torch_backend import TorchBackend
from ulm.checkpoint import load_checkpoint
from ulm.generate import generate_ids

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(toy_checkpoint):
    return toy_checkpoint


@pytest.fixture(scope="module")
def export_dir(toy_onnx_export):
    return toy_onnx_export


@pytest.fixture(scope="module")
def int8_dir(export_dir, tmp_path_factory):
    """The fp32 export with its graph quantized (what `--quantize int8` writes, without a second export)."""
    out = tmp_path_factory.mktemp("toy_int8")
    shutil.copytree(export_dir, out, dirs_exist_ok=True)
    quantize_int8(export_dir / "model.onnx", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["dtype"] = "int8"
    manifest["quantization"] = {"weight_bits": INT8_WEIGHT_BITS, "per_channel": False}
    manifest["files"] = file_entries(out, list(manifest["files"]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_checkpoint(checkpoint)[0]


def run_batching(backend, prompts: list[list[int]], max_new: list[int], max_batch: int) -> dict[int, list[int]]:
    """Greedy continuous batching as the scheduler does it: admit into free slots, prefill the newcomers,
    decode every running slot, release finished ones (slots are reused). Returns the tokens per request."""
    out: dict[int, list[int]] = {}
    running: dict[int, int] = {}  # slot -> request
    waiting, free = list(range(len(prompts))), list(range(max_batch))
    while waiting or running:
        new = []
        while waiting and free:
            r, s = waiting.pop(0), free.pop(0)
            running[s], out[r] = r, []
            new.append(s)
        if new:
            for s, logits in zip(new, backend.prefill(new, [prompts[running[s]] for s in new])):
                out[running[s]].append(int(logits.argmax()))
        slots = [s for s in running if len(out[running[s]]) < max_new[running[s]]]
        if slots:
            logits = backend.decode(slots, [out[running[s]][-1] for s in slots],
                                    [len(prompts[running[s]]) + len(out[running[s]]) - 1 for s in slots])
            for s, row in zip(slots, logits):
                out[running[s]].append(int(row.argmax()))
        for s in [s for s in running if len(out[running[s]]) >= max_new[running[s]]]:
            del running[s]
            backend.release(s)
            free.append(s)
    return out


def test_continuous_batching_matches_generate_ids(export_dir, checkpoint, reference):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 259, int(rng.integers(1, 30))).tolist() for _ in range(9)]
    max_new = [int(rng.integers(2, 25)) for _ in prompts]
    backend = OnnxBackend(export_dir, "cpu", max_batch=4)
    warmup(backend)
    got = run_batching(backend, prompts, max_new, 4)
    for r, p in enumerate(prompts):
        assert got[r] == generate_ids(reference, p, max_new[r]), r
    assert not backend.length and not backend.parked  # everything released


@pytest.mark.parametrize("ortvalues", [False, True], ids=["host-views", "ortvalues"])
def test_logits_match_torch_backend_step_by_step(export_dir, checkpoint, ortvalues):
    """Same calls into both backends, rows of different lengths joining, leaving, waiting, the cache growing:
    logits agree. `ortvalues` keeps the cache in OrtValues between steps, as on CUDA (here on the CPU)."""
    onnx_b, torch_b = OnnxBackend(export_dir, "cpu", 4), TorchBackend(checkpoint, "cpu", 4)
    onnx_b.keep_on_device = ortvalues
    rng = np.random.default_rng(0)
    for b in onnx_b.buffers:  # what lies beyond a row's length must never be read: make it noise
        b[:] = rng.normal(0, 100, b.size)
    prompts = {0: list(range(40, 100)), 1: [5, 6, 7], 2: [9], 3: list(range(100, 117))}
    length = {}
    capacities = []
    resize = onnx_b._resize
    onnx_b._resize = lambda capacity: (capacities.append(capacity), resize(capacity))[1]

    def both(fn, *args):
        a, b = getattr(onnx_b, fn)(*args), getattr(torch_b, fn)(*args)
        if a is not None:
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert (a - b).abs().max() <= 1e-4, fn
        return a

    def prefill(slots):
        both("prefill", slots, [prompts[s] for s in slots])
        length.update({s: len(prompts[s]) for s in slots})

    def decode(slots):
        both("decode", slots, [length[s] % 7 for s in slots], [length[s] for s in slots])
        length.update({s: length[s] + 1 for s in slots})

    prefill([0, 1])
    for _ in range(4):
        decode([0, 1])  # a cache of 64 positions; slot 0 fills it
    prefill([2, 3])
    both("release", 1)  # the last row leaves
    for step in range(3):
        decode([3, 0, 2] if step % 2 else [0, 2, 3])  # 2 and 3 join as new rows, the cache grows to 128
    decode([2])  # a subset: slots 0 and 3 take padding tokens past their lengths, later written over
    decode([2])
    decode([0, 2, 3])
    prefill([1])  # slot reuse
    decode([1, 0, 2, 3])  # joins as a new row
    both("release", 0)  # a middle row leaves: the last moves into its place
    decode([1, 2, 3])
    decode([3, 1, 2])
    assert capacities == [64, 128]
    for s in (1, 2, 3):
        both("release", s)
    assert onnx_b.batch == [] and onnx_b.capacity == 0


def test_backend_attributes_and_registry(export_dir, checkpoint):
    b = load_backend("onnx", export_dir, "cpu", 3)
    assert isinstance(b, OnnxBackend)
    assert (b.name, b.device, b.dtype, b.max_batch) == ("onnx", "cpu", "float32", 3)
    ref = TorchBackend(checkpoint, "cpu", 1)
    assert b.num_params == ref.num_params and b.config == ref.config
    assert b.tokenizer.encode("abc") == ref.tokenizer.encode("abc")
    spinning = "session.intra_op.allow_spinning"
    assert b.session.get_session_options().get_session_config_entry(spinning) == "1"
    served = load_backend("onnx", export_dir, "cpu", 3, serving=True)  # the server's pool threads sleep
    assert served.session.get_session_options().get_session_config_entry(spinning) == "0"


def test_cuda_request_logs_the_provider_in_use(export_dir, caplog):
    with caplog.at_level(logging.INFO, logger="server.backends.onnx_backend"):
        b = OnnxBackend(export_dir, "cuda", 2)
    text = caplog.text
    assert f"providers in use: {', '.join(b.providers)}" in text
    if b.device == "cuda":  # a machine with a working CUDA provider
        assert b.providers[0] == "CUDAExecutionProvider"
    else:
        assert b.providers == ["CPUExecutionProvider"]
        assert "CUDA execution provider unavailable" in text and "falling back to CPUExecutionProvider" in text
        assert any(r.levelno == logging.WARNING for r in caplog.records)
    warmup(b)


def test_int8_is_refused_on_cuda_and_runs_on_cpu(int8_dir, export_dir):
    with pytest.raises(ValueError, match="int8.*for the CPU"):
        OnnxBackend(int8_dir, "cuda", 2)
    q, f = OnnxBackend(int8_dir, "cpu", 2), OnnxBackend(export_dir, "cpu", 2)
    assert q.dtype == "int8"
    a, b = q.prefill([0], [[1, 2, 3, 4]]), f.prefill([0], [[1, 2, 3, 4]])
    assert 0 < (a - b).abs().max() < 0.05  # quantized: close, not equal


def test_errors(export_dir, checkpoint, tmp_path):
    b = OnnxBackend(export_dir, "cpu", 2)
    b.prefill([0], [[1, 2, 3]])
    with pytest.raises(ValueError, match="slot 0 is in use"):
        b.prefill([0], [[1]])
    with pytest.raises(ValueError, match="cannot decode at position 5"):
        b.decode([0], [1], [5])
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):
        b.decode([1], [1], [0])
    with pytest.raises(ValueError, match="prompt lengths"):
        b.prefill([1], [list(range(600))])
    with pytest.raises(ExportError, match="run `python -m export`"):
        OnnxBackend(checkpoint, "cpu", 2)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    with open(broken / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ExportError, match="model.onnx.data is missing or has the wrong size"):
        OnnxBackend(broken, "cpu", 2)
    old = tmp_path / "old"  # an export from before the in-place cache
    shutil.copytree(export_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": "ulm-onnx/1"}))
    with pytest.raises(ExportError, match="'ulm-onnx/1', expected 'ulm-onnx/2'.*export` on its checkpoint again"):
        OnnxBackend(old, "cpu", 2)


def test_grpc_greedy_streams_identical_to_torch_backend(checkpoint, export_dir):
    prompts = ["Hello", "The quick brown fox", "a", "Once upon a time there was", "1 2 3", "zzz"]
    new = [20 + 7 * i for i in range(len(prompts) - 1)] + [300]  # the last one's window slides (context 128)

    def generate_all(server) -> list[tuple[list[int], str]]:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

            def one(i_prompt):
                i, prompt = i_prompt
                msgs = list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=new[i]), timeout=60))
                return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)

            with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: continuous batching with joins/leaves
                return info, list(pool.map(one, enumerate(prompts)))

    cores = len(os.sched_getaffinity(0))
    with InProcessServer(["--checkpoint", str(export_dir), "--backend", "onnx", "--max-batch", "4"]) as s:
        info, onnx_out = generate_all(s)
        # ORT runs the model on every core; torch only samples, on one thread that never spins beside ORT's
        assert s.model_process_info() == {"intra_op_threads": cores, "torch_threads": 1}
    assert (info.backend, info.device, info.dtype) == ("onnx", "cpu", "float32")
    with InProcessServer(["--checkpoint", str(checkpoint), "--max-batch", "4"]) as s:
        _, torch_out = generate_all(s)
        # a toy model runs on one thread (server.backends.base.model_threads); --threads sets its count
        assert s.model_process_info()["torch_threads"] == 1
    with InProcessServer(["--checkpoint", str(checkpoint), "--max-batch", "4", "--threads", str(cores)]) as s:
        assert s.model_process_info()["torch_threads"] == cores
    assert onnx_out == torch_out
    assert all(ids for ids, _ in onnx_out)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    assert onnx_out[-1][0] == generate_ids(model, tokenizer.encode(prompts[-1]), new[-1], eos_id=tokenizer.eos_id)
    assert len(onnx_out[-1][0]) > 128
