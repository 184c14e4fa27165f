"""Damaged checkpoints and exports: every tool (`ulm generate`, `ulm eval`, `python -m export`, `python -m server`)
refuses each one with exit status 2 and one line naming the damaged file, never a traceback."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.__main__ import main as export_main
from export.runtime import ExportError, file_entries, read_export
from server.__main__ import main as server_main
from ulm.checkpoint import CheckpointError, load_checkpoint
from ulm.cli import main as ulm_main

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
STARTED_S = 30  # a refusal takes well under a second; a server still running after this has started


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_weights(d: Path, change) -> None:
    state = load_file(str(d / "model.safetensors"))
    change(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# damage -> (what it does to a copy of the toy checkpoint, the file the error must name)
CHECKPOINT_DAMAGES = {
    "meta is a list": (lambda d: (d / "tokenizer_meta.json").write_text("[]"), "tokenizer_meta.json"),
    "meta bos is a number": (lambda d: edit_json(d / "tokenizer_meta.json", lambda m: {**m, "bos": 5}),
                             "tokenizer_meta.json"),
    "meta add_bos is a string": (lambda d: edit_json(d / "tokenizer_meta.json", lambda m: {**m, "add_bos": "no"}),
                                 "tokenizer_meta.json"),
    "meta names a missing token": (lambda d: edit_json(d / "tokenizer_meta.json", lambda m: {**m, "eos": "<|x|>"}),
                                   "tokenizer.json"),
    "meta truncated": (lambda d: cut(d / "tokenizer_meta.json", 20), "tokenizer_meta.json"),
    "tokenizer is a list": (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json"),
    "tokenizer is a config": (lambda d: shutil.copy(d / "config.json", d / "tokenizer.json"), "tokenizer.json"),
    "tokenizer truncated": (lambda d: cut(d / "tokenizer.json", 500), "tokenizer.json"),
    "config model is a list": (lambda d: edit_json(d / "config.json", lambda m: {**m, "model": []}), "config.json"),
    "config without model": (lambda d: edit_json(d / "config.json", lambda m: {"format": m["format"],
                                                                                "model_type": "gpt"}), "config.json"),
    "config name is a number": (lambda d: edit_json(d / "config.json", lambda m: {**m, "name": 5}), "config.json"),
    "config dataset is a list": (lambda d: edit_json(d / "config.json", lambda m: {**m, "dataset": []}),
                                 "config.json"),
    "config digits is a string": (lambda d: edit_json(d / "config.json", lambda m: {**m, "task": "addition",
                                                                                     "digits": "2"}), "config.json"),
    "config truncated": (lambda d: cut(d / "config.json", 100), "config.json"),
    "weights float64": (lambda d: edit_weights(d, lambda s: s.update({k: v.double() for k, v in s.items()})),
                        "model.safetensors"),
    "one weight float16": (lambda d: edit_weights(d, lambda s: s.update(
        {"ln_f.weight": s["ln_f.weight"].half()})), "model.safetensors"),
    "one weight int32": (lambda d: edit_weights(d, lambda s: s.update({"ln_f.weight": s["ln_f.weight"].int()})),
                         "model.safetensors"),
    "missing tensor": (lambda d: edit_weights(d, lambda s: s.pop("ln_f.weight")), "model.safetensors"),
    "extra tensor": (lambda d: edit_weights(d, lambda s: s.update({"extra.weight": torch.zeros(2)})),
                     "model.safetensors"),
    "tensor of the wrong shape": (lambda d: edit_weights(d, lambda s: s.update({"ln_f.weight": torch.zeros(3)})),
                                  "model.safetensors"),
    "weights truncated": (lambda d: cut(d / "model.safetensors", 1000), "model.safetensors"),
}


@pytest.fixture
def checkpoint_copy(toy_checkpoint, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(toy_checkpoint, d)
    return d


def ulm_generate(d: Path, _) -> int:
    return ulm_main(["generate", "x", "--checkpoint", str(d), "--max-new-tokens", "1"])


def ulm_eval(d: Path, _) -> int:
    return ulm_main(["eval", "--checkpoint", str(d)])


def export(d: Path, tmp_path: Path) -> int:
    return export_main(["--checkpoint", str(d), "--out", str(tmp_path / "export"), "--threads", "1"])


def server(d: Path, _, backend: str = "torch") -> int:
    """`python -m server`'s main; one that starts serving (a damage it missed) is stopped by SIGTERM and returns 0."""
    stop = threading.Timer(STARTED_S, os.kill, [os.getpid(), signal.SIGTERM])
    stop.start()
    try:
        return server_main(["--checkpoint", str(d), "--port", "0", "--backend", backend, "--max-batch", "2",
                            "--grace", "0"])
    finally:
        stop.cancel()


def assert_one_line_naming(text: str, path: Path) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], text
    assert "Traceback" not in text


