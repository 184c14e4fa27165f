"""`python -m export`: the graph against PyTorch (past lengths, batches, padding, greedy decoding), the export
directory (files, hashes, report), int8 quantization on a quickly trained model, and errors."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from trained_model import train_char_model

from export.__main__ import main
from export.onnx_export import export_onnx
from export.pipeline import ExportOptions, export_checkpoint
from export.runtime import (
    ExportError,
    check_files,
    create_session,
    empty_cache,
    input_names,
    present_names,
    read_export,
    run,
)
from export.verify import check_greedy, check_parity, ort_greedy
from ulm.checkpoint import load_checkpoint, save_checkpoint
from ulm.config import GPTConfig
from ulm.generate import generate_ids
from ulm.kv_cache import KVCache
from ulm.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")

# Bound asserted for the int8 model the test trains (2 layers, n_embd 64, 200 steps on a synthetic grammar):
# relative perplexity increase <= 1%. Measured on a Zen 3 host (no VNNI): +0.34% (7-bit weights, per tensor).
PPL_BOUND = 0.01


@pytest.fixture(scope="module")
def exported(toy_onnx_export):
    return toy_onnx_export, json.loads((toy_onnx_export / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model(toy_checkpoint):
    return load_checkpoint(toy_checkpoint)[0]


@pytest.fixture(scope="module")
def session(exported):
    return create_session(exported[0] / "model.onnx", threads=1)


def test_export_directory(exported, toy_checkpoint):
    out, manifest = exported
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json", "verify_report.json",
            "manifest.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"
    check_files(out)  # every SHA-256 in the manifest matches
    assert set(manifest["files"]) >= {"model.onnx", "model.onnx.data", "config.json", "verify_report.json"}
    report = json.loads((out / "verify_report.json").read_text())
    assert report == manifest["verification"]
    assert report["float32"]["passed"] and report["float32"]["greedy"]["identical"]
    assert report["float32"]["parity"]["max_abs_diff"] <= 1e-4
    manifest2, cfg, tok = read_export(out)
    ref_model, ref_tok, _ = load_checkpoint(toy_checkpoint)
    assert cfg == ref_model.config and tok.encode("héllo") == ref_tok.encode("héllo")
    assert manifest2["dtype"] == "float32"


def test_graph_signature_has_dynamic_axes(exported, model):
    g = onnx.load(str(exported[0] / "model.onnx"), load_external_data=False).graph
    n = model.config.n_layer

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [i.name for i in g.input] == input_names(n)
    assert [o.name for o in g.output] == ["logits", *present_names(n)]
    shapes = {v.name: dims(v) for v in [*g.input, *g.output]}
    nh, hs = model.config.n_head, model.config.head_dim
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["past_lengths"] == ["batch"]
    assert shapes["past_key_values.0.key"] == ["batch", nh, "cache_length", hs]
    assert shapes["present.1.value"] == ["batch", nh, "cache_length", hs]
    assert shapes["logits"] == ["batch", "num_logits", model.config.vocab_size]
    # the weights live in the external data file, not in the graph
    assert (exported[0] / "model.onnx.data").stat().st_size > 4 * model.num_params() * 0.9


def test_optimized_graph_is_fused(exported, model, tmp_path):
    """Per layer, ONNX Runtime runs 4 MatMuls (the first with its bias Add), two TensorScatters writing the new
    keys/values into the cache (each after a Reshape and a Transpose to heads), one MultiHeadAttention (mask
    included), two SkipLayerNormalizations (residual Add + bias + LayerNorm) and one FastGelu (with fc's bias)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(exported[0] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    n = model.config.n_layer
    assert (ops["MultiHeadAttention"], ops["SkipLayerNormalization"], ops["FastGelu"]) == (n, 2 * n, n)
    assert (ops["TensorScatter"], ops["Transpose"]) == (2 * n, 2 * n)
    assert ops["MatMul"] == 4 * n + 1  # the Linear layers and the output layer
    assert ops["Add"] == n + 2  # q/k/v biases, the embeddings' sum, the positions: the rest is in fused nodes
    assert ops["Concat"] <= 1 and not {"Softmax", "Tanh"} & ops.keys()  # Concat: one shape for every layer


@torch.inference_mode()
@pytest.mark.parametrize("past_lens,new", [([0], 5), ([1], 1), ([40], 3), ([0, 0], 4), ([1, 1, 1], 1),
                                           ([40, 7, 0, 1], 1), ([40, 25], 6)])
def test_parity_with_pytorch_at_varying_past_and_batch(model, session, past_lens, new):
    """Each row's past comes from its own batch-1 ORT call; the rows then share one cache, noise beyond each
    row's length (export.verify's rows come from one padded call), and take `new` tokens each at its own length;
    reference: a full forward pass per row."""
    cfg = model.config
    rng = np.random.default_rng(len(past_lens) * 100 + new)
    rows = [rng.integers(0, cfg.vocab_size, p + new).tolist() for p in past_lens]
    B, L = len(rows), max(past_lens) + new + 3
    cache = [rng.normal(0, 100, (B, cfg.n_head, L, cfg.head_dim)).astype(np.float32) for _ in range(2 * cfg.n_layer)]
    for b, (row, p) in enumerate(zip(rows, past_lens)):
        if p:
            _, present = run(session, [row[:p]], [0], [[p - 1]], empty_cache(cfg, 1, p))
            for dst, src in zip(cache, present):
                dst[b, :, :p] = src[0]
    ids = [row[p:] for row, p in zip(rows, past_lens)]
    logits, present = run(session, ids, past_lens, [list(range(new))] * B, cache)
    assert logits.shape == (B, new, cfg.vocab_size)
    assert present[0].shape == (B, cfg.n_head, L, cfg.head_dim)
    for b, (row, p) in enumerate(zip(rows, past_lens)):
        ref = model(torch.tensor([row]))[0, p:].numpy()
        assert np.abs(logits[b] - ref).max() <= 1e-4, (b, past_lens)
        beyond = p + new
        assert all(np.array_equal(a[b, :, beyond:], c[b, :, beyond:]) for a, c in zip(present, cache))  # untouched


@torch.inference_mode()
def test_present_equals_pytorch_kv_cache(model, session):
    """The graph's present keys/values are the ones GPT.forward writes into a KVCache."""
    cfg = model.config
    ids = list(range(3, 20))
    cache = KVCache.for_model(cfg, 1, 32)
    model(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    _, present = run(session, [ids], [0], [[0]], empty_cache(cfg, 1, len(ids)))
    for i in range(cfg.n_layer):
        assert np.abs(present[2 * i][0] - cache.k[i, 0, :, :len(ids)].numpy()).max() < 1e-5
        assert np.abs(present[2 * i + 1][0] - cache.v[i, 0, :, :len(ids)].numpy()).max() < 1e-5


def test_greedy_64_steps_identical(model, session, toy_checkpoint):
    _, tok, _ = load_checkpoint(toy_checkpoint)
    for prompt in ("Once upon", "x"):
        ids = tok.encode(prompt)
        assert ort_greedy(session, model.config, ids, 64) == generate_ids(model, ids, 64)


def test_other_architectures(tmp_path):
    """Post-norm, sinusoidal positions, ReLU, no biases, untied output layer: the other branches of the graph."""
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=300, block_size=96, n_layer=2, n_head=2, n_embd=64, pos_encoding="sinusoidal",
                    norm_first=False, activation="relu", tie_weights=False, bias=False)
    m = GPT(cfg).eval()
    session = create_session(export_onnx(m, tmp_path), threads=1)
    parity = check_parity(m, session)
    assert parity["passed"] and len(parity["cases"]) == 12, parity
    assert check_greedy(m, session, [1, 2, 3])["identical"]


# -- int8 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A char-level model trained for a few seconds on a small synthetic grammar, and held-out text."""
    model, tok, val = train_char_model(5000)  # --eval-data reads the last 10%
    d = tmp_path_factory.mktemp("trained")
    save_checkpoint(d / "ckpt", model, tok)
    (d / "val.txt").write_text(val)
    return d


@pytest.fixture(scope="module")
def quantized(trained):
    out = trained / "int8"
    lines: list[str] = []
    manifest = export_checkpoint(ExportOptions(str(trained / "ckpt"), str(out), quantize="int8", threads=1,
                                               eval_data=str(trained / "val.txt"), log=lines.append))
    return out, manifest, lines


def test_int8_is_smaller_and_keeps_perplexity(quantized):
    out, manifest, lines = quantized
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == ["[1/5", "[2/5", "[3/5", "[4/5", "[5/5"]
    assert manifest["dtype"] == "int8"
    report = manifest["verification"]
    assert report["float32"]["passed"]  # the fp32 graph was verified before quantizing
    q = report["int8"]
    assert q["size"]["matmul_weight_bytes"]["ratio"] >= 3.0
    assert q["size"]["model_bytes"]["ratio"] > 1.5
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops  # quantization keeps the fused operators
    ppl = q["perplexity"]
    assert ppl["tokens"] > 10_000
    assert ppl["float32"] < 4.0, "the fp32 model should have learned the grammar"
    assert abs(ppl["float32"] - report["float32"]["perplexity"]["torch"]) < 1e-3 * ppl["float32"]
    assert ppl["relative_change"] <= PPL_BOUND, ppl
    assert any("int8 perplexity" in line for line in lines)


def test_int8_weights_cannot_saturate_on_any_cpu(quantized):
    """Every quantized weight is in [-64, 64]: a pair of u8 x s8 products then fits the int16 sums of ONNX
    Runtime's kernel for CPUs without VNNI (2 * 255 * 64 < 2**15), so the export is accurate on every host."""
    out, manifest, _ = quantized
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node
               if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and n.input[1] in inits]
    assert len(weights) == 2 * 4 + 1  # every Linear of the 2 blocks and the output layer
    for w in weights:
        assert w.dtype == np.int8 and -64 <= w.min() and w.max() <= 64
        assert 2 * 255 * int(np.abs(w.astype(np.int32)).max()) < 2**15
    assert manifest["quantization"]["weight_bits"] == 7


