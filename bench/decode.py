"""In-process decoding speed per backend, next to its roofline (the weight bytes one step reads divided by this
machine's memory read bandwidth, measured here with the same threads), and against transformers' generate().

  python -m bench.decode [--presets toy,gpt2-small] [--checkpoint DIR]
                                 [--backends torch,torch-int8,torch-bf16,onnx-fp32,onnx-int8,transformers]
                                 [--steps 32] [--batch 16]
                                 [--prompt-len 16] [--repeats 3] [--threads N] [--device cpu|cuda]
                                 [--out build/bench/decode.json] [--cache build/bench]

Random-init checkpoints of the presets are written under build/bench/checkpoints (or pass --checkpoint); ONNX
exports of them are made once and cached. Each backend decodes through the interface the server drives
(prefill, then one batched decode step per token, greedy): ms per token at batch 1 and aggregate tokens/s at
--batch. torch-int8 is the torch backend with --quantize int8 (ulm.quantize; its roofline reads int8 weights),
torch-bf16 with --quantize bf16 (the model in bf16, on a CPU with native bf16; its roofline reads bf16 weights).
transformers (when installed) runs GPT2LMHeadModel.generate() on the same weights, converted from the checkpoint
and checked against it. Repeats are interleaved with bandwidth samples; figures are medians
(the table also shows the spread of % roofline over rounds). Writes JSON and a PNG plot next to it. With
--device cuda the roofline is the GPU's (its bandwidth, measured the same way) and the int8 backends, which are
for the CPU, are skipped.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    BACKENDS,
    BENCH_DIR,
    backend_dir,
    check_device,
    ensure_checkpoint,
    machine,
    memory_bandwidth,
    parse_list,
    random_prompts,
    save_figure,
    time_decode,
    weight_bytes,
    weight_products,
)
from ulm.config import GPT_PRESETS, gpt_preset
from ulm.util import set_threads, write_json

HF = "transformers"
TARGETS = {"torch": 0.70, "onnx-fp32": 0.85}  # decode at batch 1, fraction of the roofline
INT8_SPEEDUP, HF_SPEEDUP = 2.5, 2.0
TORCH_INT8_SPEEDUP = 2.2  # torch-int8 over torch, batch 1
GPU_TOKENS_B1 = 1000  # torch on an H100-class GPU, batch 1 (CUDA graphs: server/backends/cuda_graphs.py)


# -- transformers' GPT-2 on the same weights ---------------------------------------------------------------

def hf_gpt2(model):
    """A transformers GPT2LMHeadModel holding `model`'s weights (the reverse of ulm.gpt2.convert_state)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ulm.gpt2 import ACTIVATIONS, CONV1D, RENAMES

    cfg = model.config
    if not cfg.norm_first or cfg.pos_encoding != "learned" or not cfg.bias:
        raise ValueError("transformers' GPT-2 needs a pre-norm model with learned positions and biases")
    act = {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.activation]
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                                    activation_function=act, layer_norm_epsilon=cfg.layer_norm_eps,
                                    tie_word_embeddings=cfg.tie_weights, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    ours = {v: k for k, v in RENAMES.items()}
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            stem, kind = rest.rsplit(".", 1)
            hf_rest = f"{ours[stem]}.{kind}"
            state[f"transformer.h.{i}.{hf_rest}"] = t.t() if hf_rest in CONV1D else t
        elif name == "lm_head.weight":
            state[name] = t
        else:
            hf_name = {"embed.tok.weight": "wte.weight", "embed.pos.weight": "wpe.weight"}.get(name, name)
            state[f"transformer.{hf_name}"] = t
    hf.load_state_dict(state, strict=False)  # strict=False: the tied lm_head, the attention mask buffers
    hf.eval()
    idx = torch.tensor(random_prompts(1, min(8, cfg.block_size), cfg.vocab_size))
    with torch.inference_mode():
        diff = float((hf(idx).logits - model(idx)).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"transformers' GPT-2 does not reproduce the checkpoint (max |dlogits| {diff:.2e})")
    return hf