@pytest.mark.parametrize("tool", [ulm_generate, ulm_eval, export], ids=lambda f: f.__name__)
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_damaged_checkpoint_is_one_line_and_exit_2(checkpoint_copy, damage, tool, tmp_path, capsys):
    change, file = CHECKPOINT_DAMAGES[damage]
    change(checkpoint_copy)
    with pytest.raises(CheckpointError, match=file):
        load_checkpoint(checkpoint_copy)
    capsys.readouterr()
    assert tool(checkpoint_copy, tmp_path) == 2
    assert_one_line_naming(capsys.readouterr().err, checkpoint_copy / file)


def server_error(caplog) -> str:
    """The server's log (it reports through logging): one ERROR record, without a traceback."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "Traceback" not in caplog.text, caplog.text
    return errors[0].getMessage()


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_server_refuses_a_damaged_checkpoint(checkpoint_copy, damage, caplog, capsys):
    change, file = CHECKPOINT_DAMAGES[damage]
    change(checkpoint_copy)
    assert server(checkpoint_copy, None) == 2
    assert_one_line_naming(server_error(caplog), checkpoint_copy / file)
    assert "Traceback" not in capsys.readouterr().err


def refresh_manifest(d: Path) -> None:
    """Sizes and hashes as the files are now: a damage the size check alone cannot see."""
    edit_json(d / "manifest.json", lambda m: {**m, "files": file_entries(d, list(m["files"]))})


def edit_model_config(d: Path, **fields) -> None:
    edit_json(d / "config.json", lambda m: {**m, "model": {**m["model"], **fields}})
    refresh_manifest(d)


EXPORT_DAMAGES = {
    "manifest is a list": (lambda d: (d / "manifest.json").write_text("[]"), "manifest.json"),
    "manifest truncated": (lambda d: cut(d / "manifest.json", 100), "manifest.json"),
    "files is a list": (lambda d: edit_json(d / "manifest.json", lambda m: {**m, "files": []}), "manifest.json"),
    "files entry is a number": (lambda d: edit_json(d / "manifest.json", lambda m: {
        **m, "files": {**m["files"], "model.onnx": 5}}), "manifest.json"),
    "files lists no graph": (lambda d: edit_json(d / "manifest.json", lambda m: {
        **m, "files": {k: v for k, v in m["files"].items() if k != "model.onnx"}}), "manifest.json"),
    "quantization is a list": (lambda d: edit_json(d / "manifest.json", lambda m: {
        **m, "dtype": "int8", "quantization": []}), "manifest.json"),
    "dtype unknown": (lambda d: edit_json(d / "manifest.json", lambda m: {**m, "dtype": "float64"}),
                      "manifest.json"),
    "name is a number": (lambda d: edit_json(d / "manifest.json", lambda m: {**m, "name": 5}), "manifest.json"),
    "config is a list": (lambda d: ((d / "config.json").write_text("[]"), refresh_manifest(d)), "config.json"),
    "config n_layer differs": (lambda d: edit_model_config(d, n_layer=3), "config.json"),
    "config n_embd differs": (lambda d: edit_model_config(d, n_embd=32), "config.json"),
    "meta is a list": (lambda d: ((d / "tokenizer_meta.json").write_text("[]"), refresh_manifest(d)),
                       "tokenizer_meta.json"),
    "tokenizer is a list": (lambda d: ((d / "tokenizer.json").write_text("[]"), refresh_manifest(d)),
                            "tokenizer.json"),
    "graph is garbage": (lambda d: (d / "model.onnx").write_bytes(bytes((d / "model.onnx").stat().st_size)),
                         "model.onnx"),
    "graph truncated": (lambda d: cut(d / "model.onnx", 1000), "model.onnx"),
    "weights truncated": (lambda d: (cut(d / "model.onnx.data", 1000), refresh_manifest(d)), "model.onnx"),
}


@pytest.mark.parametrize("damage", list(EXPORT_DAMAGES))
def test_damaged_export_is_refused(toy_onnx_export, damage, tmp_path, caplog, capsys):
    d = tmp_path / "export"
    shutil.copytree(toy_onnx_export, d)
    change, file = EXPORT_DAMAGES[damage]
    change(d)
    with pytest.raises(ExportError, match=file):
        read_export(d)
    assert server(d, None, backend="onnx") == 2
    assert str(d) in server_error(caplog) and file in server_error(caplog)
    assert "Traceback" not in capsys.readouterr().err


TOOLS = {
    "ulm generate": ["-m", "ulm", "generate", "x", "--checkpoint"],
    "export": ["-m", "export", "--out", "{tmp}/out", "--checkpoint"],
    "server": ["-m", "server", "--port", "0", "--checkpoint"],
}


@pytest.mark.parametrize("damage", ["meta is a list", "weights float64"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_tools_exit_2_without_a_traceback(checkpoint_copy, tool, damage, tmp_path):
    """The reported cases, as a user runs them."""
    CHECKPOINT_DAMAGES[damage][0](checkpoint_copy)
    args = [a.format(tmp=tmp_path) for a in TOOLS[tool]] + [str(checkpoint_copy)]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # the server logs its start and stop too: its error is the one ERROR line
    err = "".join(line for line in proc.stderr.splitlines(True) if tool != "server" or " ERROR " in line)
    assert_one_line_naming(err, checkpoint_copy / CHECKPOINT_DAMAGES[damage][1])
