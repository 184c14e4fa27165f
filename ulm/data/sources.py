"""Where text comes from: local text files and folders, JSONL files, and named public corpora.

What one *document* is (the unit of de-duplication, of the length filter, and of EOS separation):
  text file     the whole file (`text_unit="file"`), or each blank-line separated paragraph ("paragraph"),
                or each non-empty line ("line")
  folder        every non-hidden file below it, sorted by relative path, each read as above
                (`*.jsonl` files as JSONL); symlinked subfolders are not entered, and a file symlink pointing
                outside the folder is refused unless `follow_symlinks` (`--follow-symlinks`)
  JSONL         one record: the string in its `field`
  TinyShakespeare   a text file (as above: one document by default)
  WikiText-2/103    one Wikipedia article (a top-level ` = Title = ` heading and what follows); these corpora
                come with their own train/valid/test files, which become the train/val/test splits
A source spec is a path, a corpus name (downloaded into the cache), or NAME=PATH: a local copy of a named
corpus (its downloaded file, or for WikiText a folder with wiki.{train,valid,test}.raw or {train,valid,test}.txt).
"""
from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ulm.data.download import check_digest, download
from ulm.util import cache_root, file_sha256

TEXT_UNITS = ("file", "paragraph", "line")


@dataclass(frozen=True)
class Document:
    text: str
    split: str | None = None  # "train" | "val" | "test" when the corpus defines its own splits


@dataclass(frozen=True)
class Corpus:
    """A named public corpus: one file at `urls` (mirrors, tried in order) with a published checksum."""
    name: str
    urls: tuple[str, ...]
    filename: str
    sha256: str
    size: int
    checksum_source: str
    members: dict[str, str] = field(default_factory=dict)  # split -> member of the zip; empty: a text file


NAMED_CORPORA: dict[str, Corpus] = {
    c.name: c for c in [
        Corpus("tinyshakespeare",
               ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
               "tinyshakespeare.txt",
               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394,
               "computed from a copy of karpathy/char-rnn input.txt (1115394 bytes)"),
        Corpus("wikitext-2",
               ("https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"),
               "wikitext-2-raw-v1.zip",
               "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", 4721645,
               "HF datasets wikitext/dataset_infos.json download_checksums",
               {"train": "wikitext-2-raw/wiki.train.raw", "val": "wikitext-2-raw/wiki.valid.raw",
                "test": "wikitext-2-raw/wiki.test.raw"}),
        Corpus("wikitext-103",
               ("https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"),
               "wikitext-103-raw-v1.zip",
               "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794", 191984949,
               "HF datasets wikitext/dataset_infos.json download_checksums",
               {"train": "wikitext-103-raw/wiki.train.raw", "val": "wikitext-103-raw/wiki.valid.raw",
                "test": "wikitext-103-raw/wiki.test.raw"}),
    ]
}
ALIASES = {"tiny-shakespeare": "tinyshakespeare", "shakespeare": "tinyshakespeare", "wikitext2": "wikitext-2",
           "wikitext103": "wikitext-103", "wikitext-2-raw": "wikitext-2", "wikitext-103-raw": "wikitext-103"}
WIKITEXT_LOCAL_NAMES = {"train": ("wiki.train.raw", "train.txt"), "val": ("wiki.valid.raw", "valid.txt", "val.txt"),
                        "test": ("wiki.test.raw", "test.txt")}
_ARTICLE = re.compile(r"^ = [^=].* = ?$", re.M)  # a top-level WikiText heading; " = = Sub = = " is not one


