"""Dataset assembly: sources, cleaning, splits, token files, manifest, downloader, CLI errors."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ulm.cli import main
from ulm.data import build as build_module
from ulm.data import build_dataset, dataset_id, load_manifest, load_split, load_tokenizer, verify_dataset
from ulm.data.build import assign_splits
from ulm.data.clean import CleaningConfig, clean_documents
from ulm.data.dataset import token_dtype
from ulm.data.download import ChecksumError, download
from ulm.data.sources import NAMED_CORPORA, Corpus, Document, resolve_source

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"Line {i}: the quick brown fox, naïve café {i * 7 % 13}.\n" for i in range(400))


def build(sources, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return build_dataset([str(s) for s in sources], out, **kw)


def split_docs(ids: np.ndarray, tok) -> list[str]:
    """Decode a token stream back into its documents (EOS separates them)."""
    cuts = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(part[part != tok.eos_id].tolist()) for part in np.split(np.asarray(ids), cuts)]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_build_is_reproducible_and_round_trips(kind, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    kw = {"vocab_size": 320} if kind == "bpe" else {}
    a = build([src], tmp_path / "a", tokenizer=kind, **kw)
    b = build([src], tmp_path / "b", tokenizer=kind, **kw)
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert dataset_id(a) == dataset_id(b) == hashlib.sha256((a / "manifest.json").read_bytes()).hexdigest()
    m = load_manifest(a)
    assert m["format"] == "ulm-dataset/1"
    assert m["sources"][0]["files"][0]["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert str(tmp_path) not in (a / "manifest.json").read_text()  # no absolute paths in the hashed content
    verify_dataset(a)
    tok = load_tokenizer(a)
    assert tok.kind == kind and tok.add_bos is False
    train, val = load_split(a, "train"), load_split(a, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and train.ndim == 1
    # one document cut at the newline nearest 90%: the two splits are the cleaned text minus that newline
    assert tok.decode(train.tolist()) + "\n" + tok.decode(val.tolist()) == TEXT.rstrip("\n")
    assert abs(len(train) / (len(train) + len(val)) - 0.9) < 0.01
    assert m["splits"]["train"]["num_tokens"] == len(train)
    # a different option gives a different id
    c = build([src], tmp_path / "c", tokenizer=kind, val_fraction=0.2, **kw)
    assert dataset_id(c) != dataset_id(a)


def test_documents_joined_by_eos_and_folder_order(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    docs = {"b.txt": "second <|eos|> document", "a.txt": "first document\nwith two lines",
            "sub/c.txt": "third", ".hidden": "not read", "d.txt": "fourth document, held out " * 4}
    for name, text in docs.items():
        (folder / name).write_text(text)
    out = build([folder], tmp_path / "ds", tokenizer="byte", val_fraction=0.3)
    tok = load_tokenizer(out)
    train, val = load_split(out, "train"), load_split(out, "val")
    assert (train == tok.bos_id).sum() == 0
    # sorted relative paths a, b, d | sub/c: 160 chars, the 70% cut moves to the nearest document boundary (155);
    # the literal "<|eos|>" in b is text, not a separator
    assert split_docs(train, tok) == [docs["a.txt"], docs["b.txt"], docs["d.txt"].rstrip()]
    assert split_docs(val, tok) == ["third"]
    assert load_manifest(out)["sources"][0]["type"] == "folder"
    assert [f["name"] for f in load_manifest(out)["sources"][0]["files"]] == ["a.txt", "b.txt", "d.txt", "sub/c.txt"]


def test_cleaning_counts():
    docs = [Document("cafe\u0301 au lait  \r\nsecond line\t\n\n\n\nthird\n"),  # NFD, CRLF, trailing ws, blank run
            Document("café au lait\nsecond line\n\nthird"),  # the same once cleaned: a duplicate
            Document("tiny"), Document("   \n \n"), Document("a bell\x07 rings"), Document("unique text here")]
    kept, report = clean_documents(docs, CleaningConfig(min_chars=5), progress=False)
    assert [d.text for d in kept] == ["café au lait\nsecond line\n\nthird", "a bell rings", "unique text here"]
    assert report["documents_in"] == 6 and report["documents_out"] == 3
    assert report["normalize"] == {"form": "NFC", "changed_documents": 1, "chars_removed": 1}
    assert report["whitespace"]["changed_documents"] == 3  # doc 1, the blank doc, the bell
    assert report["whitespace"]["chars_removed"] == (2 + 1 + 1 + 2 + 1) + 6 + 1
    assert report["min_length"] == {"min_chars": 5, "removed_documents": 2, "chars_removed": 4}
    assert report["dedup"] == {"enabled": True, "removed_documents": 1, "chars_removed": 31}
    # each step can be turned off
    kept, report = clean_documents(docs, CleaningConfig(normalization="none", whitespace=False, dedup=False),
                                   progress=False)
    assert len(kept) == 6 and report["whitespace"]["changed_documents"] == 0
    with pytest.raises(ValueError, match="normalization"):
        CleaningConfig(normalization="NFX").validate()


def test_cleaning_report_in_manifest_and_text_units(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("alpha beta\nalpha beta\ngamma\n\ndelta epsilon\nalpha beta\nzeta eta theta\n")
    out = build([src], tmp_path / "ds", tokenizer="byte", text_unit="line", min_chars=6, val_fraction=0.25)
    m = load_manifest(out)
    assert m["cleaning"]["dedup"]["removed_documents"] == 2
    assert m["cleaning"]["min_length"]["removed_documents"] == 1  # "gamma"
    assert m["splits"]["train"]["num_documents"] + m["splits"]["val"]["num_documents"] == 3
    tok = load_tokenizer(out)
    assert split_docs(load_split(out, "train"), tok) == ["alpha beta", "delta epsilon"]
    assert split_docs(load_split(out, "val"), tok) == ["zeta eta theta"]
    out = build([src], tmp_path / "para", tokenizer="byte", text_unit="paragraph", val_fraction=0.5)
    assert load_manifest(out)["cleaning"]["documents_in"] == 2


def test_jsonl_field(tmp_path):
    src = tmp_path / "data.jsonl"
    rows = [{"content": "first record", "id": 1}, {"content": "second record\nwith a newline", "id": 2},
            {"content": "third record \u2028 odd separator", "id": 3}, {"content": "fourth", "id": 4}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    out = build([src], tmp_path / "ds", tokenizer="char", jsonl_field="content", val_fraction=0.1)
    tok = load_tokenizer(out)
    got = split_docs(load_split(out, "train"), tok) + split_docs(load_split(out, "val"), tok)
    assert got == [r["content"] for r in rows]
    assert load_manifest(out)["sources"][0]["jsonl_field"] == "content"
    with pytest.raises(ValueError, match=r"data.jsonl:1: record has no field 'text'"):
        build([src], tmp_path / "bad", tokenizer="char")
    src.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: field 'text' is int"):
        build([src], tmp_path / "bad", tokenizer="char")
    assert not (tmp_path / "bad").exists()


def test_memmap_dtype_choice(tmp_path):
    assert token_dtype(259) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(100_000) == np.uint32
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    out = build([src], tmp_path / "ds", tokenizer="byte")
    info = load_manifest(out)["splits"]["train"]
    assert info["dtype"] == "uint16" and (out / "train.bin").stat().st_size == 2 * info["num_tokens"]
    # a uint32 dataset reads back as uint32 (ids past 65535 survive)
    ids = np.array([0, 70_000, 65_536, 5], dtype="<u4")
    (out / "train.bin").write_bytes(ids.tobytes())
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"].update(dtype="uint32", num_tokens=4)
    (out / "manifest.json").write_text(json.dumps(m))
    got = load_split(out, "train")
    assert got.dtype == np.uint32 and got.tolist() == ids.tolist()


def test_invalid_datasets_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        load_split(tmp_path / "empty", "train")
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    out = build([src], tmp_path / "ds", tokenizer="byte")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_split(out, "test")
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="val.bin has .* bytes"):
        load_split(out, "val")
    (out / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format"):
        dataset_id(out)


def test_out_dir_protection(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        build([src], tmp_path / "precious")
    with pytest.raises(ValueError, match="refusing"):
        build([src], tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    out = build([src], tmp_path / "ds", tokenizer="byte")
    first = dataset_id(out)
    build([src], out, tokenizer="char", overwrite=True)
    assert dataset_id(out) != first and load_tokenizer(out).kind == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "precious", "t.txt"]  # no temp dirs left


def test_failed_build_leaves_old_dataset_and_no_temp(tmp_path, monkeypatch):
    """A failure after the temporary folder exists (here: the disk fills while writing val) removes it and leaves
    the dataset already at --out untouched."""
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    out = build([src], tmp_path / "ds", tokenizer="byte")
    before = dataset_id(out)
    real = build_module.write_split

    def failing(path, *args):
        if path.name == "val.bin":
            assert (path.parent / "train.bin").is_file() and path.parent.name.startswith(".ds.tmp-")
            raise OSError(28, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(build_module, "write_split", failing)
    with pytest.raises(OSError, match="No space left"):
        build([src], out, tokenizer="char", overwrite=True)
    assert dataset_id(out) == before and load_tokenizer(out).kind == "byte"
    verify_dataset(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "t.txt"]


def test_split_assignment():
    docs = [Document("a" * 50), Document("b" * 30 + "\n" + "b" * 19), Document("c" * 10, "test"),
            Document("d" * 10, "val")]
    s = assign_splits(docs, 0.2, 0.1)  # free chars 100, document boundaries at 0, 50, 100
    # 70 -> boundary 50; 90 -> boundary 100 would leave test empty, so the second document is cut at its newline
    assert s == {"train": ["a" * 50], "val": ["d" * 10, "b" * 30], "test": ["c" * 10, "b" * 19]}
    one = [Document("x" * 10 + "\n" + "y" * 5)]  # a single document is cut at the newline nearest 60%
    assert assign_splits(one, 0.4, 0.0) == {"train": ["x" * 10], "val": ["y" * 5], "test": []}
    assert assign_splits([Document("z" * 10)], 0.3, 0.0) == {"train": ["z" * 7], "val": ["z" * 3], "test": []}


def test_download_verifies_and_resumes(http_server, tmp_path):
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    http_server.files["/f.bin"] = data
    cache = tmp_path / "cache"
    # cut after 100000 bytes: an error, a .part for the next try, and no file under the final name
    http_server.cut["/f.bin"] = 100_000
    with pytest.raises(OSError, match="could not download"):
        download(http_server.url + "/f.bin", cache / "f.bin", sha, progress=False)
    assert not (cache / "f.bin").exists() and (cache / "f.bin.part").stat().st_size == 100_000
    path = download(http_server.url + "/f.bin", cache / "f.bin", sha, progress=False)
    assert path.read_bytes() == data and not (cache / "f.bin.part").exists()
    assert http_server.requests[-1] == ("/f.bin", "bytes=100000-")
    # cached: verified again, not fetched
    n = len(http_server.requests)
    download(http_server.url + "/f.bin", cache / "f.bin", sha, progress=False)
    assert len(http_server.requests) == n
    # a cached file damaged since is fetched again
    (cache / "f.bin").write_bytes(b"rot")
    assert download(http_server.url + "/f.bin", cache / "f.bin", sha, progress=False).read_bytes() == data
    # the first mirror is down (404), the second answers
    path = download([http_server.url + "/missing", http_server.url + "/f.bin"], cache / "g.bin", sha, progress=False)
    assert path.read_bytes() == data


def test_download_checksum_failure_leaves_nothing(http_server, tmp_path):
    http_server.files["/f.bin"] = b"not what was published"
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch: expected 0000"):
        download(http_server.url + "/f.bin", cache / "f.bin", "0" * 64, progress=False)
    assert list(cache.iterdir()) == []


def test_named_corpus_download_and_wikitext_articles(http_server, tmp_path, monkeypatch):
    """The WikiText path end to end (download, verify, unzip, one document per article, corpus splits), served
    locally: the registry entry is pointed at the test server, everything else is the real code."""
    def article(title, n):
        return f" = {title} = \n \n {title} is a topic . \n \n = = Section = = \n \n Text {n} about {title} . \n \n"
    files = {"train": article("Alpha", 1) + article("Beta", 2) + article("Alpha", 1),
             "valid": article("Gamma", 3), "test": article("Delta", 4)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split, text in files.items():
            z.writestr(f"wt/wiki.{split}.raw", text)
    data = buf.getvalue()
    http_server.files["/wt.zip"] = data
    real = NAMED_CORPORA["wikitext-2"]
    corpus = Corpus("wikitext-2", (http_server.url + "/wt.zip",), "wt.zip", hashlib.sha256(data).hexdigest(),
                    len(data), "test", {"train": "wt/wiki.train.raw", "val": "wt/wiki.valid.raw",
                                        "test": "wt/wiki.test.raw"})
    monkeypatch.setitem(NAMED_CORPORA, "wikitext-2", corpus)
    out = build(["wikitext-2"], tmp_path / "ds", tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "cache")
    m = load_manifest(out)
    assert (tmp_path / "cache" / "wt.zip").is_file()
    assert m["sources"][0]["checksum_verified"] is True and m["cleaning"]["dedup"]["removed_documents"] == 1
    tok = load_tokenizer(out)
    train = split_docs(load_split(out, "train"), tok)
    assert [d.splitlines()[0] for d in train] == [" = Alpha =", " = Beta ="]
    assert "Text 2 about Beta ." in train[1]
    assert split_docs(load_split(out, "val"), tok)[0].startswith(" = Gamma =")
    assert split_docs(load_split(out, "test"), tok)[0].startswith(" = Delta =")
    # a local copy with the wrong checksum is refused, naming the corpus
    bad = tmp_path / "copy.zip"
    bad.write_bytes(data + b"x")
    with pytest.raises(ChecksumError, match="local copy of wikitext-2"):
        resolve_source(f"wikitext-2={bad}")
    # the real registry keeps the published checksums
    assert real.sha256 == "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"


def test_wikitext_local_folder(tmp_path):
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "train.txt").write_text(" = A = \n \n Some text . \n \n = B = \n \n More text . \n")
    (folder / "valid.txt").write_text(" = C = \n \n Held out . \n")
    src = resolve_source(f"wikitext-2={folder}")
    docs = list(src.documents())
    assert [(d.split, d.text.split("\n")[0]) for d in docs] == [("train", " = A = "), ("train", " = B = "),
                                                               ("val", " = C = ")]
    assert src.describe()["checksum_verified"] is False


def test_cli_bad_inputs(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    out = tmp_path / "out"
    # the real command in a subprocess: exit status 2, one clear line, nothing left behind
    r = subprocess.run([sys.executable, "-m", "ulm", "data", "build", "--no-progress", "--source", str(good),
                        "--source", str(latin1), "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "ulm data: error: " in r.stderr and "latin1.txt: not valid UTF-8 (byte 0xe9 at offset 3)" in r.stderr
    assert sorted(tmp_path.iterdir()) == [good, latin1]
    # the other bad inputs through the same entry point, in-process (a subprocess costs a torch import each)
    sock_path = tmp_path / "unreadable.sock"  # a path that exists but cannot be opened, even by root
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        cases = [(tmp_path / "missing.txt", "missing.txt: no such file or directory"),
                 (sock_path, "unreadable.sock: not a regular file")]
        if os.geteuid() != 0:
            locked = tmp_path / "locked.txt"
            locked.write_text("x")
            locked.chmod(0)
            cases.append((locked, "locked.txt: cannot read: Permission denied"))
        for bad, message in cases:
            assert main(["data", "build", "--no-progress", "--source", str(good), "--source", str(bad),
                         "--out", str(out)]) == 2
            assert message in capsys.readouterr().err
            assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        sock.close()
    assert main(["data", "build", "--no-progress", "--source", str(good), "--out", str(tmp_path / "ok"),
                 "--tokenizer", "bpe", "--vocab-size", "300", "--val-fraction", "0.2", "--test-fraction", "0.1"]) == 0
    stdout = capsys.readouterr().out
    assert "dataset id: " + dataset_id(tmp_path / "ok") in stdout
    assert "dedup: 0 duplicate documents removed" in stdout
    assert set(load_manifest(tmp_path / "ok")["splits"]) == {"train", "val", "test"}
    assert main(["data", "info", str(tmp_path / "ok"), "--verify"]) == 0
    assert "(verified)" in capsys.readouterr().out


def test_folder_symlinks_outside_are_refused_unless_followed(tmp_path, capsys):
    folder, secret = tmp_path / "corpus", tmp_path / "secret.txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text(TEXT)
    (folder / "inside.txt").symlink_to(folder / "sub" / "a.txt")  # within the folder: read
    secret.write_text("SECRET " * 50)
    assert len(resolve_source(folder).files) == 2
    (folder / "leak.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"leak\.txt: a symlink to .*secret\.txt, outside .*--follow-symlinks"):
        build([folder], tmp_path / "ds")
    assert main(["data", "build", "--no-progress", "--source", str(folder), "--out", str(tmp_path / "ds")]) == 2
    assert "leak.txt" in capsys.readouterr().err and not (tmp_path / "ds").exists()
    assert main(["data", "build", "--no-progress", "--source", str(folder), "--out", str(tmp_path / "ds"),
                 "--follow-symlinks", "--val-fraction", "0.5"]) == 0
    tok = load_tokenizer(tmp_path / "ds")
    text = "".join(tok.decode(load_split(tmp_path / "ds", s).tolist()) for s in ("train", "val"))
    assert "SECRET" in text


# a build that stops for good once its staging folder holds train.bin, so that it can be killed there
STALLED_BUILD = """
import sys, time
from ulm.data import build
real = build.write_split
def stall(path, *args):
    real(path, *args)
    print("staged", flush=True)
    time.sleep(600)
