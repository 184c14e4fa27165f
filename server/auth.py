"""Who may call the server: bearer tokens (--auth-token-file), TLS (--tls-cert/--tls-key), and the refusal to
serve an address other than loopback without a token (unless --allow-unauthenticated).

The interceptor in server/app.py calls Security.authenticate before anything else on every µLM method; health
and reflection stay open (load balancers and grpcurl need them, and they reveal no data).
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.errors import Unauthenticated

BEARER = "bearer "  # the scheme is case-insensitive (RFC 6750)
MISSING = "missing bearer token in the authorization metadata"
INVALID = "invalid bearer token"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("auth and TLS")
    g.add_argument("--auth-token-file", help="bearer tokens, one a line (blank lines and # comments ignored); "
                                             "calls without one get UNAUTHENTICATED (health stays open)")
    g.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve an address other than loopback without --auth-token-file")


@dataclass(frozen=True)
class Security:
    tokens: tuple[bytes, ...] = ()  # empty: every call is let through
    credentials: grpc.ServerCredentials | None = None  # None: plaintext

    def authenticate(self, metadata) -> None:
        """Raise Unauthenticated unless the call's metadata carries one of the tokens."""
        if not self.tokens:
            return
        given = bearer_token(metadata)
        if given is None:
            raise Unauthenticated(MISSING)
        # every token compared, in constant time each: the answer's timing says nothing about which is close
        if not any([hmac.compare_digest(given, token) for token in self.tokens]):
            raise Unauthenticated(INVALID)


def bearer_token(metadata) -> bytes | None:
    """The token of the `authorization: Bearer <token>` entry, or None when there is none."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if text[:len(BEARER)].lower() == BEARER and text[len(BEARER):].strip():
            return text[len(BEARER):].strip().encode()
    return None


def load_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of a token file; a file that holds none is an error (it would lock everyone out, or in)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--auth-token-file {path}: {e}") from e
    tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise ValueError(f"--auth-token-file {path} holds no token (one a line; blank lines and # comments "
                         f"are ignored)")
    return tokens


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; any other name or address (0.0.0.0 included) is reachable from outside."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def server_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    pem = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            pem[flag] = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{flag} {path}: {e}") from e
    return grpc.ssl_server_credentials([(pem["--tls-key"], pem["--tls-cert"])])


def security_from_args(args: argparse.Namespace) -> Security:
    """The server's Security, or ValueError (exit 2) for bad flags or an open non-loopback address."""
    tokens = load_tokens(args.auth_token_file) if args.auth_token_file else ()
    if not tokens and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise ValueError(f"refusing to serve {args.host} without authentication: give --auth-token-file FILE, "
                         f"or --allow-unauthenticated to let anyone who reaches it call every method")
    return Security(tokens, server_credentials(args.tls_cert, args.tls_key))
