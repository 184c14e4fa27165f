"""The dependency lock: what pyproject.toml asks for, pinned with hashes, and exactly what this suite runs on."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
UNLOCKED = {"torch"}  # pinned in the Makefile: the machine's CPU wheel


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, hashes) of requirements.lock."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    name = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := PIN.match(line):
            name = canonicalize_name(m.group(1))
            entries[name] = (Version(m.group(2)), [])
        elif (h := line.strip()).startswith("--hash=sha256:") and name:
            entries[name][1].append(h.removeprefix("--hash=sha256:").rstrip(" \\"))
    return entries


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_requirement_is_locked_at_an_allowed_version_with_hashes():
    lock = locked()
    assert len(lock) > 20
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in UNLOCKED:
            continue
        assert name in lock, f"{req.name} is not in requirements.lock: run `make lock`"
        version, hashes = lock[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} does not satisfy {req}"
    for name, (version, hashes) in lock.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"{name} has no sha256 hash"
    assert not UNLOCKED & set(lock)


def test_the_suite_runs_on_exactly_the_locked_versions():
    for name, (version, _) in locked().items():
        installed = Version(metadata.version(name))
        assert installed == version, f"{name} {installed} is installed, the lock says {version}: run `make install`"
    torch_pin = re.search(r"^TORCH := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert Version(metadata.version("torch")).base_version == torch_pin
