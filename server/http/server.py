"""uvicorn serving the HTTP face on the gRPC server's own event loop (`--http-port`), over TLS with the gRPC
server's certificate (--tls-cert/--tls-key).

The socket is bound here (port 0 picks a free one, which start() returns), and uvicorn serves it from a task on
the running loop; it installs no signal handlers (the server's own SIGTERM handling drains both faces). Stopping
follows the App's drain: new calls are refused (503) from the moment the server drains, the services let their
streams finish, then stop() closes the listener and gives the open connections what is left of --grace before
uvicorn cancels them.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket

import uvicorn

from server.http.app import create_app

log = logging.getLogger("server.http")
START_TIMEOUT_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP (REST, OpenAI-compatible, Server-Sent Events)")
    g.add_argument("--http-port", type=int, help="also serve the API over HTTP on this port (0 picks a free one, "
                                                 "it is logged); off unless given")


def from_args(args: argparse.Namespace) -> HttpServer | None:
    if getattr(args, "http_port", None) is None:
        return None
    if not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be in [0, 65535], got {args.http_port}")
    return HttpServer(args.host, args.http_port, args.tls_cert, args.tls_key)


class _LoopServer(uvicorn.Server):
    """uvicorn.Server without its signal handlers: they would replace the server's own."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None):
        self.host, self.port = host, port
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.server: _LoopServer | None = None
        self.task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    async def start(self, app) -> int:
        """Serve `app` (the server's App) and return the bound port."""
        sock = bind(self.host, self.port)
        config = uvicorn.Config(create_app(app), lifespan="off", log_config=None, access_log=False,
                                ssl_certfile=self.tls_cert, ssl_keyfile=self.tls_key, server_header=False)
        self.server = _LoopServer(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="http-server")
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self.server.started:
                if self.task.done():  # it failed to start (a bad certificate): its error, raised here
                    self.task.result()
                    raise RuntimeError("the HTTP server stopped while starting")
                await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        log.info("http on %s://%s:%d", self.scheme, self.host, self.port)
        return self.port

    async def stop(self, timeout: float) -> None:
        """Close the listener, let open connections finish for `timeout` seconds, then cancel what is left."""
        if self.server is None or self.task is None:
            return
        self.server.config.timeout_graceful_shutdown = max(0.1, timeout)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout + 5)
        except TimeoutError:
            log.warning("HTTP server did not stop within %.1f s", timeout + 5)
            self.server.force_exit = True
            self.task.cancel()
        stop_sse_watcher()


def stop_sse_watcher() -> None:
    """sse-starlette starts a task per event loop that polls for uvicorn's exit signal (which this server never
    sends: the App drains the streams); left running, it outlives the server and its loop."""
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "") == "_shutdown_watcher":
            task.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, IPv4 or IPv6 as the host resolves; OSError when the port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    # proto given, not 0 (as socket.create_server leaves it): asyncio sets TCP_NODELAY only on the connections of
    # a listener whose proto says TCP, and without it every answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a taken port is an error
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock
