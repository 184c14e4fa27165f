"""`python -m server`: serve every registered service over gRPC until SIGTERM or SIGINT, then drain and exit 0."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from server import auth
from server.app import MAX_REQUEST_BYTES, App
from server.data_root import DataRoot, default_data_root
from server.http import server as http_server
from server.jobs.manager import JobManager
from server.metrics import Metrics
from server.models import ModelRegistry
from server.services import discover
from server.shared import Shared

# a thread that tokenizes or serializes megabytes hands the GIL to the event loop ten times as often as Python's
# default 5 ms, so other calls wait less (docs/performance-log.md)
GIL_SWITCH_S = 0.0005

log = logging.getLogger("server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="µLM gRPC server",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (it is logged)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (0 picks a free port)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="larger requests get RESOURCE_EXHAUSTED (a prompt, a text to tokenize)")
    p.add_argument("--data-root", default=str(default_data_root()),
                   help="uploads, datasets, models, job logs and the job database live here, and nothing a "
                        "request names is read or written outside it")
    auth.add_arguments(p)
    http_server.add_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for spec in discover().values():
        if spec.add_arguments is not None:
            spec.add_arguments(p)
    return p


def build_app(args: argparse.Namespace) -> App:
    security = auth.security_from_args(args)  # first: a refused address loads nothing
    shared = Shared(Metrics(), DataRoot(args.data_root))
    shared.jobs = JobManager(args, shared)
    shared.models = ModelRegistry(args, shared)
    services = [spec.build(args, shared) for spec in discover().values()]
    return App(services, shared.metrics, args.host, args.port, args.metrics_port, args.max_request_bytes,
               security, http_server.from_args(args))


def default_checkpoint() -> str:
    """The built-in default model (written on first use, without network)."""
    try:
        from server.default_model import ensure_default_checkpoint
    except ImportError as e:
        raise ValueError(f"no --checkpoint given and no default model is available ({e})") from e
    return str(ensure_default_checkpoint())


async def serve(args: argparse.Namespace) -> int:
    app = build_app(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        stopping.cancel()
        await app.shutdown(0)
        raise starting.exception()
    await stopping
    log.info("signal received")
    starting.cancel()
    await app.shutdown(args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "checkpoint", "") is None:
            args.checkpoint = default_checkpoint()
        sys.setswitchinterval(GIL_SWITCH_S)
        return asyncio.run(serve(args))
    except (ValueError, OSError, RuntimeError) as e:  # bad flags or checkpoint, port in use
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
