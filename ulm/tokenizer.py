"""Tokenizers: a thin wrapper over HF `tokenizers`, saved as tokenizer.json beside a dataset or checkpoint.

Every µLM tokenizer has BOS, EOS and PAD special tokens and round-trips any UTF-8 text exactly.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ulm.util import atomic_write_text, check_json_types, read_json_object

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META = "tokenizer_meta.json"
META_TYPES = {"kind": str, "bos": str, "eos": str, "pad": (str, type(None)), "add_bos": bool}
LONG_TEXT = 4096  # characters
PIECE_CHARS = 1 << 16  # long texts are encoded in pieces of about this size
_SAFE_CUT = re.compile(r"(?<=\w)(?= \w)|(?<=\w\n)(?=\w)")


class Tokenizer:
    """Text <-> ids. `add_bos` says whether encode() puts BOS first (models trained that way expect it)."""

    def __init__(self, hf: HFTokenizer, bos: str = BOS, eos: str = EOS, pad: str | None = PAD, add_bos: bool = True,
                 kind: str = "custom"):
        self.hf = hf
        # Text is always text: a literal "<|eos|>" in it is spelled with ordinary tokens, so every string
        # round-trips and user input cannot inject special ids (those come from add_bos / eos_id only).
        # The flag is not saved in tokenizer.json, hence set here.
        hf.encode_special_tokens = True
        self.kind = kind
        self.add_bos = add_bos
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self._id(bos)
        self.eos_id = self._id(eos)
        self.pad_id = self._id(pad) if pad is not None else self.eos_id

    def _id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no special token {token!r}")
        return i

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def vocabulary(self) -> dict[str, int]:
        """Every token (added ones too) -> its id: two tokenizers with the same one encode alike."""
        return self.hf.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: its vocabulary entry's length (byte-level entries
        spell a byte per character, byte fallbacks one byte in six). As text round-trips, a text of n characters
        needs at least n / max_token_chars tokens: a bound that needs no encoding."""
        return max(map(len, self.hf.get_vocab(with_added_tokens=False)), default=1)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """The <0xNN> tokens of a byte-fallback vocabulary. Their text depends on the tokens after them: a run of
        them that is not valid UTF-8 decodes as one U+FFFD per token, valid bytes included."""
        if not getattr(self.hf.model, "byte_fallback", False):
            return frozenset()
        ids = (self.hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    @functools.cached_property
    def _entries(self) -> list[str]:
        return [self.hf.id_to_token(i) or "" for i in range(self.vocab_size)]

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's vocabulary entry."""
        entries = self._entries
        return [entries[i] for i in ids]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        if len(text) <= LONG_TEXT:
            return ids + self.hf.encode(text, add_special_tokens=False).ids
        # the batch call lets other threads run meanwhile (encode holds the GIL: seconds for megabytes), and pieces
        # keep each hold short while their ids become Python lists
        for e in self.hf.encode_batch_fast(list(text_pieces(text, exact=True)), add_special_tokens=False):
            ids.extend(e.ids)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / TOKENIZER_FILE, self.hf.to_str())
        meta = dict(kind=self.kind, bos=self.bos_token, eos=self.eos_token, pad=self.pad_token, add_bos=self.add_bos)
        atomic_write_text(d / TOKENIZER_META, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        d = Path(directory)
        path = d / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {d}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid tokenizer file: {e}") from e
        meta_path = d / TOKENIZER_META
        meta = read_json_object(meta_path) if meta_path.is_file() else {}
        check_json_types(meta, META_TYPES, meta_path)
        try:
            return cls(hf, bos=meta.get("bos", BOS), eos=meta.get("eos", EOS), pad=meta.get("pad", PAD),
                       add_bos=meta.get("add_bos", True), kind=meta.get("kind", "custom"))
        except ValueError as e:  # a special token its vocabulary lacks
            raise ValueError(f"{path}: {e}" + (f" (named in {meta_path.name})" if meta else "")) from e

    @classmethod
    def load_for_model(cls, directory: Path, vocab_size: int, config: Path,
                       error: type[ValueError] = ValueError) -> Tokenizer:
        """The tokenizer of a model directory, refused (`error`) when it is unusable or outgrows the model's
        vocabulary (`config`: the file that states it)."""
        try:
            tokenizer = cls.load(directory)
        except (OSError, ValueError) as e:
            raise error(f"{directory} has no usable tokenizer: {e}") from e
        if tokenizer.vocab_size > vocab_size:
            raise error(f"{directory / TOKENIZER_FILE}: tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the "
                        f"model's ({vocab_size}, {config})")
        return tokenizer


def text_pieces(text: str, max_chars: int = PIECE_CHARS, exact: bool = False) -> Iterator[str]:
    """`text` in pieces of about max_chars, cut where GPT-2 style pre-tokenization has a boundary anyway.

    A cut goes before a space between two word characters ("a| b") or after a newline between them ("a\n|b"):
    there the regex splits the same way with or without the rest of the text, so encoding the pieces gives the
    ids of the whole (char and byte tokenizers never merge across characters at all). Where no such place is
    within max_chars of the target (long runs without spaces), the cut is at the target itself, or with `exact`
    at the next such place however far.
    """
    start = 0
    while len(text) - start > 2 * max_chars:
        target = start + max_chars
        m = _SAFE_CUT.search(text, target, len(text) if exact else target + max_chars)
        if m is None and exact:
            break
        cut = m.start() if m else target
        yield text[start:cut]
        start = cut
    yield text[start:]


def byte_level() -> Tokenizer:
    """256 byte tokens + BOS/EOS/PAD (vocab 259): needs no training and round-trips any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # GPT-2's printable stand-ins for the 256 bytes
    byte_chars = sorted(alphabet, key=_byte_of)
    vocab = {c: i for i, c in enumerate(byte_chars)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([BOS, EOS, PAD])
    return Tokenizer(hf, kind="byte")


def char_level(chars: str | set[str] | list[str]) -> Tokenizer:
    """One token per character seen in training, plus 256 byte tokens that spell any other character."""
    vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([BOS, EOS, PAD])
    return Tokenizer(hf, kind="char")


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cp = ord(char)
    if cp in printable:
        return cp
    others = [b for b in range(256) if b not in printable]
    return others[cp - 256]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True,
              length: int | None = None) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on `texts`; BOS/EOS/PAD are ids 0/1/2.

    All 256 bytes are in the initial alphabet, so any text encodes, including characters never seen in training.
    """
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be >= 259 (256 bytes + BOS/EOS/PAD) for byte-level BPE, got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=[BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(hf, kind="bpe")