build.write_split = stall
build.build_dataset([sys.argv[1]], sys.argv[2], tokenizer="byte", progress=False, log=None)
"""


def test_build_after_a_killed_one_removes_its_staging(tmp_path):
    src, out = tmp_path / "t.txt", tmp_path / "ds"
    src.write_text(TEXT)
    proc = subprocess.Popen([sys.executable, "-c", STALLED_BUILD, str(src), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "staged\n"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    stale = tmp_path / f".ds.tmp-{proc.pid}"
    assert (stale / "train.bin").is_file() and not out.exists()
    with subprocess.Popen(["sleep", "60"]) as live:  # another build's folder, its process still running
        busy = tmp_path / f".ds.tmp-{live.pid}"
        busy.mkdir()
        try:
            build([src], out, tokenizer="byte")
            assert not stale.exists() and busy.is_dir()
        finally:
            live.kill()
    verify_dataset(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "ds", "t.txt"]


def test_dataset_set_aside_by_a_killed_build_is_restored(tmp_path):
    """Killed between replace_dir's two renames, a build leaves the older dataset in .ds.old-PID and none at --out."""
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    old = build([src], tmp_path / "ds", tokenizer="byte")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    os.replace(old, tmp_path / f".ds.old-{gone.pid}")
    with pytest.raises(ValueError, match="pass --overwrite"):  # the restored dataset is not replaced unasked
        build([src], tmp_path / "ds", tokenizer="char")
    assert load_tokenizer(tmp_path / "ds").kind == "byte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "t.txt"]
