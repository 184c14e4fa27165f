"""Benchmark scripts: smoke runs on the toy checkpoint (result files and their keys; no timing assertions), and
the pieces whose correctness the figures rest on (the decode weight layout, the transformers twin, weight bytes)."""
from __future__ import annotations

import hashlib
import json
import statistics

import numpy as np
import pytest
import torch

from bench import decode as bench_decode
from bench import serving as bench_serving
from bench import train as bench_train
from bench.common import check_device, ensure_export, matmul_graph, time_decode, weight_bytes
from export.quantize import quantize_int8
from export.runtime import FORMAT, create_session
from server.backends.torch_backend import TorchBackend
from ulm.checkpoint import load_checkpoint
from ulm.config import gpt_preset
from ulm.data.build import build_dataset
from ulm.data.sources import NAMED_CORPORA, Corpus
from ulm.generate import SamplingParams
from ulm.inference import InferenceLinear
from ulm.kv_cache import KVCache
from ulm.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("width", [64, 384], ids=["small-weights", "packed-weights"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("torch_threads", [1, 2], ids=["1-thread", "2-threads"], indirect=True)  # 2: splits
def test_prepared_model_gives_the_same_logits(activation, width, torch_threads):
    torch.manual_seed(0)
    cfg = gpt_preset("toy", activation=activation, n_embd=width, n_head=width // 32)
    ref = GPT(cfg).eval()
    for m in ref.modules():  # GPT starts its biases at zero, where a product that dropped them would pass
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.02)
    model = GPT(cfg)
    model.load_state_dict(ref.state_dict())
    model.prepare_for_inference()
    assert model.lm_head.weight is model.embed.tok.weight  # still tied, one copy of the values
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight.t().is_contiguous()
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.act, torch.nn.Identity) and mlp.fc.post_op == activation.removesuffix("_tanh")  # fused
    # oneDNN only for weights large enough to pay for its per-call cost (64 x 256: MKL; 384 x 1536: oneDNN)
    assert (mlp.fc.packed is not None, mlp.fc.one_row_packed) == ((True, True) if width == 384 else (False, False))
    idx = torch.randint(0, 259, (3, 10))
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)  # several rows: packed weights
        caches = [KVCache.for_model(m.config, 3, 16) for m in (model, ref)]
        pos = torch.arange(10).expand(3, 10)
        for m, c in zip((model, ref), caches):
            m(idx, pos, c)
        one = torch.tensor([[5]])  # one row: the column-major weights
        out, expected = (m(one, torch.tensor([[10]]), c, slice(1, 2)) for m, c in zip((model, ref), caches))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.state_dict()["blocks.0.mlp.fc.weight"], ref.state_dict()["blocks.0.mlp.fc.weight"])



