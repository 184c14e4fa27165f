"""The models a running server serves: one Engine (model process, scheduler and slots) per loaded model.

The default model is the --checkpoint one: the generation service builds its engine and loads it here at start,
under the name its backend reports; an empty GenerateRequest.model picks it. LoadModel adds a model of the data
root (models/<name>: a run's best/ checkpoint on the torch backend, an export on the onnx one) under that name.
A load is refused before anything is read into memory when it would pass --max-models or --model-memory-mb: the
estimate is the weights' bytes on disk plus the KV cache every slot reserves. Unloading stops routing to the model
at once (new requests for it are NOT_FOUND), lets its streams finish, then closes it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
from pathlib import Path

import psutil
import torch

from protos.ulm.v1 import text_generation_pb2 as pb
from server import model_catalog as catalog
from server.engine import Engine, EngineSettings
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from server.shared import Shared
from ulm.util import read_json_object

log = logging.getLogger(__name__)
DEFAULT_MAX_MODELS = 4
LOADING_DEFAULT = ""  # the reservation the default model holds until its backend tells its name
DEVICES = ("cpu", "cuda")


def default_memory_mb() -> int:
    return psutil.virtual_memory().total // 2 // 2**20


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max-models", type=int, default=DEFAULT_MAX_MODELS,
                   help="models loaded at once, the default one included; more get RESOURCE_EXHAUSTED")
    g.add_argument("--model-memory-mb", type=int, default=default_memory_mb(),
                   help="memory the loaded models may take (estimated before loading: weights on disk + KV cache); "
                        "default: half of this machine's")


def registry_of(args: argparse.Namespace, shared: Shared) -> ModelRegistry:
    """The server's registry (build_app makes it); made here for a server assembled without it."""
    if shared.models is None:
        shared.models = ModelRegistry(args, shared)
    return shared.models


def model_info(name: str, engine: Engine) -> pb.ModelInfo:
    b = engine.backend
    return pb.ModelInfo(name=name, vocab_size=b.config.vocab_size, context_length=b.config.block_size,
                        parameter_count=b.num_params, backend=b.name, device=b.device, dtype=b.dtype,
                        max_batch=b.max_batch, eos_token_id=b.tokenizer.eos_id, bos_token_id=b.tokenizer.bos_id)


def estimate_bytes(settings: EngineSettings) -> int:
    """The default model's estimate, from its folder (a checkpoint or an export, as --backend reads it)."""
    d = Path(settings.checkpoint)
    files = [d / "model.safetensors"] if settings.backend == "torch" else [d / f for f in catalog.EXPORT_WEIGHTS]
    try:
        config = read_json_object(d / "config.json")
        return sum(f.stat().st_size for f in files if f.is_file()) + catalog.kv_cache_bytes(
            config.get("model"), settings.max_batch)
    except (ValueError, OSError):
        return 0  # the engine's load reports what is wrong


