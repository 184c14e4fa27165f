"""The trainer: schedules, optimizer groups, configs, determinism, exact resume after a kill, DDP, eval, adder,
progress reports."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulm.addition import AdditionTask, exact_match
from ulm.checkpoint import load_checkpoint
from ulm.cli import main
from ulm.config import GPT_PRESETS, gpt_preset
from ulm.data.build import build_dataset
from ulm.data.dataset import load_split
from ulm.evaluate import evaluate
from ulm.generate import generate_ids, generate_text
from ulm.model import GPT
from ulm.progress import progress_bar
from ulm.train import train
from ulm.train_config import TrainConfig, build_config, parse_override, read_recipe, recipe_names
from ulm.train_config import recipe_names as preset_names
from ulm.training.metrics import read_metrics
from ulm.training.optim import lr_at, make_optimizer
from ulm.training.state import STATE_JSON

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
# a tiny adder: each iteration takes a few milliseconds
TINY = ["n_layer=1", "n_head=2", "n_embd=32", "batch_size=16", "threads=1", "log_interval=1", "eval_interval=10",
        "eval_examples=64", "warmup_iters=3", "lr_decay_iters=30", "max_iters=30", "stop_accuracy=0"]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------------
# pieces


def test_lr_schedules():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)  # linear warmup
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # cosine half way
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 200))
    inv = TrainConfig(lr=1e-3, warmup_iters=100, schedule="inverse_sqrt")
    # the paper: d^-0.5 * min(s^-0.5, s * w^-1.5), scaled to peak at lr
    paper = [min(s ** -0.5, s * 100 ** -1.5) for s in range(1, 1000)]
    assert [lr_at(s - 1, inv) for s in range(1, 1000)] == pytest.approx([p / max(paper) * 1e-3 for p in paper])
    assert lr_at(50, TrainConfig(schedule="constant", warmup_iters=10)) == TrainConfig().lr


def test_weight_decay_groups():
    cfg = build_config("adder")
    model = GPT(cfg.model_config(271))
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0 and opt.defaults["fused"]
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}  # every parameter once (tied weights once)
    assert id(model.embed.tok.weight) in {id(p) for p in decay["params"]}
    assert id(model.blocks[0].ln_1.weight) in {id(p) for p in no_decay["params"]}


def test_presets_and_overrides(tmp_path):
    assert {"adder", "shakespeare-char", "wikitext-bpe"} <= set(preset_names())
    shk = build_config("shakespeare-char")
    assert (shk.model_args["block_size"], shk.batch_size, shk.lr, shk.min_lr, shk.warmup_iters, shk.decay_iters,
            shk.beta2, shk.weight_decay, shk.grad_clip) == (64, 12, 1e-3, 1e-4, 100, 2000, 0.99, 0.1, 1.0)
    cfg = build_config("adder", overrides=["lr=3e-4", "n_layer=3", "dataset=2024", "compile=true", "device=cpu"])
    assert (cfg.lr, cfg.model_args["n_layer"], cfg.dataset, cfg.compile) == (3e-4, 3, "2024", True)
    assert cfg.model_config(271).n_layer == 3
    (tmp_path / "c.toml").write_text('lr = 5e-4\nmax_iters = 7\nn_embd = 96\n')
    cfg = build_config("adder", tmp_path / "c.toml", ["max_iters=9"])
    assert (cfg.lr, cfg.max_iters, cfg.model_args["n_embd"]) == (5e-4, 9, 96)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the flat dict round-trips
    assert parse_override("lr = 1") == ("lr", 1)
    with pytest.raises(ValueError, match="block_size"):  # the model must hold the task's sequences
        build_config("adder", overrides=["block_size=8"]).model_config(271, 10)


# what each training recipe changes in the model shape it names; every other model field is the shape's
RECIPE_MODEL_CHANGES = {"adder": {}, "shakespeare-char": {"activation": "gelu"},
                        "wikitext-bpe": {"block_size": 256, "dropout": 0.1}}


@pytest.mark.parametrize("name", recipe_names())
def test_recipes_take_their_model_shape_from_gpt_presets(name):
    """A recipe's model is the GPT_PRESETS shape it names with only the recipe's own changes, and the recipe
    restates none of the shape's fields (but block_size, the context it trains at, which it may state)."""
    cfg = build_config(name)
    shape = GPT_PRESETS[cfg.model]
    assert cfg.model_config(shape["vocab_size"]) == gpt_preset(cfg.model, **RECIPE_MODEL_CHANGES[name])
    recipe = read_recipe(name)
    assert not {k for k in recipe if k in shape and k != "block_size" and recipe[k] == shape[k]}


