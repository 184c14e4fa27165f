"""Shared by the benchmark scripts: random-init checkpoints and cached ONNX exports of them, the machine's memory
read bandwidth, in-process decode timing through the server's backend interface, and result files.

Backend labels: "torch" (the checkpoint), "torch-int8" (the checkpoint with its Linear weights in int8 as it loads:
ulm.quantize), "onnx-fp32" and "onnx-int8" (`python -m export` of it, cached under build/bench/exports and reused
while the checkpoint's weights are unchanged).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ulm.generate import SamplingParams, decode_loop, sampler
from ulm.util import file_sha256

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "build" / "bench"
BACKENDS = {"torch": ("torch", None), "torch-int8": ("torch", "int8"), "torch-bf16": ("torch", "bf16"),
            "onnx-fp32": ("onnx", None), "onnx-int8": ("onnx", "int8")}
SERVED = BACKENDS  # the labels bench.serving and bench.soak start servers for (server_flags)


def parse_list(text: str, kind=str, choices=None, name: str = "list") -> list:
    """"a,b,c" -> [a, b, c]; ValueError naming the option on a bad item."""
    items = [kind(x) for x in text.split(",") if x.strip()]
    bad = [x for x in items if choices is not None and x not in choices]
    if not items or bad:
        allowed = ", ".join(map(str, choices or [kind.__name__]))
        raise ValueError(f"--{name}: expected a comma-separated list of {allowed}; got {text!r}")
    return items


def machine() -> dict:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers: a VM may name no more than "AMD EPYC", and hosts
    of one name differ in kind (and in speed: docs/performance-log.md, "Benchmark hosts")."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


# -- memory bandwidth --------------------------------------------------------------------------------------

_BUFFER: dict[tuple[int, str], torch.Tensor] = {}


def memory_bandwidth(mib: int = 512, repeats: int = 7, device: str = "cpu") -> float:
    """Read bandwidth in GB/s: the median time of summing a buffer far larger than any cache, with torch's
    current thread count (the roofline of a decode step, which reads every weight once); on "cuda", the GPU's.

    It waits first for the idle threads of the run before it to stop spinning: ONNX Runtime's spin for tens of
    ms after a run, and a sample taken among them reads well below the machine's bandwidth."""
    time.sleep(0.1)
    if (mib, device) not in _BUFFER:
        _BUFFER[mib, device] = torch.ones(mib * 2**20 // 4, device=device)
    x = _BUFFER[mib, device]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    x.sum()  # fault the pages in, warm the threads
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def check_device(device: str, backends: list[str]) -> list[str]:
    """The backend labels that run on `device`: int8 ones are for the CPU (the ONNX backend refuses int8 exports
    on CUDA, ulm.quantize's FBGEMM kernels are the CPU's). ValueError when CUDA is asked for and torch sees none."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cpu":
        return backends
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    cpu_only = [b for b in backends if BACKENDS.get(b, (None, None))[1] == "int8"]
    if cpu_only:
        print(f"skipping {', '.join(cpu_only)} on cuda: int8 backends are for the CPU", flush=True)
    left = [b for b in backends if b not in cpu_only]
    if not left:
        raise ValueError("--device cuda: none of the backends asked for runs on cuda")
    return left


# -- checkpoints and exports -------------------------------------------------------------------------------

def ensure_checkpoint(preset: str, cache: Path = BENCH_DIR) -> Path:
    """A random-init checkpoint of `preset` (`ulm init`, seed 0), written once under cache/checkpoints."""
    d = Path(cache) / "checkpoints" / preset
    if not (d / "model.safetensors").is_file():
        from ulm.cli import main as ulm_main

        if ulm_main(["init", "--preset", preset, "--out", str(d)]) not in (0, None):
            raise ValueError(f"could not write a {preset} checkpoint to {d}")
    return d


def ensure_export(checkpoint: Path, quantize: str | None, cache: Path = BENCH_DIR) -> Path:
    """`python -m export` of the checkpoint (fp32 or int8) under cache/exports, reused while the checkpoint's
    weights and the export format are unchanged."""
    from export.pipeline import ExportOptions, export_checkpoint
    from export.runtime import ExportError, read_export
    from ulm.checkpoint import WEIGHTS_FILE

    checkpoint = Path(checkpoint)
    sha = file_sha256(checkpoint / WEIGHTS_FILE)
    out = Path(cache) / "exports" / f"{checkpoint.resolve().name}-{sha[:12]}-{quantize or 'fp32'}"
    try:  # reused while the server would load it (a current format) and it is of these weights
        if read_export(out)[0]["source"]["sha256"] == sha:
            return out
    except ExportError:
        pass
    print(f"exporting {checkpoint} ({quantize or 'fp32'}) to {out} (once; reused later)", flush=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the exporter's own progress lines
            export_checkpoint(ExportOptions(checkpoint=str(checkpoint), out=str(out), quantize=quantize,
                                            log=lambda line: log.write(line + "\n")))
    except Exception:
        print(log.getvalue())
        raise
    return out


def torch_quantize(label: str) -> str | None:
    """The --quantize of a torch label (torch-int8: "int8"); None for the others (an int8 ONNX model is an export)."""
    kind, quantize = BACKENDS[label]
    return quantize if kind == "torch" else None


def server_flags(label: str) -> tuple[str, ...]:
    """`python -m server` flags a label needs besides --backend and --checkpoint."""
    return ("--quantize", q) if (q := torch_quantize(label)) else ()


def backend_dir(label: str, checkpoint: Path, cache: Path = BENCH_DIR) -> tuple[str, Path]:
    """(server backend name, the directory it loads) for a backend label."""
    kind, quantize = BACKENDS[label]
    return kind, (Path(checkpoint) if kind == "torch" else ensure_export(Path(checkpoint), quantize, cache))


def weight_bytes(label: str, directory: Path, cfg) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding tables (a step gathers one row
    of each; a tied output layer reads the token table whole). int8 exports: their quantized MatMul weights
    (with scales) in place of the fp32 Linear weights; torch-bf16: two bytes per weight; torch-int8: a byte per
    Linear weight and a scale per output channel (its lm_head's own int8 copy in place of the fp32 token table)."""
    from ulm.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    tables = {id(p) for p in model.embed.parameters()}
    read = {id(p): p for p in model.parameters() if id(p) not in tables}
    read[id(model.lm_head.weight)] = model.lm_head.weight
    n = sum(p.numel() * p.element_size() for p in read.values())
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    if BACKENDS[label] == ("torch", "int8"):
        return n + sum(w.numel() + 8 * w.shape[0] - 4 * w.numel() for w in linear.values())
    if BACKENDS[label] == ("torch", "bf16"):
        return n // 2
    if BACKENDS[label][1] == "int8":
        from export.quantize import matmul_weight_bytes
        from export.runtime import MODEL_FILE

        n += matmul_weight_bytes(Path(directory) / MODEL_FILE) - sum(w.numel() * 4 for w in linear.values())
    return n


# -- in-process decoding -----------------------------------------------------------------------------------

def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (n, length)).tolist()


