"""ulm.v1.Models: the checkpoints and exports in the data root with their lineage, and the models this server serves.

ListModels / GetModel read the data root (server/model_catalog.py, in a thread); LoadModel, UnloadModel,
ListLoadedModels and DeleteModel go through the server's ModelRegistry (server/models.py), which the generation
service routes requests by. The registry's models are drained and closed here when the server stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math

import grpc

from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import models_pb2_grpc as mpb_grpc
from server import model_catalog as catalog
from server.errors import InvalidArgument
from server.models import ModelRegistry, model_info, registry_of
from server.models import add_arguments as registry_arguments
from server.services import ServiceSpec, register
from server.shared import Shared

FORMATS = {catalog.CHECKPOINT: mpb.MODEL_FORMAT_CHECKPOINT, catalog.ONNX: mpb.MODEL_FORMAT_ONNX}


def add_arguments(p: argparse.ArgumentParser) -> None:
    registry_arguments(p.add_argument_group("models"))


class ModelsService(mpb_grpc.ModelsServicer):
    name = mpb.DESCRIPTOR.services_by_name["Models"].full_name

    def __init__(self, args: argparse.Namespace, shared: Shared):
        self.args, self.shared = args, shared
        self.registry: ModelRegistry = registry_of(args, shared)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        mpb_grpc.add_ModelsServicer_to_server(self, server)

    async def start(self) -> None:
        """The default model is loaded by the generation service; nothing to load here."""

    async def drain(self, timeout: float) -> None:
        await self.registry.drain(timeout)

    async def close(self) -> None:
        await self.registry.close()

    # -- the data root ----------------------------------------------------------------------------------

    async def ListModels(self, request: mpb.ListModelsRequest, context) -> mpb.ListModelsResponse:
        def read() -> list[mpb.Model]:
            return [self.describe(m) for m in catalog.list_models(self.shared.data_root)]
        return mpb.ListModelsResponse(models=await asyncio.to_thread(read))

    async def GetModel(self, request: mpb.GetModelRequest, context) -> mpb.Model:
        return await asyncio.to_thread(lambda: self.describe(catalog.find(self.shared.data_root, request.name)))

    async def DeleteModel(self, request: mpb.DeleteModelRequest, context) -> mpb.DeleteModelResponse:
        await self.registry.delete(request.name)
        return mpb.DeleteModelResponse()

    def describe(self, m: catalog.StoredModel) -> mpb.Model:
        """A model of the data root with its lineage (in a thread: it reads small files)."""
        root, jobs = self.shared.data_root, self.shared.jobs
        return mpb.Model(
            name=m.name, format=FORMATS[m.format], parameter_count=m.parameter_count(),
            size_bytes=catalog.folder_bytes(m.folder), config_json=json.dumps(m.model_config, sort_keys=True),
            training_job=jobs.producer(f"models/{m.name}") if jobs is not None else "",
            loaded=self.registry.is_loaded(m.name), created_at=m.created_at(), **catalog.lineage(m, root))

    # -- this server's models -----------------------------------------------------------------------------

    async def LoadModel(self, request: mpb.LoadModelRequest, context) -> mpb.ModelInfo:
        engine = await self.registry.load(request.name, request.backend, request.device, request.max_batch)
        return model_info(request.name, engine)

    async def UnloadModel(self, request: mpb.UnloadModelRequest, context) -> mpb.UnloadModelResponse:
        if not request.name:
            raise InvalidArgument("name is empty")
        if not (math.isfinite(request.timeout_s) and request.timeout_s >= 0):
            raise InvalidArgument(f"timeout_s must be a number >= 0, got {request.timeout_s}")
        await self.registry.unload(request.name, request.timeout_s or self.args.grace)
        return mpb.UnloadModelResponse()

    async def ListLoadedModels(self, request: mpb.ListLoadedModelsRequest, context) -> mpb.ListLoadedModelsResponse:
        return mpb.ListLoadedModelsResponse(models=[model_info(n, e) for n, e in self.registry.loaded()],
                                            default_model=self.registry.default)


register(ServiceSpec(ModelsService.name, ModelsService, add_arguments))
