"""The CUDA paths, on a machine with an NVIDIA GPU (skipped elsewhere): the torch backend and the server on cuda,
ONNX Runtime's CUDA provider, and training on cuda (bf16 autocast, and nccl under torchrun). `make cuda-check`
runs these and the CUDA benchmarks in one command."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import torch
from server_fixture import ROOT, InProcessServer

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.backends.torch_backend import TorchBackend
from ulm.generate import decode_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


def step_logits(backend, steps: int = 6, prompts: list[list[int]] = PROMPTS) -> list[torch.Tensor]:
    """The logits of a prefill of `prompts` and of `steps` greedy decode steps after it, on the CPU."""
    slots = list(range(len(prompts)))
    out = [backend.prefill(slots, prompts)]
    tokens, positions = out[0].argmax(-1).tolist(), [len(p) for p in prompts]
    for _ in range(steps):
        out.append(backend.decode(slots, tokens, positions))
        tokens, positions = out[-1].argmax(-1).tolist(), [p + 1 for p in positions]
    return [x.float().cpu() for x in out]


def test_torch_backend_on_cuda_matches_the_cpu(toy_checkpoint):
    cpu, gpu = TorchBackend(toy_checkpoint, "cpu", 2), TorchBackend(toy_checkpoint, "cuda", 2)
    assert gpu.cache.k.device.type == "cuda"
    for a, b in zip(step_logits(cpu), step_logits(gpu)):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("rows", [1, 3])
def test_cuda_graph_steps_equal_launched_ones(toy_checkpoint, rows):
    """Decode steps replayed from CUDA graphs give the logits of the same steps launched kernel by kernel; 3 rows
    replay the 4-row graph with a padding row."""
    graphed = TorchBackend(toy_checkpoint, "cuda", 4)
    launched = TorchBackend(toy_checkpoint, "cuda", 4, cuda_graphs=False)
    assert graphed.graphs is not None and graphed.graphs.buckets == [1, 2, 4] and launched.graphs is None
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [4, 4, 4, 4, 4, 4, 4]][:rows]
    for a, b in zip(step_logits(launched, 8, prompts), step_logits(graphed, 8, prompts)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_the_server_streams_from_cuda_what_the_backend_decodes(toy_checkpoint):
    backend = TorchBackend(toy_checkpoint, "cuda", 1)
    prompt = backend.tokenizer.encode("Once upon a time")
    expected = decode_loop(backend, [prompt], 24, eos_id=backend.tokenizer.eos_id)[0]
    with InProcessServer(["--checkpoint", str(toy_checkpoint), "--device", "cuda", "--max-batch", "4"]) as s:
        with grpc.insecure_channel(s.target) as channel:
            stub = pb_grpc.TextGenerationStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).device == "cuda"
            msgs = list(stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=24), timeout=60))
    assert [t for m in msgs for t in m.token_ids] == expected


def test_onnx_runtime_runs_on_its_cuda_provider(toy_checkpoint, toy_onnx_export):
    from server.backends.onnx_backend import OnnxBackend

    backend = OnnxBackend(toy_onnx_export, "cuda", 2)
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    for a, b in zip(step_logits(TorchBackend(toy_checkpoint, "cpu", 2)), step_logits(backend)):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_training_on_cuda_in_bf16(tmp_path, launcher):
    """A few steps of the adder on the GPU with bf16 autocast; under torchrun the process group is nccl's."""
    start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if launcher == "torchrun" else [sys.executable]
    cmd = [*start, "-m", "ulm", "train", "--preset", "adder", "--out", str(tmp_path / "run"), "--no-progress",
           "--set", "device=cuda", "dtype=bfloat16", "max_iters=20", "eval_interval=10", "eval_iters=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