# ----------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit status 2


@pytest.mark.parametrize("argv, message", [
    (["--preset", "shakespeare-char", "--dataset", "{tmp}/missing"], "missing: no such directory"),
    (["--preset", "shakespeare-char"], "dataset"),
    (["--config", "{tmp}/bad.toml"], "unknown key 'bogus'"),
    (["--config", "{tmp}/broken.toml"], "broken.toml"),
    (["--config", "{tmp}/nofile.toml"], "nofile.toml"),
    (["--preset", "adder", "--set", "lr=abc"], "lr must be float"),
    (["--preset", "adder", "--set", "lr"], "not key=value"),
    (["--preset", "adder", "--set", "max_iters=1.5"], "max_iters must be int"),
    (["--preset", "adder", "--set", "n_layer=0"], "n_layer must be positive"),
    (["--preset", "adder", "--set", "schedule=linear"], "schedule must be one of"),
    (["--preset", "adder", "--set", "model=nope"], "model must be one of"),
    (["--preset", "adder", "--set", "beta2=1.0"], "beta2"),
    (["--set", "lr=1e-3"], "give --preset or --config"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.toml").write_text('task = "addition"\nbogus = 1\n')
    (tmp_path / "broken.toml").write_text('lr = = 1\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli("train", "--out", tmp_path / "run", "--no-progress", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ulm train: error:") and message in err
    assert not (tmp_path / "run").exists()


def test_eval_bad_input(tmp_path, capsys):
    assert cli("eval", "--checkpoint", tmp_path / "nothing") == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# reproducibility and resume


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny adder run (with dropout, so RNG state matters on resume)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(build_config("adder", overrides=[*TINY, "dropout=0.1"]), out, progress=False)
    return out


def test_same_seed_same_losses(reference_run, tmp_path):
    ref = losses(reference_run)
    assert len(ref) == 30 and all(math.isfinite(x) for x in ref) and ref[-1] < ref[0]
    train(build_config("adder", overrides=[*TINY, "dropout=0.1"]), tmp_path / "again", progress=False)
    assert losses(tmp_path / "again") == ref
    train(build_config("adder", overrides=[*TINY, "dropout=0.1", "seed=7"]), tmp_path / "other", progress=False)
    assert losses(tmp_path / "other") != ref
    for name in ("best", "last"):
        _, tok, meta = load_checkpoint(reference_run / name)
        assert meta["task"] == "addition" and meta["digits"] == 2 and tok.add_bos
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((reference_run / "summary.json").read_text())["iters"] == 30


def test_killed_run_resumes_exactly(reference_run, tmp_path):
    """SIGKILL a run mid-training, resume it: the logged losses equal the uninterrupted run's."""
    out = tmp_path / "run"
    # the same run, but planned far longer (max_iters may change on resume; the schedule is lr_decay_iters)
    cmd = [sys.executable, "-m", "ulm", "train", "--preset", "adder", "--out", str(out), "--no-progress",
           "--set", *TINY, "dropout=0.1", "max_iters=100000", "checkpoint_interval=5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "last" / STATE_JSON).read_text())["iter"] >= 10:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    state = json.loads((out / "last" / STATE_JSON).read_text())
    logged = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if line.endswith("}")]
    assert state["iter"] % 5 == 0 and 0 <= max(logged) - state["iter"] <= 5  # lost at most one interval
    assert cli("train", "--out", out, "--resume", "--no-progress", "--set", "max_iters=30") == 0
    assert losses(out) == losses(reference_run)


def test_resume_refuses_a_changed_config(reference_run, tmp_path, capsys):
    assert cli("train", "--out", reference_run, "--preset", "adder", "--no-progress") == 2
    assert "--resume" in capsys.readouterr().err
    assert cli("train", "--out", reference_run, "--resume", "--no-progress", "--set", "lr=0.5") == 2
    assert "config differs from the saved run in lr" in capsys.readouterr().err


def test_ddp_two_processes_equal_gradient_accumulation(tmp_path):
    """2 gloo processes x 8 sequences train exactly like 1 process x 2 micro-batches of 8."""
    args = [*TINY, "batch_size=8", "max_iters=8", "eval_interval=4", "log_interval=2", "dtype=float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ulm",
           "train", "--preset", "adder", "--out", str(tmp_path / "ddp"), "--no-progress", "--set", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    train(build_config("adder", overrides=[*args, "grad_accum=2"]), tmp_path / "single", progress=False)
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(ddp) == 4 and ddp == pytest.approx(single, rel=1e-4)
    state = json.loads((tmp_path / "ddp" / "last" / STATE_JSON).read_text())
    assert state["world"] == 2 and len(state["loss_sum"]) == 2
    a, _, _ = load_checkpoint(tmp_path / "ddp" / "last")
    b, _, _ = load_checkpoint(tmp_path / "single" / "last")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


# ----------------------------------------------------------------------------------------------------------
# a token dataset: train, then `ulm eval` against a full forward pass


def test_lm_dataset_train_and_eval(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
    text = "\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(1500))
    (tmp_path / "corpus.txt").write_text(text)
    ds = build_dataset([tmp_path / "corpus.txt"], tmp_path / "ds", tokenizer="char", progress=False, log=None)
    out = tmp_path / "run"
    cfg = build_config("shakespeare-char", overrides=[
        f"dataset={ds}", "block_size=32", "n_layer=1", "n_head=2", "n_embd=32", "batch_size=8", "max_iters=40",
        "warmup_iters=5", "lr_decay_iters=40", "eval_interval=20", "eval_iters=4", "threads=1"])
    best = train(cfg, out, progress=False)
    train_losses = losses(out)
    assert train_losses[-1] < train_losses[0] - 0.5
    model, tok, meta = load_checkpoint(best)
    assert meta["task"] == "lm" and meta["dataset"] == str(ds) and not tok.add_bos
    # reference: the mean next-token loss over consecutive windows of the val split, by a full forward pass
    val = torch.from_numpy(load_split(ds, "val").astype(np.int64))
    T = model.config.block_size
    n = (len(val) - 1) // T
    x = val[: n * T].view(n, T)
    y = val[1: n * T + 1].view(n, T)
    with torch.no_grad():
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    r = evaluate(best)
    assert r["split"] == "val" and r["tokens"] == n * T
    assert r["loss"] == pytest.approx(ref, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    capsys.readouterr()
    assert cli("eval", "--checkpoint", best, "--dataset", ds, "--json") == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(ref, rel=1e-5)
    assert cli("eval", "--checkpoint", best, "--split", "test") == 2  # the dataset has no test split
    assert "no split 'test'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the adder learns (a smaller version of the preset; bench/train_adder.py runs the full one)


def test_adder_learns_and_answers(tmp_path, capsys):
    t0 = time.perf_counter()
    best = train("adder", tmp_path / "run", progress=False, overrides=[
        "threads=1", "batch_size=64", "lr=1e-2", "max_iters=600", "stop_accuracy=0.99", "stop_patience=1"])
    elapsed = time.perf_counter() - t0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    model, tok, meta = load_checkpoint(best)
    task = AdditionTask.from_extra(meta)
    # exact match agrees with one-at-a-time generation, the path a server takes
    pairs = task.pairs("test", 50)
    ref = np.mean([generate_ids(model, tok.encode(task.prompt(a, b)), 8, eos_id=tok.eos_id)
                   == task.encode([[a, b]])[0, task.prompt_len:].tolist() for a, b in pairs.tolist()])
    assert exact_match(model, task, pairs) == ref
    assert generate_text(model, tok, "06+90=", 8) == "096"  # and it stops (EOS) after the answer
    capsys.readouterr()
    assert cli("eval", "--checkpoint", best, "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["split"] == "test" and r["accuracy"] == summary["test_accuracy"]
    print(f"adder: {summary['iters']} iterations, test exact match {summary['test_accuracy']:.4f}, {elapsed:.0f}s")


# ----------------------------------------------------------------------------------------------------------
# progress reports


def test_progress_in_a_log_file_is_whole_lines(tmp_path):
    """With its output going to a file (systemd, docker), a run reports progress in a few whole lines, not in
    tqdm's '\\r' redraws."""
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "ulm", "train", "--preset", "adder", "--out", str(tmp_path / "run"),
           "--set", *TINY, "max_iters=300", "eval_interval=100"]
    with open(log, "wb") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=120, check=True)
    text = log.read_text()
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("train: ")]
    assert progress and progress[-1].startswith("train: 100% 300/300"), text
    assert len(text.splitlines()) <= 20, text  # a line per evaluation, a few of progress, and the summary


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_elsewhere():
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        for _ in progress_bar(range(40), desc="work", file=stream, mininterval=0.05):
            time.sleep(0.01)
    assert "\r" in terminal.getvalue()  # tqdm's own bar
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 12, lines  # one per 0.05 s at most, and the last
    assert lines[0].startswith("work:   0% 0/40") and lines[-1].startswith("work: 100% 40/40")
    with progress_bar(total=5, file=log, disable=True) as bar:
        bar.update(5)
    assert log.getvalue().splitlines() == lines
