"""Channels to a µLM server: plaintext or TLS (--tls-ca), with the bearer token (--token) on every call.

The token travels as `authorization: Bearer <token>` metadata, added by a channel interceptor so that it works
on plaintext channels too (gRPC's call credentials need TLS). Health and reflection ignore it.
"""
from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import grpc

DEFAULT_TARGET = os.environ.get("ULM_TARGET", "127.0.0.1:50051")


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="server host:port (default $ULM_TARGET)")
    p.add_argument("--token", default=os.environ.get("ULM_TOKEN", ""),
                   help="bearer token for a server started with --auth-token-file (default $ULM_TOKEN)")
    p.add_argument("--tls-ca", help="PEM certificate(s) to trust: connect with TLS")
    p.add_argument("--timeout", type=float, help="deadline in seconds")


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_credentials(ca_file: str) -> grpc.ChannelCredentials:
    try:
        return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
    except OSError as e:
        raise ValueError(f"--tls-ca {ca_file}: {e}") from e


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to args.target with args.tls_ca and args.token applied (use it in a `with`)."""
    channel = (grpc.secure_channel(args.target, tls_credentials(args.tls_ca)) if args.tls_ca
               else grpc.insecure_channel(args.target))
    metadata = auth_metadata(args.token)
    return grpc.intercept_channel(channel, AddMetadata(metadata)) if metadata else channel


def open_aio_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """The asyncio channel for the same (bench's concurrent streams)."""
    metadata = auth_metadata(args.token)
    interceptors = [AddMetadataAioUnary(metadata), AddMetadataAioStream(metadata)] if metadata else None
    if args.tls_ca:
        return grpc.aio.secure_channel(args.target, tls_credentials(args.tls_ca), interceptors=interceptors)
    return grpc.aio.insecure_channel(args.target, interceptors=interceptors)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the token) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), *self.metadata], d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _AioMetadata:
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*(d.metadata or ()), *self.metadata),
                                          d.credentials, d.wait_for_ready)


# two classes: an asyncio channel files each interceptor under the first call kind it implements, only that one
class AddMetadataAioUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class AddMetadataAioStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    """Generate's stream."""

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)
