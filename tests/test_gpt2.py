"""GPT-2 import: logits and tokenizer match HF transformers on small random GPT-2s (built here, no download)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ulm.checkpoint import CheckpointError, load_checkpoint
from ulm.cli import main
from ulm.generate import generate_ids
from ulm.gpt2 import ENDOFTEXT, load_gpt2, load_gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-4
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
             "Attention is all you need; the transformer attends.", "日本語 and émoji 👋 too"]
TEXTS = ["hello the world", " leading space, trailing  ", "émoji 👋🏽 and CJK 中文 and e\u0301", "a\x00b", ""]
CONFIGS = {  # GPT2Config overrides
    "tied": dict(),
    "untied": dict(tie_word_embeddings=False, n_inner=48, activation_function="gelu", layer_norm_epsilon=1e-6),
}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE (tokenizer.json, and vocab.json + merges.txt in a subfolder)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1, special_tokens=[ENDOFTEXT],
                            show_progress=False)
    d = tmp_path_factory.mktemp("bpe")
    bpe.save(str(d / "tokenizer.json"))
    (d / "legacy").mkdir()
    bpe.save_model(str(d / "legacy"))
    return d


def make_hf_gpt2(directory: Path, vocab_size: int, eot: int, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=eot,
                     eos_token_id=eot, **overrides)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises LayerNorms to ones/zeros and biases to zero: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_gpt2(request, bpe_dir, tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    d = tmp_path_factory.mktemp(f"hf_gpt2_{request.param}")
    model = make_hf_gpt2(d, len(tok), tok.convert_tokens_to_ids(ENDOFTEXT), **CONFIGS[request.param])
    assert (model.lm_head.weight is model.transformer.wte.weight) == (request.param == "tied")
    for name in ("tokenizer.json",):
        (d / name).write_bytes((bpe_dir / name).read_bytes())
    return model, d


def hf_logits(model: GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def test_load_gpt2_matches_hf_logits(hf_gpt2):
    hf, d = hf_gpt2
    ours = load_gpt2(d)
    assert ours.config.tie_weights == hf.config.tie_word_embeddings
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    torch.manual_seed(1)
    idx = torch.randint(0, hf.config.vocab_size, (3, 32))
    with torch.no_grad():
        got = ours(idx)
    diff = float((got - hf_logits(hf, idx)).abs().max())
    assert diff <= TOL, diff


def test_import_gpt2_cli_then_load_checkpoint(hf_gpt2, tmp_path):
    hf, src = hf_gpt2
    out = tmp_path / "imported"
    assert main(["import-gpt2", str(src), "--out", str(out)]) == 0
    model, tokenizer, meta = load_checkpoint(out)
    assert meta["source"].startswith("gpt2:")
    torch.manual_seed(2)
    idx = torch.randint(0, hf.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert float((model(idx) - hf_logits(hf, idx)).abs().max()) <= TOL
    # greedy generation with the KV cache picks HF's argmax token by token
    prompt = tokenizer.encode("hello the world")
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(hf_logits(hf, torch.tensor([seq]))[0, -1].argmax()))
    assert generate_ids(model, prompt, 8) == seq[len(prompt):]


def test_gpt2_tokenizer_round_trip(hf_gpt2, bpe_dir, tmp_path):
    _, src = hf_gpt2
    ref = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    main(["import-gpt2", str(src), "--out", str(tmp_path / "ck")])
    _, saved, _ = load_checkpoint(tmp_path / "ck")
    from_files = load_gpt2_tokenizer(bpe_dir / "legacy")  # vocab.json + merges.txt
    for tok in (load_gpt2_tokenizer(src), saved, from_files):
        assert tok.kind == "gpt2-bpe" and not tok.add_bos
        assert tok.eos_id == tok.bos_id == ref.convert_tokens_to_ids(ENDOFTEXT)
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text), text
            assert tok.decode(ids) == text
    assert load_gpt2_tokenizer(bpe_dir / "legacy").vocab_size == ref.vocab_size


def test_import_without_tokenizer_falls_back_to_bytes(bpe_dir, tmp_path, capsys):
    make_hf_gpt2(tmp_path / "hf", 300, 0)
    assert main(["import-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert "no tokenizer files" in capsys.readouterr().err
    _, tokenizer, _ = load_checkpoint(tmp_path / "ck")
    assert tokenizer.kind == "byte"


@pytest.mark.parametrize("change,message", [
    (dict(scale_attn_by_inverse_layer_idx=True), "attention scaling"),
    (dict(activation_function="swish"), "activation_function"),
    (dict(model_type="llama"), "not gpt2"),
    (dict(n_layer=3), "does not match"),
])
def test_import_rejects_what_it_cannot_convert(tmp_path, change, message):
    d = tmp_path / "hf"
    make_hf_gpt2(d, 300, 0)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_gpt2(d)
    assert main(["import-gpt2", str(d), "--out", str(tmp_path / "ck")]) == 2
    assert not (tmp_path / "ck" / "config.json").exists()