def time_hf(hf, batch: int, steps: int, prompt_len: int) -> float:
    """Seconds per decode step of generate() (greedy): a run of steps + 1 new tokens minus a run of 1 (its
    prefill and first token)."""
    ids = torch.tensor(random_prompts(batch, prompt_len, hf.config.vocab_size), device=hf.device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    return (run(steps + 1) - run(1)) / steps


# -- the runs ----------------------------------------------------------------------------------------------

class Runner:
    """One backend, loaded once: seconds per decode step at a batch size, the weight bytes a step reads, and
    (on the CPU, transformers aside) seconds per pass of its weight products alone."""

    def __init__(self, label: str, checkpoint: Path, args):
        from server.backends import load_backend
        from server.backends.base import warmup
        from ulm.checkpoint import load_checkpoint

        self.label, self.args = label, args
        if label == HF:
            model = load_checkpoint(checkpoint)[0]
            self.hf, cfg, directory = hf_gpt2(model).to(args.device), model.config, checkpoint
            self.device = args.device
            del model
        else:
            kind, directory = backend_dir(label, checkpoint, Path(args.cache))
            quantize = BACKENDS[label][1] if kind == "torch" else None  # ONNX: the export is quantized already
            self.backend = load_backend(kind, directory, args.device, max_batch=args.batch, quantize=quantize)
            warmup(self.backend)
            cfg, self.device = self.backend.config, self.backend.device  # ONNX falls back to the CPU
        self.products = None if label == HF else weight_products(label, self.backend, directory)
        self.config = cfg
        self.weight_bytes = weight_bytes("torch" if label == HF else label, directory, cfg)

    def step_s(self, batch: int) -> float:
        a = self.args
        if self.label == HF:
            return time_hf(self.hf, batch, a.steps, a.prompt_len)
        return statistics.fmean(time_decode(self.backend, batch, a.steps, a.prompt_len))

    def products_s(self) -> float:
        times = []
        for _ in range(self.args.steps):
            t = time.perf_counter()
            self.products()
            times.append(time.perf_counter() - t)
        return statistics.fmean(times)


def measure(runners: dict[str, Runner], args) -> dict[str, list[dict]]:
    """Rounds over every backend in turn, after an untimed run of each, each run between two bandwidth samples:
    the machine's load and its memory bandwidth drift over seconds, so each run is compared with its own
    surroundings (and backends with each other within a round)."""
    rounds: dict[str, list[dict]] = {label: [] for label in runners}
    for label, runner in runners.items():  # untimed: a first batch-16 run took ONNX Runtime ~40-90% longer
        print(f"  warm-up: {label}", flush=True)
        runner.step_s(1)
        runner.step_s(args.batch)
    for r in range(args.repeats):
        for label, runner in runners.items():
            print(f"  round {r + 1}/{args.repeats}: {label}", flush=True)
            before = memory_bandwidth(device=runner.device)
            b1 = runner.step_s(1)
            products = runner.products_s() if runner.products else None
            bw = (before + memory_bandwidth(device=runner.device)) / 2
            roofline_s = runner.weight_bytes / bw / 1e9
            rounds[label].append({"bandwidth_gbps": bw, "s_per_token_b1": b1,
                                  "s_per_step_batch": runner.step_s(args.batch),
                                  "fraction_of_roofline": roofline_s / b1})
            if products is not None:
                rounds[label][-1].update(s_products_b1=products, products_fraction_of_roofline=roofline_s / products)
    return rounds


def summary(label: str, runner: Runner, rounds: list[dict], batch: int) -> dict:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    roofline_ms = runner.weight_bytes / med["bandwidth_gbps"] / 1e6
    return {"backend": label, "device": runner.device, "weight_bytes": runner.weight_bytes,
            "bandwidth_gbps": med["bandwidth_gbps"], "roofline_ms": roofline_ms,
            "ms_per_token": 1e3 * med["s_per_token_b1"],
            "fraction_of_roofline": med["fraction_of_roofline"],
            "fraction_of_roofline_range": [min(r["fraction_of_roofline"] for r in rounds),
                                           max(r["fraction_of_roofline"] for r in rounds)], "batch": batch,
            "tokens_per_s_batch": batch / med["s_per_step_batch"],
            "roofline_tokens_per_s_batch": batch * 1e3 / roofline_ms,
            # the weight products alone (on the CPU, transformers aside); None where not measured
            "products_ms": 1e3 * med["s_products_b1"] if "s_products_b1" in med else None,
            "products_fraction_of_roofline": med.get("products_fraction_of_roofline"), "rounds": rounds}


def targets(rounds: dict[str, list[dict]], batch: int, device: str = "cpu") -> list[dict]:
    """Each figure against its target; ratios between backends are medians of per-round ratios."""
    out = []

    def add(name: str, values: list[float], target: float, unit: str = "x") -> None:
        v = statistics.median(values)
        out.append({"name": name, "value": v, "target": target, "unit": unit, "met": v >= target,
                    "rounds_met": sum(x >= target for x in values), "rounds": len(values)})

    def ratio(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(rounds[a], rounds[b])]

    for label, frac in TARGETS.items():
        if label in rounds:
            add(f"{label} decode batch 1, fraction of roofline",
                [r["fraction_of_roofline"] for r in rounds[label]], frac, "%")
    if "onnx-int8" in rounds and "onnx-fp32" in rounds:
        add("onnx-int8 speed-up over onnx-fp32, batch 1", ratio("onnx-fp32", "onnx-int8", "s_per_token_b1"),
            INT8_SPEEDUP)
    if "torch-int8" in rounds and "torch" in rounds:
        add("torch-int8 speed-up over torch, batch 1", ratio("torch", "torch-int8", "s_per_token_b1"),
            TORCH_INT8_SPEEDUP)
    if "torch-bf16" in rounds and "torch" in rounds:  # worth choosing where it is faster at all
        add("torch-bf16 speed-up over torch, batch 1", ratio("torch", "torch-bf16", "s_per_token_b1"), 1.0)
    if "torch" in rounds and "onnx-fp32" in rounds:
        add(f"torch over onnx-fp32, aggregate tokens/s at batch {batch}", ratio("onnx-fp32", "torch",
                                                                                 "s_per_step_batch"), 1.0)
    if device == "cuda" and "torch" in rounds:
        add("torch tokens/s at batch 1 on the GPU (set for H100-class)",
            [1 / r["s_per_token_b1"] for r in rounds["torch"]], GPU_TOKENS_B1, " tokens/s")
    if HF in rounds:
        for label in ("torch", "onnx-fp32"):
            if label in rounds:
                add(f"{label} vs transformers generate(), per token at batch 1", ratio(HF, label, "s_per_token_b1"),
                    HF_SPEEDUP)
                add(f"{label} vs transformers generate(), aggregate tokens/s at batch {batch}",
                    ratio(HF, label, "s_per_step_batch"), HF_SPEEDUP)
    return out


def gpt2_small_shape(cfg) -> bool:
    """The targets are set for GPT-2 small's shape; smaller models are bound by per-operation overheads."""
    ref = gpt_preset("gpt2-small")
    return all(getattr(cfg, k) == getattr(ref, k) for k in ("vocab_size", "n_layer", "n_head", "n_embd", "d_ff"))


def report(preset: str, rows: dict[str, dict], goals: list[dict], batch: int, shaped: bool, device: str) -> None:
    host = machine()
    where = torch.cuda.get_device_name() if device == "cuda" else f"{host['cpu']}, {host['threads']} thread(s)"
    print(f"\n{preset}: {where}, load average {host['load_avg_1m']}; medians over rounds; roofline = weight "
          f"bytes / memory read bandwidth measured around each run")
    print(f"{'backend':<13}{'device':>7}{'weights MB':>11}{'GB/s':>6}{'roofline ms':>12}{'ms/token':>10}"
          f"{'% roofline':>11}{'(rounds)':>11}{'products alone':>15}{f'tok/s b{batch}':>12}{f'roofline b{batch}':>14}")
    for r in rows.values():
        lo, hi = (round(100 * f) for f in r["fraction_of_roofline_range"])
        alone = (f"{r['products_ms']:.2f} ms {100 * r['products_fraction_of_roofline']:.0f}%"
                 if r["products_ms"] is not None else "-")
        print(f"{r['backend']:<13}{r['device']:>7}{r['weight_bytes'] / 1e6:>11.1f}{r['bandwidth_gbps']:>6.1f}"
              f"{r['roofline_ms']:>12.2f}{r['ms_per_token']:>10.2f}{100 * r['fraction_of_roofline']:>10.0f}%"
              f"{f'{lo}-{hi}%':>11}{alone:>15}"
              f"{r['tokens_per_s_batch']:>12.0f}{r['roofline_tokens_per_s_batch']:>14.0f}")
    bandwidths = [x["bandwidth_gbps"] for r in rows.values() for x in r["rounds"]]
    print(f"  memory read bandwidth over the rounds: {min(bandwidths):.0f}-{max(bandwidths):.0f} GB/s (each round's "
          f"roofline moves with it)")
    if any(r["products_ms"] is not None for r in rows.values()):
        print("  products alone: one pass of the backend's weight matrix products at batch 1 with nothing between "
              "them, against the same roofline (the kernels' share of the gap)")
    if not shaped or device != "cpu":
        print("  (the targets are set for the GPT-2-small shape on a 2-core CPU; shown for reference)")
    for g in goals:
        unit = g["unit"]
        scale = 100 if unit == "%" else 1
        print(f"  {g['name']}: {scale * g['value']:.{2 if unit == 'x' else 1}f}{unit} "
              f"(target >= {scale * g['target']:g}{unit}: {'met' if g['met'] else 'NOT met'}; "
              f"met in {g['rounds_met']} of {g['rounds']} rounds)")


def plot(results: list[dict], batch: int, path: Path) -> Path:
    """Per preset: ms/token at batch 1 and tokens/s at `batch` for each backend, next to its roofline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6 * len(results)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 2, squeeze=False)
    for (left, right), run in zip(axes, results):
        rows = run["backends"]
        names = [r["backend"] for r in rows]
        for ax, key, roof, title in ((left, "ms_per_token", "roofline_ms", "ms per token, batch 1 (lower is better)"),
                                     (right, "tokens_per_s_batch", "roofline_tokens_per_s_batch",
                                      f"tokens/s, batch {batch} (higher is better)")):
            bars = ax.bar(names, [r[key] for r in rows], color="tab:blue", label="measured")
            ax.scatter(names, [r[roof] for r in rows], marker="_", s=900, color="tab:red", zorder=3,
                       label="roofline (weight bytes / bandwidth)")
            if key == "ms_per_token":
                ax.bar_label(bars, [f"{100 * r['fraction_of_roofline']:.0f}%" for r in rows], fontsize=8)
                alone = [r for r in rows if r["products_ms"] is not None]
                if alone:
                    ax.scatter([r["backend"] for r in alone], [r["products_ms"] for r in alone], marker="x",
                               color="black", zorder=3, label="weight products alone")
            ax.set_ylim(0, 1.25 * max(r[k] for r in rows for k in (key, roof)))  # room for the legend
            ax.set_title(f"{run['preset']}: {title}", fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="toy,gpt2-small", help="comma-separated GPT presets (random init)")
    p.add_argument("--checkpoint", help="benchmark this checkpoint instead of the presets")
    p.add_argument("--backends", default=",".join([*BACKENDS, HF]))
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together for the aggregate figure")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's, one per core)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the int8 export is skipped on cuda)")
    p.add_argument("--out", default=str(BENCH_DIR / "decode.json"))
    p.add_argument("--cache", default=str(BENCH_DIR), help="where preset checkpoints and ONNX exports are kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backends = parse_list(args.backends, choices=[*BACKENDS, HF], name="backends")
        presets = [] if args.checkpoint else parse_list(args.presets, choices=list(GPT_PRESETS), name="presets")
        backends = check_device(args.device, backends)
        for name in ("steps", "batch", "prompt_len", "repeats"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if HF in backends:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("transformers is not installed: skipping the generate() comparison", file=sys.stderr)
                backends.remove(HF)
        if args.threads:  # else torch's own default
            set_threads(args.threads)
        runs = [(args.checkpoint, Path(args.checkpoint))] if args.checkpoint else \
            [(p, ensure_checkpoint(p, Path(args.cache))) for p in presets]
        results = []
        for name, ckpt in runs:
            print(f"{name}: loading {', '.join(backends)}", flush=True)
            runners = {label: Runner(label, ckpt, args) for label in backends}
            rounds = measure(runners, args)
            rows = {label: summary(label, runners[label], rounds[label], args.batch) for label in backends}
            goals = targets(rounds, args.batch, args.device)
            shaped = gpt2_small_shape(next(iter(runners.values())).config)
            report(name, rows, goals, args.batch, shaped, args.device)
            results.append({"preset": name, "checkpoint": str(ckpt), "gpt2_small_shape": shaped,
                            "backends": list(rows.values()), "targets": goals})
            del runners
            gc.collect()
    except (ValueError, OSError) as e:
        print(f"bench_decode: error: {e}", file=sys.stderr)
        return 2
    out = write_json(Path(args.out), {"machine": machine(), "device": args.device, "steps": args.steps,
                                      "batch": args.batch, "prompt_len": args.prompt_len, "repeats": args.repeats,
                                      "results": results})
    png = plot(results, args.batch, out.with_suffix(".png"))
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