def test_int8_export_with_full_range_weights_is_refused(quantized, tmp_path):
    out, manifest, _ = quantized
    old = tmp_path / "old-int8"
    shutil.copytree(out, old)
    before = {k: v for k, v in manifest.items() if k != "quantization"}  # what exports before 7-bit weights wrote
    (old / "manifest.json").write_text(json.dumps(before))
    with pytest.raises(ExportError, match="8-bit weights.*export --quantize int8"):
        read_export(old)


def test_int8_session_perplexity_matches_report(quantized, trained):
    """Recompute the int8 perplexity independently of the pipeline."""
    out, manifest, _ = quantized
    _, cfg, tok = read_export(out)
    val = (trained / "val.txt").read_text()
    ids = np.array(tok.encode(val[int(len(val) * 0.9):], add_bos=False))  # what --eval-data reads
    n = (len(ids) - 1) // cfg.block_size * cfg.block_size
    x, y = ids[:n].reshape(-1, cfg.block_size), ids[1:n + 1].reshape(-1, cfg.block_size)
    session = create_session(out / "model.onnx", threads=1)
    logits, _ = run(session, x, np.zeros(len(x)), np.broadcast_to(np.arange(cfg.block_size), x.shape),
                    empty_cache(cfg, len(x), cfg.block_size))
    nll = F.cross_entropy(torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(y).flatten())
    assert abs(float(nll.exp()) / manifest["verification"]["int8"]["perplexity"]["onnx"] - 1) < 1e-3


# -- errors -------------------------------------------------------------------------------------------------


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_incompatible_checkpoint_is_a_clear_error(toy_checkpoint, exported, tmp_path, capsys):
    assert main(["--checkpoint", str(exported[0]), "--out", str(tmp_path / "a")]) == 2  # an export, not a ckpt
    assert "not a µLM GPT checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(toy_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["n_embd"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "does not match its config" in capsys.readouterr().err
    assert main(["--checkpoint", str(toy_checkpoint), "--out", str(tmp_path / "c"), "--opset", "13"]) == 2
    assert "opset must be >= 24" in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    assert main(["--checkpoint", str(toy_checkpoint), "--out", str(tmp_path / "d")]) == 2
    assert "not part of an export (notes.txt)" in capsys.readouterr().err


def test_backend_dir_errors(toy_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="run `python -m export`"):
        read_export(toy_checkpoint)
    with pytest.raises(ExportError, match="does not exist"):
        read_export(tmp_path / "missing")
