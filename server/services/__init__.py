"""gRPC services, each in its own module that registers itself here.

Adding a service is one new module (and its proto): define a class with the Service methods and call
`register(ServiceSpec(...))` at import time. `discover()` imports every module of this package, and the app
serves whatever registered, with health and reflection entries for each.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from server.shared import Shared


class Service(Protocol):
    name: str  # the full proto service name, e.g. "ulm.v1.TextGeneration"

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Load what the service needs (models, data); health reports SERVING once every service started."""

    async def drain(self, timeout: float) -> None:
        """Refuse new work and let accepted work finish, for at most `timeout` seconds."""

    async def close(self) -> None: ...


@dataclass
class ServiceSpec:
    name: str
    build: Callable[[argparse.Namespace, Shared], Service]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # the service's own flags


SERVICES: dict[str, ServiceSpec] = {}


def register(spec: ServiceSpec) -> ServiceSpec:
    if spec.name in SERVICES:
        raise ValueError(f"service {spec.name} is registered twice")
    SERVICES[spec.name] = spec
    return spec


def discover() -> dict[str, ServiceSpec]:
    """Import every service module (each registers itself) and return the registry."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
    return SERVICES
