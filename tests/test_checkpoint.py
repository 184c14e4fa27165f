"""Checkpoints (round trips, clear errors on broken ones), the `ulm` CLI's init/generate, tokenizer round trips."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ulm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ulm.cli import main
from ulm.config import GPTConfig, gpt_preset
from ulm.model import GPT
from ulm.tokenizer import BOS, EOS, PAD, Tokenizer, byte_level, char_level

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
TRICKY = [
    "plain ascii, punctuation!?",
    "emoji 👋🏽 👨\u200d👩\u200d👧 🇫🇷",  # skin tone modifier, ZWJ sequence, flag
    "combining e\u0301 a\u0308 n\u0303 vs precomposed é ä ñ",
    "CJK 日本語のテキスト 中文 한국어",
    "NUL\x00inside\x00\x00and\x00",
    "  spaces  \t tabs\r\nnewlines\n\n",
    "literal specials <|bos|> <|eos|> <|pad|> <|endoftext|>",
    "",
]
CONFIGS = {
    "tied_learned": GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32),
    "untied_sinusoidal": GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, tie_weights=False,
                                   pos_encoding="sinusoidal", norm_first=False, activation="relu", bias=False),
}


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_identical_outputs(name, tmp_path):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    tok = char_level("abcdefgh ")
    save_checkpoint(tmp_path / "ck", model, tok, extra={"note": "hi"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_meta.json"]  # no temporary files left
    loaded, tok2, meta = load_checkpoint(tmp_path / "ck")
    assert not loaded.training and loaded.config == cfg and meta["note"] == "hi"
    assert (loaded.lm_head.weight is loaded.embed.tok.weight) == cfg.tie_weights
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    assert tok2.kind == "char" and tok2.encode("bad 👋") == tok.encode("bad 👋")
    # a dtype on load converts everything, and keeps the tie
    half, _, _ = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert (half.lm_head.weight is half.embed.tok.weight) == cfg.tie_weights
    assert float((logits(half, idx).float() - logits(model, idx)).abs().max()) < 0.1


@pytest.fixture
def broken(toy_checkpoint, tmp_path):
    """A writable copy of the toy checkpoint, to break."""
    d = tmp_path / "ck"
    shutil.copytree(toy_checkpoint, d)
    return d


def edit_config(d: Path, **model_fields) -> None:
    meta = json.loads((d / "config.json").read_text())
    meta["model"].update(model_fields)
    (d / "config.json").write_text(json.dumps(meta))


BREAKAGES = {
    "truncated weights": (lambda d: truncate(d / "model.safetensors", 0.5), "truncated or corrupt"),
    "weights cut by one byte": (lambda d: truncate(d / "model.safetensors", -1), "truncated or corrupt"),
    "empty weights": (lambda d: truncate(d / "model.safetensors", 0.0), "truncated or corrupt"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "n_layer mismatch": (lambda d: edit_config(d, n_layer=3), "does not match its config"),
    "n_embd mismatch": (lambda d: edit_config(d, n_embd=32), "does not match its config"),
    "tie mismatch": (lambda d: edit_config(d, tie_weights=False), "does not match its config"),
    "unknown field": (lambda d: edit_config(d, n_experts=8), "n_experts"),
    "wrong type": (lambda d: edit_config(d, n_layer="2"), "n_layer"),
    "garbage bytes config": (lambda d: (d / "config.json").write_bytes(os.urandom(256)), "not valid JSON"),
    "garbage text config": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "JSON list config": (lambda d: (d / "config.json").write_text("[1, 2]"), "JSON object"),
    "foreign config": (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "not a µLM"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer"),
    "garbage tokenizer": (lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer"),
    "missing dir": (lambda d: shutil.rmtree(d), "does not exist"),
    "file, not dir": (lambda d: (shutil.rmtree(d), d.write_text("x")), "not a directory"),
}


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep >= 0 else data[:keep])


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoints_raise_a_clear_error(broken, breakage):
    load_checkpoint(broken)  # the copy loads before it is broken
    damage, message = BREAKAGES[breakage]
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(broken)
    assert main(["generate", "x", "--checkpoint", str(broken), "--max-new-tokens", "1"]) == 2


def test_cli_init_and_generate(toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["init", "--preset", "toy", "--out", str(out)]) == 0
    assert "toy" in capsys.readouterr().out
    model, tok, meta = load_checkpoint(out)
    assert meta["preset"] == "toy" and model.config == gpt_preset("toy") and tok.kind == "byte"
    reference, _, _ = load_checkpoint(toy_checkpoint)  # same preset and seed as the shared fixture
    idx = torch.randint(0, 259, (1, 16))
    assert torch.equal(logits(model, idx), logits(reference, idx))
    assert main(["generate", "hi", "--checkpoint", str(out), "--max-new-tokens", "4", "--temperature", "0.8",
                 "--seed", "1"]) == 0
    assert main(["generate", "hi", "--checkpoint", str(out), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_python_m_ulm_generate_on_a_bad_dir_exits_2(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "ulm", "generate", "hello", "--checkpoint", str(missing)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr and str(missing) in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("make", [byte_level, lambda: char_level("abcdefghijklmnopqrstuvwxyz é中")],
                         ids=["byte_level", "char_level"])
def test_tokenizer_round_trips_exactly(make, tmp_path):
    tok = make()
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    for t in (tok, loaded):
        for text in TRICKY:
            ids = t.encode(text)
            assert ids[0] == t.bos_id and t.bos_id not in ids[1:], text  # specials only where code puts them
            assert t.decode(ids) == text, text
            assert t.encode(text) == tok.encode(text)
            assert max(ids) < t.vocab_size
        assert {t.bos_id, t.eos_id, t.pad_id} == {t.token_to_id(s) for s in (BOS, EOS, PAD)}
        assert t.encode("ab", add_bos=False) == t.encode("ab")[1:]


def test_tokenizer_vocabularies():
    byte = byte_level()
    assert byte.vocab_size == 259
    assert byte.encode("aé\x00", add_bos=False) == [97, 0xC3, 0xA9, 0]  # token id == byte value
    char = char_level("abc")
    assert char.vocab_size == 3 + 256 + 3
    assert len(char.encode("abcabc", add_bos=False)) == 6  # one token per known character
    assert len(char.encode("👋", add_bos=False)) == 4  # unknown characters spelled in UTF-8 bytes