def time_decode(backend, batch: int, steps: int, prompt_len: int = 16, seed: int = 0,
                sampling: SamplingParams | None = None) -> list[float]:
    """Prefill `batch` prompts, then `steps` decode steps over all of them through the backend interface the
    server drives, sampling as the scheduler does (greedy unless `sampling` says otherwise) on the torch threads
    the server gives this backend. Returns each step's seconds, sampling included."""
    if prompt_len + steps + 1 > backend.config.block_size:
        raise ValueError(f"prompt ({prompt_len}) + steps ({steps}) exceed the context ({backend.config.block_size})")
    prompts = random_prompts(batch, prompt_len, backend.tokenizer.vocab_size, seed)
    params = [sampling or SamplingParams()] * batch
    marks: list[float] = []  # after the prefill, then after each decode step
    threads = torch.get_num_threads()
    torch.set_num_threads(backend.torch_threads or threads)
    try:  # steps + 1 tokens: the last one is sampled from the last step's logits, outside the timed steps
        decode_loop(backend, prompts, steps + 1, sampler(params, [p.make_generator() for p in params]),
                    on_step=lambda: marks.append(time.perf_counter()))
    finally:
        torch.set_num_threads(threads)
    return [b - a for a, b in zip(marks, marks[1:])]


# -- the weight products alone -----------------------------------------------------------------------------

