"""`python -m export`: checkpoint -> verified ONNX export directory, optionally int8-quantized.

Steps: load the checkpoint; export the fp32 graph; verify it against PyTorch (logits parity, greedy tokens);
with --quantize int8, quantize the MatMul weights and measure the size and perplexity change; write the
directory. Everything is built in a staging folder inside the output directory and moved into place at the
end, manifest.json last, so a directory with a manifest always holds a complete, verified export.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.onnx_export import DEFAULT_OPSET, check_opset, export_onnx
from export.quantize import matmul_weight_bytes, model_bytes, quantize_int8
from export.runtime import (
    CONFIG_FILE,
    DATA_FILE,
    FORMAT,
    INT8_WEIGHT_BITS,
    MANIFEST,
    MODEL_FILE,
    REPORT_FILE,
    create_session,
    file_entries,
    input_names,
    present_names,
)
from export.verify import ATOL, check_greedy, check_parity, eval_windows, parity_case, perplexity_ort, perplexity_torch
from ulm.checkpoint import WEIGHTS_FILE, load_checkpoint
from ulm.data.dataset import load_manifest, load_split
from ulm.model import GPT
from ulm.tokenizer import TOKENIZER_FILE, TOKENIZER_META, Tokenizer
from ulm.util import file_sha256, write_json

QUANTIZE = ("int8",)
PPL_TOLERANCE = 0.02  # relative perplexity increase int8 vs fp32 accepted without a warning
GREEDY_PROMPT = "The "
FILES = [MODEL_FILE, DATA_FILE, TOKENIZER_FILE, TOKENIZER_META, CONFIG_FILE, REPORT_FILE]  # manifest.json lists them


@dataclass
class ExportOptions:
    checkpoint: str
    out: str
    quantize: str | None = None  # None | "int8"
    opset: int = DEFAULT_OPSET
    per_channel: bool = False
    eval_data: str | None = None  # dataset directory (val split) or text file (last 10%); None: the checkpoint's
    eval_tokens: int = 32768
    atol: float = ATOL
    threads: int | None = None
    log: Callable[[str], None] = field(default=print, repr=False)


class VerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


def export_checkpoint(opts: ExportOptions) -> dict:
    """Run every step; returns the manifest written to opts.out/manifest.json."""
    say = opts.log
    src, out = check_options(opts)
    steps = 5 if opts.quantize else 4
    t0 = time.perf_counter()

    def step(i: int, what: str) -> None:
        say(f"[{i}/{steps}] {what} ({time.perf_counter() - t0:.1f}s)")

    step(1, f"loading checkpoint {src}")
    model, tokenizer, meta = load_checkpoint(src, device="cpu", dtype=torch.float32)
    cfg = model.config
    say(f"      {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, vocab {cfg.vocab_size}, "
        f"context {cfg.block_size}")
    if opts.eval_data is None and meta.get("dataset") and Path(meta["dataset"]).is_dir():
        opts = replace(opts, eval_data=meta["dataset"])  # the dataset it was trained on (ulm train records it)
        say(f"      evaluation data: {opts.eval_data} (the checkpoint's dataset, val split)")
    eval_tokens = read_eval_tokens(opts.eval_data, tokenizer, opts.eval_tokens) if opts.eval_data else None

    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    stage = out / f".staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "fp32").mkdir(parents=True)
    try:
        step(2, f"exporting the fp32 graph (opset {opts.opset})")
        fp32_path = export_onnx(model, stage / "fp32", opts.opset)
        say(f"      {fp32_path.name} + {DATA_FILE}: {model_bytes(fp32_path) / 2**20:.1f} MiB")

        step(3, "verifying ONNX Runtime against PyTorch (fp32)")
        session = create_session(fp32_path, "cpu", opts.threads)
        report = {"float32": verify_fp32(model, tokenizer, session, opts.atol, say)}
        if eval_tokens is not None:
            report["float32"]["perplexity"] = measure_perplexity(model, session, eval_tokens, opts, say, True)
        write_json(stage / REPORT_FILE, report)
        if not report["float32"]["passed"]:
            shutil.copy(stage / REPORT_FILE, out / REPORT_FILE)
            raise VerificationError(f"the exported graph does not match PyTorch; report: {out / REPORT_FILE}")

        final = fp32_path
        if opts.quantize == "int8":
            step(4, "quantizing MatMul weights to int8 (dynamic quantization)")
            final = quantize_and_verify(model, tokenizer, fp32_path, stage, report, eval_tokens, opts)

        step(steps, f"writing {out}")
        manifest = write_export(out, stage, final, model, tokenizer, meta, report, opts)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    say(f"done in {time.perf_counter() - t0:.1f}s: {out} ({manifest['dtype']})")
    return manifest


def check_options(opts: ExportOptions) -> tuple[Path, Path]:
    """(checkpoint, out) once the options are known to be valid."""
    if opts.quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {opts.quantize!r}")
    check_opset(opts.opset)
    src, out = Path(opts.checkpoint), Path(opts.out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --checkpoint (the export writes its own config.json)")
    return src, out


def quantize_and_verify(model, tokenizer, fp32_path: Path, stage: Path, report: dict, eval_tokens,
                        opts: ExportOptions) -> Path:
    """The int8 graph in stage/int8, its verification added to `report` (and written)."""
    (stage / "int8").mkdir()
    final = quantize_int8(fp32_path, stage / "int8", opts.per_channel)
    fp32_ppl = report["float32"].get("perplexity", {}).get("onnx")
    report["int8"] = verify_int8(model, tokenizer, fp32_path, final, fp32_ppl, eval_tokens, opts, opts.log)
    write_json(stage / REPORT_FILE, report)
    return final


def check_out_dir(out: Path) -> None:
    """Refuse to write into a directory that holds anything but a (previous) export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    ours = (*FILES, MANIFEST)
    stray = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".staging-"))
    if stray:
        raise ValueError(f"--out {out} holds files that are not part of an export ({', '.join(stray[:5])}); "
                         "choose a new or an export directory")


