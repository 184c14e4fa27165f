"""Fetching a file over HTTP(S) into a cache: verified by SHA-256, resumable, never left half-written.

The bytes go to `<name>.part` beside the target; a later call resumes it with an HTTP Range request (a server
that ignores Range answers 200 and the download starts over). Only a file whose checksum matches is renamed
to its final name, so a file in the cache under its real name is always complete and verified.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from ulm.progress import progress_bar
from ulm.util import file_sha256

CHUNK = 1 << 16
USER_AGENT = "ulm-data/1 (+https://github.com)"


class ChecksumError(ValueError):
    """A downloaded or local file does not have the published checksum."""


def check_digest(path: Path, sha256: str | None, what: str) -> str:
    """SHA-256 of `path`; ChecksumError when it is not `sha256` (None: anything goes)."""
    got = file_sha256(path)
    if sha256 is not None and got != sha256.lower():
        raise ChecksumError(f"{what}: SHA-256 mismatch: expected {sha256}, got {got}")
    return got


def download(urls: str | list[str], dest: str | os.PathLike, sha256: str | None, timeout: float = 60.0,
             progress: bool = True) -> Path:
    """Make `dest` hold the verified file from the first of `urls` that answers; return `dest`.

    A `dest` that already exists is re-verified, not fetched again (unless it no longer matches). Connection errors
    leave `<dest>.part` for the next call to resume; a checksum mismatch deletes it and raises ChecksumError.
    """
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    if dest.is_file():
        try:
            check_digest(dest, sha256, f"cached {dest}")
            return dest
        except ChecksumError:
            dest.unlink()  # damaged since it was verified: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            _fetch(url, part, timeout, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # try the next mirror
            errors.append(f"{url}: {e}")
            continue
        try:
            check_digest(part, sha256, f"download of {url}")
        except ChecksumError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        return dest
    raise OSError(f"could not download {dest.name} ({'; '.join(errors)}); without network, point the source at "
                  f"a local copy (--source NAME=PATH) or put the verified file at {dest}")


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part`, resuming from its current size."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:  # 416: the .part is already complete (or longer than the file)
            raise
        return
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        elif have and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            part.unlink()  # cannot tell what the server sent: start over next time
            raise OSError(f"{url}: answered Range bytes={have}- with Content-Range "
                          f"{response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, progress_bar(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"download {part.name[:-5]}",
                disable=not progress, leave=False) as bar:
            while block := response.read(CHUNK):
                f.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:  # urllib does not always raise on a cut connection
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
