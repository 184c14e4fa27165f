"""Shared fixtures. Keep this small and generic: tests build their own data and models."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ulm.checkpoint import save_checkpoint
from ulm.config import gpt_preset
from ulm.model import GPT

# the suite never writes to the user's cache (downloads, the default model, a server's default data root)
os.environ["ULM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ulm-test-cache-")
atexit.register(shutil.rmtree, os.environ["ULM_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised `toy` preset checkpoint (seed 0, byte-level tokenizer). Treat it as read-only."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("toy_checkpoint")
    save_checkpoint(directory, GPT(gpt_preset("toy")), extra={"preset": "toy"})
    return directory


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for tiny-model tests (opt in: `pytestmark = pytest.mark.usefixtures("single_thread")`).

    Their ops are microseconds long, so threads only add synchronisation; on a loaded 2-core machine each
    parallel region can stall for ~0.2 s waiting for a descheduled worker (a 4 s test took 90 s).
    """
    with threads(1):
        yield


@pytest.fixture
def torch_threads(request):
    """torch's intra-op threads for one test: parametrize "torch_threads" indirectly with the count."""
    with threads(request.param) as n:
        yield n


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_onnx_export(toy_checkpoint, tmp_path_factory) -> Path:
    """`python -m export` of toy_checkpoint (fp32, verified against PyTorch). Treat it as read-only."""
    from export.pipeline import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("toy_onnx")
    export_checkpoint(ExportOptions(str(toy_checkpoint), str(out), threads=1, log=lambda _: None))
    return out


@pytest.fixture()
def http_server():
    """A 127.0.0.1 server for `files`, honouring Range, that can cut a response short once (`cut[path] = n`)."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            server = self.server
            data = server.files.get(self.path)
            server.requests.append((self.path, self.headers.get("Range")))
            if data is None:
                self.send_error(404)
                return
            start, rng = 0, self.headers.get("Range")
            if rng:
                start = int(rng.removeprefix("bytes=").split("-")[0])
            body = data[start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server.cut.pop(self.path, None)
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            if cut is not None:
                self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.files, server.cut, server.requests = {}, {}, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate and key for localhost and 127.0.0.1 (TLS tests), made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return d / "cert.pem", d / "key.pem"