def verify_fp32(model: GPT, tokenizer: Tokenizer, session: ort.InferenceSession, atol: float, say) -> dict:
    def show(c: dict) -> None:
        say(f"      batch {c['batch']} past {c['past_lens']} +{c['new_tokens']}: max |dlogits| "
            f"{c['max_abs_diff']:.2e}")

    parity = check_parity(model, session, atol, on_case=show)
    say(f"      parity: max |dlogits| {parity['max_abs_diff']:.2e} (<= {atol:g}: "
        f"{'ok' if parity['passed'] else 'FAILED'})")
    greedy = check_greedy(model, session, tokenizer.encode(GREEDY_PROMPT))
    say(f"      greedy: {greedy['steps']} steps {'identical' if greedy['identical'] else 'DIFFER'} "
        f"(agreeing prefix {greedy['agreeing_prefix']})")
    return {"parity": parity, "greedy": greedy, "passed": parity["passed"] and greedy["identical"]}


def verify_int8(model: GPT, tokenizer: Tokenizer, fp32_path: Path, int8_path: Path, fp32_ppl: float | None,
                eval_tokens: np.ndarray | None, opts: ExportOptions, say) -> dict:
    w32, w8 = matmul_weight_bytes(fp32_path), matmul_weight_bytes(int8_path)
    f32, f8 = model_bytes(fp32_path), model_bytes(int8_path)
    size = {"matmul_weight_bytes": {"float32": w32, "int8": w8, "ratio": w32 / w8},
            "model_bytes": {"float32": f32, "int8": f8, "ratio": f32 / f8}}
    say(f"      MatMul weights {w32 / 2**20:.2f} -> {w8 / 2**20:.2f} MiB ({w32 / w8:.2f}x); "
        f"model files {f32 / 2**20:.2f} -> {f8 / 2**20:.2f} MiB ({f32 / f8:.2f}x)")
    session = create_session(int8_path, "cpu", opts.threads)
    rng = np.random.default_rng(0)
    n = max(2, min(64, model.config.block_size // 2))
    rows = [rng.integers(0, model.config.vocab_size, n + 1).tolist() for _ in range(2)]
    drift = parity_case(model, session, rows, [n, n])
    greedy = check_greedy(model, session, tokenizer.encode(GREEDY_PROMPT))
    say(f"      int8 vs PyTorch fp32: max |dlogits| {drift:.3f}; greedy agreeing prefix "
        f"{greedy['agreeing_prefix']}/{greedy['steps']}")
    report = {"per_channel": opts.per_channel, "size": size, "max_abs_logits_diff_vs_torch": drift, "greedy": greedy}
    if eval_tokens is None:
        say("      (perplexity not measured: pass --eval-data to compare int8 with fp32)")
        return report
    ppl = measure_perplexity(model, session, eval_tokens, opts, say, False)
    ppl["float32"] = fp32_ppl
    ppl["relative_change"] = change = ppl["onnx"] / fp32_ppl - 1
    report["perplexity"] = ppl
    say(f"      int8 perplexity {ppl['onnx']:.4f} vs fp32 {fp32_ppl:.4f}: {100 * change:+.2f}%")
    if change > PPL_TOLERANCE:
        say(f"      warning: int8 perplexity is more than {100 * PPL_TOLERANCE:g}% above fp32; try --per-channel")
    return report


def measure_perplexity(model: GPT, session, tokens: np.ndarray, opts: ExportOptions, say, torch_too: bool) -> dict:
    windows = eval_windows(tokens, model.config.block_size, opts.eval_tokens)
    res = {"data": opts.eval_data, "tokens": int(windows[:, 1:].size),
           "onnx": perplexity_ort(session, model.config, windows)}
    if torch_too:
        res["torch"] = perplexity_torch(model, windows)
        say(f"      perplexity over {res['tokens']} tokens: onnx {res['onnx']:.4f}, torch {res['torch']:.4f}")
    return res


def read_eval_tokens(path: str, tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
    """Held-out tokens: a µLM dataset directory's val split, or the last 10% of a text file."""
    p = Path(path)
    if p.is_dir():
        load_manifest(p)  # a clear error when it is not a dataset
        return np.asarray(load_split(p, "val")[: max_tokens + 1], np.int64)
    if not p.is_file():
        raise ValueError(f"--eval-data {p}: no such file or directory")
    text = p.read_text(encoding="utf-8", errors="replace")
    return np.asarray(tokenizer.encode(text[int(len(text) * 0.9):], add_bos=False)[: max_tokens + 1], np.int64)


def write_export(out: Path, stage: Path, model_path: Path, model: GPT, tokenizer: Tokenizer, meta: dict,
                 report: dict, opts: ExportOptions) -> dict:
    """Move the chosen graph into `out`, add tokenizer, config and report, then the manifest."""
    for name in (MODEL_FILE, DATA_FILE):
        os.replace(model_path.with_name(name), stage / name)
    tokenizer.save(stage)
    extra = {k: v for k, v in meta.items() if k not in ("format", "model_type", "model")}
    write_json(stage / CONFIG_FILE, {"format": FORMAT, "model_type": "gpt", "model": model.config.to_dict(),
                                     "checkpoint": extra})
    for name in FILES:
        os.replace(stage / name, out / name)
    src = Path(opts.checkpoint)
    manifest = {
        "format": FORMAT,
        **({"name": meta["name"]} if meta.get("name") else {}),  # the served model name, as for checkpoints
        "dtype": "int8" if opts.quantize == "int8" else "float32",
        **({"quantization": {"weight_bits": INT8_WEIGHT_BITS, "per_channel": opts.per_channel}}
           if opts.quantize == "int8" else {}),
        "model_file": MODEL_FILE,
        "opset": opts.opset,
        "num_params": model.num_params(),
        "inputs": input_names(model.config.n_layer),
        "outputs": ["logits", *present_names(model.config.n_layer)],
        "source": {"checkpoint": str(src.resolve()), "sha256": file_sha256(src / WEIGHTS_FILE)},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "verification": report,
        "files": file_entries(out, FILES),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
