"""Tokenizers: exact round trips of any UTF-8 text, references for char/byte ids, BPE training, saved with data."""
from __future__ import annotations

import numpy as np
import pytest

from ulm.data import build_dataset, load_split, load_tokenizer
from ulm.tokenizer import LONG_TEXT, Tokenizer, byte_level, char_level, text_pieces, train_bpe

TRAIN = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
         + "Ünïcödé façade, naïve résumé.\n" * 5)
HARD = [
    "",
    "plain ascii",
    "emoji 😀🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "CJK 日本語のテキスト 中文 한국어",
    "right-to-left: שלום مرحبا",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF\rCR",
    "zero width\u200bjoiner\u200d and BOM \ufeff and NUL \x00 and DEL \x7f",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and a lone combining mark \u0301 at the start",
    "x" * 3000,
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe([TRAIN], vocab_size=300, show_progress=False)


def tokenizers(bpe) -> dict[str, Tokenizer]:
    return {"char": char_level(set(TRAIN)), "bpe": bpe, "byte": byte_level()}


@pytest.mark.parametrize("kind", ["char", "bpe", "byte"])
def test_round_trip_any_utf8(kind, bpe, tmp_path):
    tok = tokenizers(bpe)[kind]
    for text in HARD + [TRAIN]:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text, (kind, text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(tok.encode(text, add_bos=True)) == text  # BOS is dropped by decode
    # the saved file round-trips identically
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    for text in HARD:
        assert loaded.encode(text) == tok.encode(text)


def test_char_level_matches_reference_mapping():
    """In-vocabulary text: one id per character, in sorted order (the nanoGPT shakespeare_char stoi)."""
    chars = sorted(set(TRAIN))
    stoi = {c: i for i, c in enumerate(chars)}
    tok = char_level(set(TRAIN))
    assert tok.encode(TRAIN, add_bos=False) == [stoi[c] for c in TRAIN]
    assert tok.vocab_size == len(chars) + 256 + 3
    # an unseen character falls back to its UTF-8 bytes
    ids = tok.encode("a😀", add_bos=False)
    assert ids[0] == stoi["a"] and len(ids) == 1 + len("😀".encode())
    assert tok.decode(ids) == "a😀"


def test_byte_level_ids_are_bytes():
    tok = byte_level()
    text = "héllo 😀 日本"
    assert tok.encode(text, add_bos=False) == list(text.encode("utf-8"))
    assert tok.vocab_size == 259


def test_bpe_training(bpe):
    assert bpe.vocab_size == 300 and bpe.kind == "bpe"
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    # 41 merges learned from the training text already halve its length in tokens
    assert len(bpe.encode(TRAIN, add_bos=False)) < len(TRAIN.encode()) / 2
    # deterministic: the same text trains the same tokenizer
    assert train_bpe([TRAIN], vocab_size=300, show_progress=False).hf.to_str() == bpe.hf.to_str()
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_bpe([TRAIN], vocab_size=100, show_progress=False)


def test_pieces_encode_like_the_whole_text(bpe):
    """Long documents are encoded in pieces; the cut points must not change a single id."""
    text = "".join(f"Line {i}:  word{i % 17} and  spaces \n" + ("\n  indented\n" if i % 5 == 0 else "")
                   for i in range(300))
    pieces = list(text_pieces(text, max_chars=200))
    assert len(pieces) > 10 and "".join(pieces) == text
    for tok in tokenizers(bpe).values():
        whole = tok.encode(text, add_bos=False)
        assert [i for p in pieces for i in tok.encode(p, add_bos=False)] == whole
    # no safe place (no spaces): cut at the target, still losslessly
    blob = "日本語" * 1000
    pieces = list(text_pieces(blob, max_chars=500))
    assert [len(p) for p in pieces] == [500] * 4 + [1000] and "".join(pieces) == blob


def test_long_texts_encode_in_pieces_exactly_as_a_whole(bpe):
    """Texts over LONG_TEXT are encoded in pieces (short GIL holds); a run without any safe cut stays whole."""
    words = "".join(f"word{i % 23} and  more\n" for i in range(9000))
    text = words + "x" * 150_000 + words  # a spaceless run longer than two pieces
    assert len(text) > LONG_TEXT and len(list(text_pieces(text, exact=True))) > 2
    for tok in tokenizers(bpe).values():
        assert tok.encode(text, add_bos=True) == [tok.bos_id] + tok.hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["char", "bpe", "byte"])
def test_dataset_tokenizer_saved_and_special_strings_are_text(kind, tmp_path):
    src = tmp_path / "t.txt"
    doc = "a document that mentions <|eos|> and <|bos|> literally, with 日本語 and e\u0301.\n"
    src.write_text(doc * 50 + "tail line unseen: 😀\n")
    kw = {"vocab_size": 280} if kind == "bpe" else {}
    out = build_dataset([str(src)], tmp_path / "ds", tokenizer=kind, progress=False, log=None, **kw)
    tok = load_tokenizer(out)
    assert tok.kind == kind and tok.add_bos is False
    train, val = load_split(out, "train"), load_split(out, "val")
    ids = np.concatenate([train, val])
    assert tok.eos_id not in ids and tok.bos_id not in ids  # one document; the literals stayed text
    assert tok.decode(train.tolist()) + "\n" + tok.decode(val.tolist()) == (doc * 50).replace(
        "e\u0301", "\u00e9") + "tail line unseen: 😀"  # NFC-normalized, final newline stripped