class ModelRegistry:
    def __init__(self, args: argparse.Namespace, shared: Shared):
        self.args, self.shared = args, shared
        self.max_models = getattr(args, "max_models", DEFAULT_MAX_MODELS)
        memory_mb = getattr(args, "model_memory_mb", None) or default_memory_mb()
        if self.max_models < 1 or memory_mb < 1:
            raise ValueError(f"--max-models and --model-memory-mb must be >= 1, got {self.max_models} and "
                             f"{memory_mb}")
        self.memory_budget = memory_mb * 2**20
        self.engines: dict[str, Engine] = {}  # the models requests are routed to
        self.reserved: dict[str, int] = {}  # name -> estimated bytes: loading, loaded and draining models
        self.sources: dict[str, Path] = {}  # name -> the folder it was loaded from (resolved)
        self.default = ""  # the name an empty request picks, once loaded
        self.default_unloaded = ""  # its name after UnloadModel took it away
        self.loading: set[str] = set()
        self.deleting: set[str] = set()
        self.closed = False
        self.cores_taken = 0  # by running jobs (share_cores)

    # -- routing ------------------------------------------------------------------------------------------

    def get(self, name: str) -> Engine:
        """The engine serving `name` ("" = the default); Unavailable while it loads, NotFound when not here."""
        if not name:
            if self.default:
                return self.engines[self.default]
            if self.default_unloaded:
                raise NotFound(f"model: the default model {self.default_unloaded!r} was unloaded; name a loaded "
                               f"model ({self._served()})")
            raise Unavailable("the model is still loading")
        engine = self.engines.get(name)
        if engine is not None:
            return engine
        if name in self.loading:
            raise Unavailable(f"model {name!r} is still loading")
        raise NotFound(f"model {name!r} is not served here; this server serves {self._served()}")

    def _served(self) -> str:
        return ", ".join(repr(n) for n in sorted(self.engines)) or "no model now"

    def loaded(self) -> list[tuple[str, Engine]]:
        return sorted(self.engines.items())

    def is_loaded(self, name: str) -> bool:
        """Whether models/<name> of the data root is loaded, loading or draining here (so not to be deleted); the
        default model counts when its --checkpoint lies in it."""
        folder = (self.shared.data_root.folder("models") / name).resolve()
        return any(src.is_relative_to(folder) for src in self.sources.values())

    def using_dataset(self, dataset: str) -> list[str]:
        """Names of the models in the data root whose lineage names `dataset`."""
        root = self.shared.data_root
        return [m.name for m in catalog.list_models(root) if catalog.dataset_of(m, root) == dataset]

    # -- loading --------------------------------------------------------------------------------------------

    async def load_default(self, engine: Engine) -> None:
        """Start the --checkpoint model's engine (built by the generation service) and make it the default."""
        estimate = estimate_bytes(engine.settings)
        self.reserved[LOADING_DEFAULT] = estimate
        self.sources[LOADING_DEFAULT] = source = Path(engine.settings.checkpoint).resolve()
        try:
            await engine.start()
        finally:
            del self.reserved[LOADING_DEFAULT], self.sources[LOADING_DEFAULT]
        name = engine.backend.model_name
        self.reserved[name], self.sources[name], self.engines[name] = estimate, source, engine
        self.default = name
        engine.share_cores(self.cores_taken)
        log.info("default model %r loaded (about %s MiB)", name, mib(estimate))
        if estimate > self.memory_budget:  # it is loaded anyway (the server was started with it); say why no other is
            log.warning("the default model alone takes about %s MiB, over --model-memory-mb (%s MiB): every "
                        "LoadModel will be refused", mib(estimate), mib(self.memory_budget))

    async def load(self, name: str, backend: str, device: str, max_batch: int) -> Engine:
        """LoadModel: models/<name> of the data root, loaded under that name."""
        stored = catalog.find(self.shared.data_root, name)
        backend = backend or stored.backend
        if backend != stored.backend:
            raise InvalidArgument(f"backend {backend!r} does not serve models/{name}, a {stored.format} (its backend "
                                  f"is {stored.backend!r}; leave backend empty to pick it)")
        device = device or "cpu"
        check_device(device, backend)
        max_batch = max_batch or self.args.max_batch or catalog.auto_max_batch(stored.model_config)
        if name in self.reserved:
            raise AlreadyExists(f"name: model {name!r} is already loaded here (or being loaded or unloaded)")
        if name in self.deleting:
            raise FailedPrecondition(f"name: model {name!r} is being deleted")
        estimate = stored.weights_bytes() + stored.kv_cache_bytes(max_batch)
        self._check_room(name, estimate, max_batch)
        settings = EngineSettings(backend, str(stored.path), device, max_batch, self.args.max_queue, self.args.threads,
                                  stream_interval=self.args.stream_interval)
        engine = Engine(settings, self.shared.metrics)
        self.reserved[name], self.sources[name] = estimate, stored.folder.resolve()
        self.loading.add(name)
        try:
            await engine.start()  # loading and warm-up run in the engine's model process, off the event loop
        except BaseException as e:
            self.forget(name)
            raise load_error(name, e, self.shared) from e
        finally:
            self.loading.discard(name)
        if self.closed:  # the server stopped while it loaded
            self.forget(name)
            await engine.close()
            raise Unavailable("server is shutting down")
        self.engines[name] = engine
        engine.share_cores(self.cores_taken)
        log.info("model %r loaded (%s on %s, %d slots, about %s MiB)", name, backend, device, max_batch,
                 mib(estimate))
        return engine

    def _check_room(self, name: str, estimate: int, max_batch: int) -> None:
        if len(self.reserved) >= self.max_models:
            raise ResourceExhausted(f"name: loading {name!r} would make {len(self.reserved) + 1} models on this "
                                    f"server, over --max-models {self.max_models}; unload one first")
        used = sum(self.reserved.values())
        if used + estimate > self.memory_budget:
            raise ResourceExhausted(
                f"name: {name!r} needs about {mib(estimate)} MiB (weights + KV cache for {max_batch} slots) and "
                f"{mib(used)} of this server's {mib(self.memory_budget)} MiB are taken (--model-memory-mb); "
                f"unload a model or ask for a smaller max_batch")

    def forget(self, name: str) -> None:
        self.reserved.pop(name, None)
        self.sources.pop(name, None)

    # -- unloading, deleting ---------------------------------------------------------------------------

    async def unload(self, name: str, timeout: float) -> None:
        """Stop routing to `name` now, let its streams finish for at most `timeout` seconds, then close it."""
        engine = self.engines.pop(name, None)
        if engine is None:
            if name in self.reserved:
                raise FailedPrecondition(f"name: model {name!r} is still loading or already unloading")
            raise NotFound(f"name: model {name!r} is not loaded here; loaded: {self._served()}")
        if name == self.default:
            self.default, self.default_unloaded = "", name
        try:
            await engine.drain(timeout)
        finally:
            await engine.close()
            self.forget(name)
        log.info("model %r unloaded", name)

    async def delete(self, name: str) -> None:
        """DeleteModel: remove models/<name>, unless it is loaded or a job uses or makes it."""
        folder = self.shared.data_root.existing("models", name, "name", "model")
        if self.is_loaded(name) or name in self.deleting:
            raise FailedPrecondition(f"name: model {name!r} is loaded on this server; unload it first")
        jobs = self.shared.jobs
        job = jobs.in_use(f"models/{name}") if jobs is not None else None
        if job:
            raise FailedPrecondition(f"name: model {name!r} is in use by job {job}")
        self.deleting.add(name)
        try:
            await asyncio.to_thread(remove, folder)
        finally:
            self.deleting.discard(name)

    # -- the server's life --------------------------------------------------------------------------------

    def share_cores(self, taken: int) -> None:
        """Jobs now hold `taken` cores: every loaded model that sizes its threads by the cores leaves them free."""
        self.cores_taken = taken
        for engine in self.engines.values():
            engine.share_cores(taken)

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(e.drain(timeout) for e in list(self.engines.values())))

    async def close(self) -> None:
        self.closed = True
        engines = list(self.engines.values())
        self.engines.clear()
        self.default = ""
        await asyncio.gather(*(e.close() for e in engines))


def check_device(device: str, backend: str) -> None:
    if device not in DEVICES:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and backend == "torch" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' was asked for but this server sees no CUDA device")


def load_error(name: str, e: BaseException, shared: Shared) -> BaseException:
    """A model that failed to load, as one line naming it: its files are wrong (FAILED_PRECONDITION)."""
    if not isinstance(e, Exception):  # cancelled: the caller left, or the server stops
        return e
    what = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    return FailedPrecondition(f"name: models/{name} cannot be loaded: {catalog.relative(what, shared.data_root)}")


def remove(folder: Path) -> None:
    if folder.is_dir():
        shutil.rmtree(folder)
    else:
        folder.unlink()


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"