@dataclass
class Source:
    """One resolved input. `files` are (path, name recorded in the manifest); `describe()` has no absolute paths."""
    kind: str  # "text" | "folder" | "jsonl" | "corpus"
    name: str
    files: list[tuple[Path, str]]
    jsonl_field: str = "text"
    text_unit: str = "file"
    corpus: Corpus | None = None
    verified: bool = False  # a corpus file whose published checksum matched
    splits: dict[str, Path] = field(default_factory=dict)  # WikiText from an extracted folder
    num_documents: int = 0

    def describe(self) -> dict:
        d: dict = {"type": self.kind, "name": self.name}
        if self.kind == "corpus":
            d.update(checksum_verified=self.verified, url=self.corpus.urls[0])
        if self.kind == "jsonl" or (self.kind == "folder" and any(n.endswith(".jsonl") for _, n in self.files)):
            d["jsonl_field"] = self.jsonl_field
        if self.kind in ("text", "folder") or (self.corpus and not self.corpus.members):
            d["text_unit"] = self.text_unit
        d["files"] = [{"name": n, "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p, n in self.files]
        d["documents"] = self.num_documents
        return d

    def documents(self) -> Iterator[Document]:
        self.num_documents = 0
        for doc in self._documents():
            self.num_documents += 1
            yield doc

    def _documents(self) -> Iterator[Document]:
        if self.corpus is not None and self.corpus.members:
            if self.splits:  # a local extracted copy
                for split, path in self.splits.items():
                    yield from wikitext_articles(read_text(path), split)
                return
            path = self.files[0][0]
            try:
                with zipfile.ZipFile(path) as z:
                    for split, member in self.corpus.members.items():
                        yield from wikitext_articles(decode_utf8(z.read(member), f"{path}:{member}"), split)
            except (zipfile.BadZipFile, KeyError) as e:
                raise ValueError(f"{path}: not a {self.corpus.name} archive: {e}") from e
            return
        for path, name in self.files:
            if name.endswith(".jsonl") or self.kind == "jsonl":
                yield from jsonl_documents(path, self.jsonl_field)
            else:
                yield from text_documents(read_text(path), self.text_unit)


def resolve_source(spec: str | os.PathLike, jsonl_field: str = "text", text_unit: str = "file",
                   cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   follow_symlinks: bool = False) -> Source:
    """Turn a --source spec into a Source, downloading a named corpus into the cache when needed.

    Missing or unreadable inputs raise here, before any work is done. In a folder, a file symlink that points
    outside it raises ValueError unless `follow_symlinks` (links within the folder are read either way).
    """
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit must be one of {', '.join(TEXT_UNITS)}, got {text_unit!r}")
    if not jsonl_field:
        raise ValueError("jsonl_field must be a non-empty field name")
    spec = os.fspath(spec)
    name, sep, local = spec.partition("=")
    corpus_name = ALIASES.get(name.lower(), name.lower())
    if sep and corpus_name in NAMED_CORPORA:
        return _local_corpus(NAMED_CORPORA[corpus_name], Path(local), text_unit)
    if not sep and corpus_name in NAMED_CORPORA and not Path(spec).exists():
        corpus = NAMED_CORPORA[corpus_name]
        cache = Path(cache_dir) if cache_dir is not None else cache_root()
        path = download(list(corpus.urls), cache / corpus.filename, corpus.sha256, progress=progress)
        return Source("corpus", corpus.name, [(path, corpus.filename)], corpus=corpus, verified=True,
                      text_unit=text_unit)
    path = Path(spec)
    if sep and not path.exists():
        raise ValueError(f"source {spec!r}: {name!r} is not a named corpus (known: {', '.join(NAMED_CORPORA)})")
    check_readable(path)
    if path.is_dir():
        files = sorted((p, p.relative_to(path).as_posix()) for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"{path}: folder has no files")
        for p, _ in files:
            check_inside(p, path, follow_symlinks)
            check_readable(p)
        return Source("folder", path.resolve().name, files, jsonl_field, text_unit)
    kind = "jsonl" if path.suffix == ".jsonl" else "text"
    return Source(kind, path.name, [(path, path.name)], jsonl_field, text_unit)


def _local_corpus(corpus: Corpus, path: Path, text_unit: str) -> Source:
    """A named corpus from a local copy: its published file (verified), or an extracted WikiText folder."""
    check_readable(path)
    if path.is_dir():
        if not corpus.members:
            raise ValueError(f"{path}: {corpus.name} must be given as its file ({corpus.filename}), not a folder")
        splits = {}
        for split, names in WIKITEXT_LOCAL_NAMES.items():
            found = [path / n for n in names if (path / n).is_file()]
            if found:
                check_readable(found[0])
                splits[split] = found[0]
        if not splits:
            raise ValueError(f"{path}: no WikiText split files (expected e.g. wiki.train.raw or train.txt)")
        return Source("corpus", corpus.name, [(p, p.name) for p in splits.values()], corpus=corpus,
                      splits=splits, text_unit=text_unit)
    check_digest(path, corpus.sha256, f"{path} (local copy of {corpus.name})")
    return Source("corpus", corpus.name, [(path, corpus.filename)], corpus=corpus, verified=True,
                  text_unit=text_unit)


def check_inside(path: Path, folder: Path, follow_symlinks: bool) -> None:
    """Refuse a file of `folder` that is a link to text elsewhere, unless the caller opted in to following links."""
    if follow_symlinks or path.resolve().is_relative_to(folder.resolve()):
        return
    raise ValueError(f"{path}: a symlink to {path.resolve()}, outside the source folder {folder}; "
                     "pass --follow-symlinks to read it")


def check_readable(path: Path) -> None:
    """OSError with a plain message when `path` is missing or cannot be opened for reading."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise OSError(f"{path}: cannot access: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(f"{path}: folder is not readable")
        return
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise OSError(f"{path}: cannot read: {e.strerror}") from None


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"convert it to UTF-8 first") from None


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"{path}: cannot read: {e.strerror}") from None
    return decode_utf8(data, str(path))


def text_documents(text: str, unit: str) -> Iterator[Document]:
    if unit == "file":
        yield Document(text)
    elif unit == "paragraph":
        yield from (Document(p) for p in re.split(r"\n[^\S\n]*\n", text) if p.strip())
    else:
        yield from (Document(line) for line in text.splitlines() if line.strip())


def jsonl_documents(path: Path, field_name: str) -> Iterator[Document]:
    for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict) or field_name not in record:
            raise ValueError(f"{path}:{n}: record has no field {field_name!r} (set it with --jsonl-field)")
        value = record[field_name]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{n}: field {field_name!r} is {type(value).__name__}, expected a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path}:{n}: field {field_name!r} holds an unpaired surrogate escape") from None
        yield Document(value)


def wikitext_articles(text: str, split: str) -> Iterator[Document]:
    """Cut a WikiText file at its top-level headings: one document per article."""
    starts = [m.start() for m in _ARTICLE.finditer(text)]
    if not starts or starts[0] > 0:
        starts.insert(0, 0)
    for a, b in zip(starts, starts[1:] + [len(text)]):
        if text[a:b].strip():
            yield Document(text[a:b], split)
