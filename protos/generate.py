"""Generate the Python gRPC stubs beside the contract (protos/ulm/v1/): `python -m protos.generate [--out DIR]`.

protoc names generated modules after the .proto paths, so protos/ulm/v1/x.proto becomes `ulm.v1.x_pb2`,
which would collide with the `ulm` library. The files are written under protos/ and their imports of
each other are rewritten to `protos.ulm...`; the protos keep their canonical names (ulm/v1/x.proto),
which is what reflection clients and other languages see. The stubs are committed; tests/test_protos.py
fails when they differ from a fresh generation.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
API_DIR = PROTO_DIR
PACKAGE = "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# `from ulm.v1 import x_pb2 as ...` in generated .py and .pyi files
_IMPORT = re.compile(r"^from (ulm(?:\.\w+)*) import ", re.MULTILINE)


def proto_files(proto_dir: Path = PROTO_DIR) -> list[str]:
    return sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))


def generate(out_dir: Path = API_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every .proto under proto_dir into out_dir; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(proto_dir)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    files = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for path in files:
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"from {PACKAGE}.\1 import ", text))
    for d in {p.parent for p in files} | {out_dir}:  # regular packages, so setuptools installs them
        while d != out_dir.parent:
            (d / "__init__.py").touch()
            d = d.parent
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=API_DIR, help=f"output directory (default: {API_DIR})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