def weight_products(label: str, backend, directory: Path) -> Callable[[], None] | None:
    """One batch-1 pass of a backend's weight matrix products alone, each on its own zero input, with nothing
    between them: how near its kernels come to the roofline without the rest of a decode step. torch: the model's
    Linear modules, as prepared for decoding; ONNX: the export's matrix products in a graph of their own (over the
    export's weights, prepacked by ONNX Runtime as in the model). None on a GPU."""
    if backend.device != "cpu":
        return None
    if BACKENDS[label][0] == "torch":
        from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

        linears = [m for m in backend.model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
        dtype = next(backend.model.parameters()).dtype  # bf16 models take bf16 inputs
        inputs = [torch.zeros(1, 1, m.in_features, dtype=dtype) for m in linears]

        @torch.inference_mode()
        def torch_pass() -> None:
            for m, x in zip(linears, inputs):
                m(x)
        return torch_pass
    import onnxruntime as ort

    from export.runtime import create_session

    session = create_session(matmul_graph(directory), "cpu", torch.get_num_threads())
    binding = session.io_binding()
    for args, bind in ((session.get_inputs(), binding.bind_ortvalue_input),
                       (session.get_outputs(), binding.bind_ortvalue_output)):
        for a in args:  # ORT's own zeroed buffers, which the binding holds: no allocation per pass
            value = ort.OrtValue.ortvalue_from_shape_and_type(a.shape, np.float32)
            value.update_inplace(np.zeros(a.shape, np.float32))
            bind(a.name, value)
    return lambda: session.run_with_iobinding(binding)


def matmul_graph(export_dir: Path) -> bytes:
    """The export's weight products, each on an input of its own: x{i} (1, K) -> y{i} (1, N). fp32: its MatMuls
    over its own weights (a tied output layer keeps its Transpose of the token table, which ONNX Runtime folds, as
    in the model). int8: each MatMulInteger's weight, scale and zero point in the DynamicQuantizeMatMul that ONNX
    Runtime fuses the quantized product into (the activation's quantization included)."""
    import onnx
    from onnx import TensorProto, helper

    from export.runtime import MODEL_FILE

    model = onnx.load(str(Path(export_dir) / MODEL_FILE))
    inits = {t.name: t for t in model.graph.initializer}
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    nodes, inputs, outputs, weights = [], [], [], {}
    for n in model.graph.node:
        x, y, w = f"x{len(outputs)}", f"y{len(outputs)}", n.input[1] if len(n.input) > 1 else None
        if n.op_type == "MatMulInteger" and w in inits:
            names = [w, w.removesuffix("_quantized") + "_scale", n.input[3]]  # onnxruntime.quantization's names
            K, N = inits[w].dims
            product = helper.make_node("DynamicQuantizeMatMul", [x, *names], [y], domain="com.microsoft")
        elif n.op_type == "MatMul" and (w in inits or w in transposes):
            names = [transposes[w].input[0] if w in transposes else w]
            if w in transposes and names[0] not in weights:
                nodes.append(transposes[w])
            K, N = inits[w].dims if w in inits else reversed(inits[names[0]].dims)
            product = helper.make_node("MatMul", [x, w], [y])
        else:
            continue
        weights.update((name, inits[name]) for name in names)
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, K]))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, N]))
        nodes.append(product)
    graph = helper.make_graph(nodes, "weight_products", inputs, outputs, list(weights.values()))
    products = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return products.SerializeToString()


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write (making its folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def add_model_source(p: argparse.ArgumentParser, target: bool, default_preset: str | None = None) -> None:
    """--checkpoint or --preset (a random-init checkpoint of that shape), or with `target` a running server."""
    src = p.add_mutually_exclusive_group(required=default_preset is None)
    if target:
        src.add_argument("--target", help="host:port of a running server")
    src.add_argument("--checkpoint", help="a µLM checkpoint to serve")
    src.add_argument("--preset", default=default_preset, help="serve a random-init checkpoint of this model shape")
