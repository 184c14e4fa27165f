"""Cleaning documents before tokenization; every step counts what it changed or removed.

Steps, in order: Unicode normalization (NFC by default), whitespace clean-up, a minimum-length filter (which
always drops documents left empty), and exact-duplicate removal (the first copy of a document is kept, across
all sources and splits, so no evaluation document repeats a training one).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ulm.data.sources import Document
from ulm.progress import progress_bar

NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n|\Z)")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls and DEL, keeping \t and \n
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleaningConfig:
    normalization: str = "NFC"  # a unicodedata form, or "none"
    whitespace: bool = True  # CRLF/CR -> LF, drop trailing spaces, control characters, >1 blank line, edge newlines
    dedup: bool = True  # drop exact duplicate documents
    min_chars: int = 1  # drop documents shorter than this (after the steps above)

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if self.min_chars < 1:
            raise ValueError(f"min_chars must be >= 1, got {self.min_chars}")

    def to_dict(self) -> dict:
        return asdict(self)


def clean_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUN.sub("\n\n", text).strip("\n")


def clean_documents(docs: Iterable[Document], cfg: CleaningConfig, progress: bool = True
                    ) -> tuple[list[Document], dict]:
    """The kept documents, in order, and a report: per step, documents changed/removed and characters removed."""
    cfg.validate()
    report = {
        "documents_in": 0,
        "normalize": {"form": cfg.normalization, "changed_documents": 0, "chars_removed": 0},
        "whitespace": {"enabled": cfg.whitespace, "changed_documents": 0, "chars_removed": 0},
        "min_length": {"min_chars": cfg.min_chars, "removed_documents": 0, "chars_removed": 0},
        "dedup": {"enabled": cfg.dedup, "removed_documents": 0, "chars_removed": 0},
    }
    seen: set[bytes] = set()
    kept = []
    for doc in progress_bar(docs, desc="clean", unit="doc", disable=not progress, leave=False):
        report["documents_in"] += 1
        text = doc.text
        if cfg.normalization != "none" and not unicodedata.is_normalized(cfg.normalization, text):
            new = unicodedata.normalize(cfg.normalization, text)
            _count(report["normalize"], "changed_documents", len(text) - len(new))
            text = new
        if cfg.whitespace:
            new = clean_whitespace(text)
            if new != text:
                _count(report["whitespace"], "changed_documents", len(text) - len(new))
                text = new
        if len(text) < cfg.min_chars:
            _count(report["min_length"], "removed_documents", len(text))
            continue
        if cfg.dedup:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                _count(report["dedup"], "removed_documents", len(text))
                continue
            seen.add(key)
        kept.append(Document(text, doc.split))
    report["documents_out"] = len(kept)
    return kept, report


def _count(step: dict, key: str, chars_removed: int) -> None:  # negative: characters added (NFD/NFKD expand)
    step[key] += 1
    step["chars_removed"] += chars_removed


def format_report(report: dict) -> list[str]:
    """One line per cleaning step, for printing."""
    n, w, d, m = report["normalize"], report["whitespace"], report["dedup"], report["min_length"]
    return [
        f"  read {report['documents_in']} documents, kept {report['documents_out']}",
        f"  normalize ({n['form']}): {n['changed_documents']} documents changed, {n['chars_removed']} chars removed",
        f"  whitespace: {w['changed_documents']} documents changed, {w['chars_removed']} chars removed"
        + ("" if w["enabled"] else " (off)"),
        f"  min length {m['min_chars']}: {m['removed_documents']} documents removed ({m['chars_removed']} chars)",
        f"  dedup: {d['removed_documents']} duplicate documents removed ({d['chars_removed']} chars)"
        + ("" if d["enabled"] else " (off)"),
    ]
