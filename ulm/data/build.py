"""`build_dataset`: sources -> cleaned documents -> splits -> tokenizer -> flat token files + manifest.

The build happens in a hidden temporary folder beside `out_dir`, manifest.json is written last, and the folder is
renamed into place only when everything succeeded: a failed build leaves nothing that looks like a dataset.
The folder's name holds the builder's PID: one left by a killed build is removed by the next build of `out_dir`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import psutil

from ulm.data.clean import CleaningConfig, clean_documents, format_report
from ulm.data.dataset import FORMAT, MANIFEST, SPLITS, token_dtype
from ulm.data.sources import Document, Source, resolve_source
from ulm.progress import progress_bar
from ulm.tokenizer import TOKENIZER_FILE, Tokenizer, byte_level, char_level, text_pieces, train_bpe
from ulm.util import file_sha256, replace_dir

TOKENIZER_KINDS = ("char", "bpe", "byte")
DEFAULT_BPE_VOCAB = 4096
BATCH_CHARS = 1 << 21  # characters per encode_batch call
SEPARATOR_DOC = "documents are encoded without BOS and joined with one EOS token between consecutive documents"


def build_dataset(sources: Sequence[str | os.PathLike | Source], out_dir: str | os.PathLike,
                  tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.0, jsonl_field: str = "text", text_unit: str = "file",
                  normalization: str = "NFC", whitespace: bool = True, dedup: bool = True, min_chars: int = 1,
                  shuffle_seed: int | None = None, cache_dir: str | os.PathLike | None = None,
                  overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = print,
                  follow_symlinks: bool = False) -> Path:
    """Build a dataset directory from `sources` (paths, corpus names or NAME=PATH specs) and return its path.

    Documents without a split of their own are split in order: about the first 1 - val - test of their characters
    are train, then val, then test, at whole documents where possible (see assign_splits); `shuffle_seed`
    shuffles them first.
    vocab_size applies to "bpe" only (default 4096); "char" takes its vocabulary from the train split.
    follow_symlinks: read file symlinks in a folder source that point outside it (refused otherwise).
    """
    t0 = time.perf_counter()
    log = log or (lambda _: None)
    check_build_args(sources, tokenizer, vocab_size, val_fraction, test_fraction)
    cleaning = CleaningConfig(normalization, whitespace, dedup, min_chars)
    cleaning.validate()
    out = Path(out_dir)
    remove_stale_staging(out)
    check_out_dir(out, overwrite)

    resolved = [s if isinstance(s, Source) else resolve_source(s, jsonl_field, text_unit, cache_dir, progress,
                                                               follow_symlinks) for s in sources]
    docs, report = clean_documents((d for s in resolved for d in s.documents()), cleaning, progress)
    log(f"read {len(resolved)} source(s): " + ", ".join(f"{s.name} ({s.num_documents} documents)" for s in resolved))
    log("cleaning:")
    for line in format_report(report):
        log(line)
    splits = assign_splits(docs, val_fraction, test_fraction, shuffle_seed)
    for name in ("train", "val"):
        if not splits[name]:
            raise ValueError(f"the {name} split is empty ({len(docs)} documents after cleaning); "
                             + ("raise --val-fraction" if name == "val" else "add training text"))

    tok = make_tokenizer(tokenizer, splits["train"], vocab_size, progress)
    tok.add_bos = False  # the token files have no BOS; models trained on them should not get one either
    params = dict(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, test_fraction=test_fraction,
                  jsonl_field=jsonl_field, text_unit=text_unit, shuffle_seed=shuffle_seed, **cleaning.to_dict())
    manifest = {"format": FORMAT, "sources": [s.describe() for s in resolved], "cleaning": report, "params": params}
    text = write_dataset(out, splits, tok, manifest, progress)

    log(f"tokenizer: {tokenizer}, vocab {tok.vocab_size}, token dtype {token_dtype(tok.vocab_size).name}")
    for name, info in manifest["splits"].items():
        log(f"  {name}: {info['num_tokens']:,} tokens, {info['num_documents']:,} documents, "
            f"{info['num_chars']:,} chars -> {info['file']}")
    log(f"dataset id: {hashlib.sha256(text.encode('utf-8')).hexdigest()}")
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def check_build_args(sources: Sequence, tokenizer: str, vocab_size: int | None, val_fraction: float,
                     test_fraction: float) -> None:
    if tokenizer not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {tokenizer!r}")
    if vocab_size is not None and tokenizer != "bpe":
        raise ValueError(f"vocab_size applies to the bpe tokenizer only ({tokenizer} sets its own)")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 "
                         f"and sum to less than 1")
    if not sources:
        raise ValueError("no sources given")


def write_dataset(out: Path, splits: dict[str, list[str]], tok: Tokenizer, manifest: dict, progress: bool) -> str:
    """Write the tokenizer, the split token files and, last, the manifest (completed here) in a staging folder,
    then swap it in at `out`; returns the manifest's text."""
    tmp = staging_dir(out, "tmp", os.getpid())
    dtype = token_dtype(tok.vocab_size)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tok.save(tmp)
        manifest["splits"] = {name: write_split(tmp / f"{name}.bin", splits[name], tok, dtype, progress)
                              for name in SPLITS if splits[name]}
        manifest["tokenizer"] = {"kind": manifest["params"]["tokenizer"], "vocab_size": tok.vocab_size,
                                 "file": TOKENIZER_FILE, "sha256": file_sha256(tmp / TOKENIZER_FILE),
                                 "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        manifest["documents"] = {"bos": False, "separator": "eos", "description": SEPARATOR_DOC}
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")  # last: its presence marks a finished build
        replace_dir(tmp, out, staging_dir(out, "old", os.getpid()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return text


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to build over anything but nothing, an empty folder, or (with overwrite) an older dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace a dataset there")
    if not (out / MANIFEST).is_file():
        raise ValueError(f"--out {out} is not empty and holds no dataset ({MANIFEST}); refusing to replace it")


def staging_dir(out: Path, kind: str, pid: int) -> Path:
    """The hidden folder beside `out` where process `pid` builds ("tmp") or sets aside an older dataset ("old")."""
    return out.parent / f".{out.name}.{kind}-{pid}"


def remove_stale_staging(out: Path) -> None:
    """Clean up after builds of `out` that were killed (SIGKILL, power loss): their staging folders, named by
    their PID, outlive them. Folders of live builds are left alone."""
    for kind in ("tmp", "old"):
        for path in out.parent.glob(glob.escape(f".{out.name}.{kind}-") + "*"):
            pid = path.name.rpartition("-")[2]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            if kind == "old" and not out.exists():  # killed between replace_dir's two renames: restore it
                os.replace(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def assign_splits(docs: list[Document], val_fraction: float, test_fraction: float,
                  shuffle_seed: int | None = None) -> dict[str, list[str]]:
    """Documents per split: those with a split of their own keep it (and come first); the others are split in order.

    Each boundary goes to the document boundary nearest its character fraction; only where that would leave a
    split with a non-zero fraction empty (e.g. one long document) is a document cut, at the newline nearest the
    exact position (or at the position itself when the document has none near).
    """
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    free = [d.text for d in docs if d.split is None]
    for d in docs:
        if d.split is not None:
            out[d.split].append(d.text)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(free)
    ends = np.cumsum([0] + [len(t) for t in free])
    total = int(ends[-1])
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    cuts: list[int] = []
    for k, target in enumerate((total * fractions[0], total * (fractions[0] + fractions[1]))):
        b = int(ends[np.abs(ends - target).argmin()])
        prev = cuts[-1] if cuts else 0
        if (b <= prev and fractions[k] > 0) or (b >= total and any(f > 0 for f in fractions[k + 1:])):
            b = round(target)  # no document boundary works: cut inside one
        cuts.append(b)
    for text, start, end in zip(free, ends[:-1], ends[1:]):
        pieces = cut_text(text, [int(c - start) for c in cuts if start < c < end])
        split_idx = sum(c <= start for c in cuts)
        for k, piece in enumerate(pieces):
            if piece:
                out[SPLITS[split_idx + k]].append(piece)
    return out


def cut_text(text: str, positions: list[int]) -> list[str]:
    """Cut `text` at the newline nearest each position (dropping that newline), or at the position itself."""
    pieces, last = [], 0
    for p in positions:
        before, after = text.rfind("\n", last, p), text.find("\n", p)
        candidates = [i for i in (before, after) if i >= last]
        if candidates:
            i = min(candidates, key=lambda i: abs(i - p))
            pieces.append(text[last:i])
            last = i + 1
        else:
            pieces.append(text[last:p])
            last = p
    pieces.append(text[last:])
    return pieces


def make_tokenizer(kind: str, train_texts: list[str], vocab_size: int | None, progress: bool) -> Tokenizer:
    if kind == "byte":
        return byte_level()
    if kind == "char":
        chars: set[str] = set()
        for t in progress_bar(train_texts, desc="char vocabulary", unit="doc", disable=not progress, leave=False):
            chars.update(t)
        return char_level(chars)
    pieces = [p for t in train_texts for p in text_pieces(t)]
    return train_bpe(pieces, vocab_size or DEFAULT_BPE_VOCAB, show_progress=progress, length=len(pieces))


def write_split(path: Path, texts: list[str], tok: Tokenizer, dtype: np.dtype, progress: bool) -> dict:
    """Encode `texts` (EOS between them) into a flat token file; return its manifest entry."""
    h, n = hashlib.sha256(), 0
    eos = np.array([tok.eos_id], dtype=dtype)
    num_chars = sum(len(t) for t in texts)
    with open(path, "wb") as f, progress_bar(total=num_chars, desc=f"encode {path.stem}", unit="char",
                                             unit_scale=True, disable=not progress, leave=False) as bar:
        for batch in _batches(texts):
            encoded = iter(tok.encode_batch([s for s in batch if s is not None]))
            arrays = [eos if s is None else np.asarray(next(encoded), dtype=dtype) for s in batch]
            data = np.concatenate(arrays).tobytes()
            f.write(data)
            h.update(data)
            n += len(data) // dtype.itemsize
            bar.update(sum(len(s) for s in batch if s is not None))
    return {"file": path.name, "dtype": dtype.name, "num_tokens": n, "num_documents": len(texts),
            "num_chars": num_chars, "sha256": h.hexdigest()}


def _batches(texts: list[str]) -> Iterator[list[str | None]]:
    """Pieces of all texts in order, with None where an EOS goes, grouped into batches of about BATCH_CHARS."""
    batch: list[str | None] = []
    size = 0
    for i, text in enumerate(texts):
        if i:
            batch.append(None)
        for piece in text_pieces(text):
            batch.append(piece)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch
