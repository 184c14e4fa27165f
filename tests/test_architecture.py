"""The layers hold (import-linter contracts in pyproject.toml), ruff passes, and modules stay small."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("ulm", "server", "export", "clients", "protos", "bench")
GENERATED = ROOT / "protos" / "ulm"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG_REASON = "# long:"  # on a def line: why this function is longer than MAX_FUNCTION_LINES


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": str(BIN)}, timeout=120)


def test_layer_contracts_are_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def copy_tree(dst: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", dst)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.proto", "*.toml"))
    return dst


@pytest.mark.parametrize("module, line, contract", [
    ("ulm/util.py", "import server.app", "ulm is the library"),
    ("clients/cli.py", "import torch", "clients talk over the wire only"),
    ("server/scheduler.py", "from export import pipeline", "the server reads only export's format module"),
    ("export/runtime.py", "from export import onnx_export", "export's format module stands alone"),
    ("protos/ulm/v1/__init__.py", "import ulm", "the generated stubs import nothing"),
])
def test_a_back_import_breaks_its_contract(tmp_path, module, line, contract):
    root = copy_tree(tmp_path)
    with (root / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    out = lint_imports(root)
    assert out.returncode != 0
    broken = [row for row in out.stdout.splitlines() if " BROKEN" in row]
    assert any(row.startswith(contract) for row in broken), out.stdout  # layers above may break with it


def test_ruff_passes():
    out = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def hand_written_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if GENERATED not in p.parents)


def test_modules_are_small():
    long = {p.relative_to(ROOT).as_posix(): n for p in hand_written_modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short_or_say_why():
    long = []
    for path in hand_written_modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and LONG_REASON not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a `{LONG_REASON}` reason: {long}"