def test_prepared_modules_find_their_children_directly_and_follow_reassignment():
    """prepare_for_inference binds submodules and parameters as plain attributes (no nn.Module.__getattr__ per
    lookup): they are the registered ones, and a module or parameter assigned afterwards is the one used."""
    torch.manual_seed(0)
    ref = GPT(gpt_preset("toy")).eval()
    model = GPT(gpt_preset("toy"))
    model.load_state_dict(ref.state_dict())
    model.prepare_for_inference()
    for m in model.modules():
        for name, child in [*m._modules.items(), *m._parameters.items()]:
            assert m.__dict__[name] is child, name
    idx = torch.randint(0, 259, (2, 6))
    with torch.inference_mode():
        model.ln_f = ref.ln_f = torch.nn.Identity()  # a module assigned again
        model.blocks[0].ln_1.weight = ref.blocks[0].ln_1.weight = torch.nn.Parameter(torch.full((64,), 0.5))
        assert model.ln_f is model._modules["ln_f"] and model.blocks[0].ln_1.weight[0] == 0.5
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("torch_threads, in_features", [(2, 768), (2, 1536), (3, 1024)], indirect=["torch_threads"],
                         ids=["2-threads", "2-threads-shrinking", "3-threads-not-dividing"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_one_row_product_on_several_threads_is_the_linear_product(torch_threads, in_features, bias):
    """One row on n threads: the weight's n row blocks (shared among them) give nn.Linear's product, its activation
    after it; where n does not divide the row, the oneDNN kernel does (also nn.Linear's product)."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(in_features, 2304 - in_features, bias=bias)
    prepared = InferenceLinear(ref, pack=True, activation="gelu_tanh")
    x = torch.randn(1, 1, in_features)
    with torch.inference_mode():
        expected = torch.nn.functional.gelu(ref(x), approximate="tanh")
        torch.testing.assert_close(prepared(x), expected, atol=1e-5, rtol=1e-5)
        if in_features % torch_threads == 0:
            torch.testing.assert_close(prepared.split_product(x, torch_threads), expected, atol=1e-5, rtol=1e-5)
        two_rows = torch.randn(1, 2, in_features)  # several rows: never split
        torch.testing.assert_close(prepared(two_rows), torch.nn.functional.gelu(ref(two_rows), approximate="tanh"),
                                   atol=1e-5, rtol=1e-5)


def test_transformers_twin_reproduces_the_checkpoint(toy_checkpoint):
    pytest.importorskip("transformers")
    model = load_checkpoint(toy_checkpoint)[0]
    hf = bench_decode.hf_gpt2(model)  # raises when its logits differ
    idx = torch.randint(0, 259, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
        ids = hf.generate(idx[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    from ulm.generate import generate_ids

    assert ids[0, 4:].tolist() == generate_ids(model, idx[0, :4].tolist(), 6)


def test_weight_bytes_count_what_a_decode_step_reads():
    cfg = gpt_preset("gpt2-small")
    with torch.device("meta"):
        n_params = GPT(cfg).num_params()
    # every parameter (the tied table once, as the output layer) but the position table
    assert weight_bytes("torch", None, cfg) == 4 * (n_params - cfg.block_size * cfg.n_embd)


def test_weight_products_graph_multiplies_by_every_linear_weight(toy_checkpoint, toy_onnx_export, tmp_path):
    """The onnx-fp32 "products alone" graph: one MatMul per Linear of the model, in forward order, each by that
    Linear's own weight (the tied output layer through its Transpose); the int8 one, by their quantized copies."""
    model = load_checkpoint(toy_checkpoint)[0]
    linears = [m for b in model.blocks for m in (b.attn.in_proj, b.attn.out_proj, b.mlp.fc, b.mlp.proj)]
    linears.append(model.lm_head)
    session = create_session(matmul_graph(toy_onnx_export), threads=1)
    assert len(session.get_inputs()) == len(linears)
    rng = np.random.default_rng(0)
    feeds = {x.name: rng.standard_normal(x.shape).astype(np.float32) for x in session.get_inputs()}
    outputs = session.run(None, feeds)
    for i, (m, y) in enumerate(zip(linears, outputs)):
        ref = torch.from_numpy(feeds[f"x{i}"]) @ m.weight.detach().T
        torch.testing.assert_close(torch.from_numpy(y), ref, atol=1e-4, rtol=1e-4)
    # int8: the same products, quantized (DynamicQuantizeMatMul over the quantized weights, scales, zero points)
    quantize_int8(toy_onnx_export / "model.onnx", tmp_path)
    int8 = create_session(matmul_graph(tmp_path), threads=1).run(None, feeds)
    assert len(int8) == len(outputs)
    for q, y in zip(int8, outputs):
        assert np.abs(q - y).max() <= 0.05 * np.abs(y).max()


def test_bench_decode_writes_results(toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "decode.json"
    backends = "torch,onnx-fp32" + (",transformers" if bench_decode_has_hf() else "")
    assert bench_decode.main(["--checkpoint", str(toy_checkpoint), "--backends", backends, "--steps", "4",
                              "--batch", "2", "--repeats", "1", "--out", str(out), "--cache", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for b in backends.split(","):  # each backend warmed up before the first timed round
        assert printed.index(f"warm-up: {b}") < printed.index(f"round 1/1: {b}")
    res = json.loads(out.read_text())
    assert res["machine"]["threads"] == 1 and res["device"] == "cpu"
    assert res["machine"]["cpu"] in printed  # the host's kind, which the figures depend on
    (run,) = res["results"]
    assert run["gpt2_small_shape"] is False
    rows = {r["backend"]: r for r in run["backends"]}
    assert set(rows) == set(backends.split(","))
    for r in rows.values():
        assert r["device"] == "cpu"
        assert r["ms_per_token"] > 0 and r["tokens_per_s_batch"] > 0 and r["bandwidth_gbps"] > 0
        assert len(r["rounds"]) == 1 and r["fraction_of_roofline"] == pytest.approx(
            r["weight_bytes"] / r["bandwidth_gbps"] / 1e6 / r["ms_per_token"])  # one round: its own figures
    assert rows["torch"]["weight_bytes"] == rows["onnx-fp32"]["weight_bytes"]
    for label in ("torch", "onnx-fp32"):  # their weight products alone, against the same roofline
        r = rows[label]
        assert r["products_ms"] > 0 and r["products_fraction_of_roofline"] == pytest.approx(
            r["weight_bytes"] / r["bandwidth_gbps"] / 1e6 / r["products_ms"])
    assert "products alone" in printed
    bandwidths = [x["bandwidth_gbps"] for r in rows.values() for x in r["rounds"]]
    assert f"bandwidth over the rounds: {min(bandwidths):.0f}-{max(bandwidths):.0f} GB/s" in printed
    names = [t["name"] for t in run["targets"]]
    assert "torch decode batch 1, fraction of roofline" in names
    assert all(set(t) == {"name", "value", "target", "unit", "met", "rounds_met", "rounds"} for t in run["targets"])
    assert all(t["rounds"] == 1 and t["rounds_met"] == int(t["met"]) for t in run["targets"])  # one round
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ensure_export_reuses_only_a_current_export(toy_checkpoint, tmp_path, capsys):
    out = ensure_export(toy_checkpoint, None, tmp_path)
    manifest = out / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert ensure_export(toy_checkpoint, None, tmp_path) == out and manifest.stat().st_mtime_ns == written
    assert capsys.readouterr().out.count("exporting") == 1
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "ulm-onnx/1"}))
    assert ensure_export(toy_checkpoint, None, tmp_path) == out  # an older format: exported again
    assert json.loads(manifest.read_text())["format"] == FORMAT
    assert capsys.readouterr().out.count("exporting") == 1


def bench_decode_has_hf() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_serving_sweeps_a_started_server(toy_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "serving.json"
    runs = iter([0.010, 0.020, 0.030, 0.040])  # in-process seconds per token, in call order
    monkeypatch.setattr(bench_serving.InProcess, "__call__", lambda self: next(runs))
    assert bench_serving.main(["--checkpoint", str(toy_checkpoint), "--backends", "torch", "--concurrency", "1,3",
                               "--max-new-tokens", "6", "--rounds", "2", "--threads", "1", "--out", str(out),
                               "--cache", str(tmp_path)]) == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    assert run["backend"] == "torch" and run["server"]["backend"] == "torch"
    # each round's single stream is compared with the in-process runs just before and after it
    assert run["in_process_ms_rounds"] == pytest.approx([15.0, 35.0]) and run["in_process_ms"] == pytest.approx(25)
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 3]
    one, three = run["levels"]
    assert one["streams"] == 2 and three["streams"] == 6 and len(three["rounds"]) == 2
    for lv in run["levels"]:
        assert lv["errors"] == {}
        assert lv["tokens"] == 6 * lv["streams"]
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p95"] and 0 < lv["itl_ms"]["p50"] <= lv["itl_ms"]["p95"]
        assert lv["aggregate_tokens_per_s"] > 0 and lv["per_stream_tokens_per_s"] > 0
    assert [t["name"].split(": ")[1] for t in run["targets"]] == [
        "gRPC streaming cost over in-process decoding at batch 1"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_benches_refuse_cuda_without_a_gpu(toy_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(toy_checkpoint), "--device", "cuda", "--cache", str(tmp_path)]
    assert bench_decode.main([*common, "--out", str(tmp_path / "d.json")]) == 2
    assert bench_serving.main([*common, "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("--device cuda: torch sees no CUDA device") == 2
    assert not list(tmp_path.glob("*.json"))  # nothing measured, nothing written


def test_check_device_keeps_the_backends_a_device_runs(monkeypatch):
    backends = ["torch", "onnx-fp32", "onnx-int8", "transformers"]
    assert check_device("cpu", backends) == backends
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        check_device("gpu", backends)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice only; nothing runs on it
    assert check_device("cuda", backends) == ["torch", "onnx-fp32", "transformers"]  # int8 is for the CPU
    with pytest.raises(ValueError, match="none of the backends"):
        check_device("cuda", ["onnx-int8"])


def test_bench_train_times_the_trainer(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question.\n" * 200)
    ds = build_dataset([tmp_path / "corpus.txt"], tmp_path / "ds", tokenizer="char", progress=False, log=None)
    out = tmp_path / "train.json"
    assert bench_train.main(["--dataset", str(ds), "--iters", "4", "--warmup", "1", "--device", "cpu", "--out",
                             str(out), "--set", "block_size=16", "n_layer=1", "n_head=2", "n_embd=16",
                             "batch_size=4", "threads=1"]) == 0
    res = json.loads(out.read_text())
    assert res["preset"] == "shakespeare-char" and res["tokens_per_iter"] == 4 * 16
    assert len(res["iterations_ms"]) == 4 and res["ms_per_iter"] == statistics.median(res["iterations_ms"])
    assert res["tokens_per_s"] == pytest.approx(64 / res["ms_per_iter"] * 1000)
    assert "median" in capsys.readouterr().out


def test_bench_train_downloads_the_corpus_without_a_local_copy(http_server, tmp_path, capsys, monkeypatch):
    text = b"to be or not to be, that is the question.\n" * 200
    http_server.files["/tiny.txt"] = text
    monkeypatch.setattr(bench_train, "SHAKESPEARE", tmp_path / "missing.txt")
    monkeypatch.setitem(NAMED_CORPORA, "tinyshakespeare", Corpus(
        "tinyshakespeare", (http_server.url + "/tiny.txt",), "tiny.txt", hashlib.sha256(text).hexdigest(), len(text),
        "test"))
    monkeypatch.setenv("ULM_CACHE_DIR", str(tmp_path / "cache"))
    small = ["--iters", "2", "--warmup", "0", "--set", "block_size=16", "n_layer=1", "n_head=2", "n_embd=16",
             "batch_size=4", "threads=1"]
    assert bench_train.main([*small, "--out", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "cache" / "tiny.txt").read_bytes() == text and json.loads((tmp_path / "t.json").read_text())
    del http_server.files["/tiny.txt"]  # cached now: not fetched again; and a failed download is a clear error
    assert bench_train.main([*small, "--out", str(tmp_path / "t.json")]) == 0
    assert [path for path, _ in http_server.requests] == ["/tiny.txt"]
    (tmp_path / "cache" / "tiny.txt").unlink()
    assert bench_train.main([*small, "--out", str(tmp_path / "t.json")]) == 2
    assert "could not download" in capsys.readouterr().err


def test_bench_serving_checks_its_sampling_flags(toy_checkpoint, tmp_path, capsys):
    assert bench_serving.main(["--checkpoint", str(toy_checkpoint), "--top-p", "1.5", "--cache", str(tmp_path),
                               "--out", str(tmp_path / "s.json")]) == 2
    assert "top_p must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_time_decode_samples_as_asked(toy_checkpoint):
    backend = TorchBackend(toy_checkpoint, "cpu", 2)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    for params in (None, sampled):
        times = time_decode(backend, 2, 5, prompt_len=4, sampling=params)
        assert len(times) == 5 and all(t > 0 for t in times)
        assert not backend.row_of  # every slot released


def test_bench_decode_sets_the_gpu_target_on_cuda_only():
    """On cuda, torch's tokens/s at batch 1 is checked against the H100-class figure (per round, median)."""
    rounds = {"torch": [{"s_per_token_b1": s, "s_per_step_batch": 16 * s, "fraction_of_roofline": 0.5}
                        for s in (0.0008, 0.0012, 0.0009)]}
    gpu = {t["name"]: t for t in bench_decode.targets(rounds, 16, "cuda")}
    line = gpu["torch tokens/s at batch 1 on the GPU (set for H100-class)"]
    assert line["value"] == pytest.approx(1 / 0.0009) and line["met"] and line["rounds_met"] == 2
    assert line["target"] == bench_decode.GPU_TOKENS_B1 and line["unit"] == " tokens/s"
    assert not any("GPU" in t["name"] for t in bench_decode.targets(rounds, 16, "cpu"))
