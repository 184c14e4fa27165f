"""ulm.v1.TextGeneration: streaming generation over the continuous-batching scheduler."""
from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.backends import BACKENDS, load_backend
from server.backends.base import Backend, warmup
from server.errors import InvalidArgument, NotFound, Unavailable, call_end_code
from server.metrics import Metrics
from server.scheduler import Chunk, GenerationRequest, Scheduler
from server.services import ServiceSpec, register
from ulm.generate import SamplingParams

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
ON_LOOP_CHARS = 4096  # longer texts are tokenized in a thread: on the event loop they would stall every call


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text generation")
    g.add_argument("--checkpoint", help="checkpoint directory; none = the built-in default model")
    g.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--max-batch", type=int, default=32, help="requests decoded together (KV cache slots)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get RESOURCE_EXHAUSTED")
    g.add_argument("--default-max-new-tokens", type=int, default=128,
                   help="used when a request asks for 0")
    g.add_argument("--max-new-tokens", type=int, default=4096,
                   help="the most a request may ask for (past the model's context, its window slides)")
    g.add_argument("--threads", type=int, default=0,
                   help="model threads (torch's, and ONNX Runtime's intra-op); 0 = one per core")


class GenerationService(pb_grpc.TextGenerationServicer):
    name = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name

    def __init__(self, args: argparse.Namespace, metrics: Metrics):
        for flag in ("max_batch", "default_max_new_tokens", "max_new_tokens"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.default_max_new_tokens > args.max_new_tokens:
            raise ValueError(f"--default-max-new-tokens ({args.default_max_new_tokens}) exceeds --max-new-tokens "
                             f"({args.max_new_tokens})")
        if args.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
        if not args.checkpoint:
            raise ValueError("no --checkpoint given")
        self.args = args
        self.metrics = metrics
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="ulm-tokenize")  # large texts, one at a time

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TextGenerationServicer_to_server(self, server)

    async def start(self) -> None:
        import torch

        # one thread runs every forward pass: loading, warm-up and the scheduler's steps
        executor = ThreadPoolExecutor(1, thread_name_prefix="ulm-model")
        loop = asyncio.get_running_loop()
        a = self.args
        # every core: the event loop's work fits in the gaps, as it overlaps the next decode step (measured on 2
        # cores: half the inter-token latency and 1.3-1.6x the tokens/s at 16 streams of leaving it a core)
        threads = a.threads or len(os.sched_getaffinity(0))
        await loop.run_in_executor(executor, torch.set_num_threads, threads)  # OpenMP's setting is per thread
        load = functools.partial(load_backend, a.backend, a.checkpoint, a.device, a.max_batch, serving=True)
        backend = await loop.run_in_executor(executor, load)
        if backend.torch_threads:  # for sampling, once the backend has sized its own threads
            await loop.run_in_executor(executor, torch.set_num_threads, backend.torch_threads)
        await loop.run_in_executor(executor, warmup, backend)
        self.backend = backend
        self.scheduler = Scheduler(backend, a.max_queue, self.metrics, executor)
        self.scheduler.start()

    async def drain(self, timeout: float) -> None:
        if self.scheduler is not None:
            await self.scheduler.drain(timeout)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    # -- RPCs -------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        scheduler = self._ready(request.model)
        req = await self.parse(request)
        remaining = context.time_remaining()
        if remaining is not None:
            req.deadline = time.monotonic() + remaining
        seq = scheduler.submit(req)
        context.add_done_callback(lambda ctx: scheduler.cancel(seq, call_end_reason(ctx)))  # free the slot
        try:
            while True:
                chunk = await seq.out.get()
                while chunk.finish_reason is None and not seq.out.empty():  # the client fell behind: coalesce
                    chunk = chunk.merge(seq.out.get_nowait())
                if chunk.error is not None:
                    raise chunk.error
                if chunk.finish_reason == "cancelled":  # only seen if the client is gone already
                    return
                yield to_response(chunk)
                if chunk.finish_reason is not None:
                    return
        finally:
            scheduler.cancel(seq, call_end_reason(context))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        self._ready(request.model)
        tok = self.backend.tokenizer
        if len(request.text) <= ON_LOOP_CHARS:
            return pb.TokenizeResponse(token_ids=(ids := tok.encode(request.text)), tokens=tok.token_strings(ids))

        def tokenize() -> bytes:
            ids = tok.encode(request.text)
            return serialized_in_parts(pb.TokenizeResponse, token_ids=ids, tokens=tok.token_strings(ids))
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, tokenize)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        self._ready(request.model)
        b = self.backend
        return pb.ModelInfo(name=b.model_name, vocab_size=b.config.vocab_size, context_length=b.config.block_size,
                            parameter_count=b.num_params, backend=b.name, device=b.device, dtype=b.dtype,
                            max_batch=b.max_batch, eos_token_id=b.tokenizer.eos_id, bos_token_id=b.tokenizer.bos_id)

    # -- helpers ----------------------------------------------------------------------------------------

    def _ready(self, model: str) -> Scheduler:
        if self.scheduler is None:
            raise Unavailable("the model is still loading")
        if model and model != self.backend.model_name:
            raise NotFound(f"model {model!r} is not served here; this server serves {self.backend.model_name!r}")
        return self.scheduler

    async def parse(self, r: pb.GenerateRequest) -> GenerationRequest:
        """Validate a request; errors name the field. A prompt that cannot fit is refused before it is tokenized."""
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(r, name)):
                raise InvalidArgument(f"{name} must be a finite number, got {getattr(r, name)}")
        params = SamplingParams(r.temperature, r.top_k, r.top_p, r.seed if r.HasField("seed") else None)
        try:
            params.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from e
        if len(r.stop) > MAX_STOP:
            raise InvalidArgument(f"stop has {len(r.stop)} strings; at most {MAX_STOP} are allowed")
        for i, s in enumerate(r.stop):
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        tok, context = self.backend.tokenizer, self.backend.config.block_size
        if len(r.prompt) > context * tok.max_token_chars:
            raise InvalidArgument(f"prompt ({len(r.prompt)} characters) cannot fit the context length {context} "
                                  f"(a token holds at most {tok.max_token_chars} characters)")
        if len(r.prompt) <= ON_LOOP_CHARS:
            ids = tok.encode(r.prompt)
        else:
            ids = await asyncio.get_running_loop().run_in_executor(self.tokenizing, tok.encode, r.prompt)
        if not ids:
            raise InvalidArgument("prompt must not be empty")
        if len(ids) > context:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) exceeds the context length {context}")
        if r.max_new_tokens > self.args.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens ({r.max_new_tokens}) exceeds this server's limit "
                                  f"({self.args.max_new_tokens}, --max-new-tokens)")
        max_new = r.max_new_tokens or self.args.default_max_new_tokens  # past the context, the window slides
        return GenerationRequest(ids, max_new, params, list(r.stop))


def call_end_reason(context: grpc.aio.ServicerContext) -> str:
    return "deadline" if call_end_code(context) == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled"


def serialized_in_parts(message, part: int = 16384, **fields: list) -> bytes:
    """A message of long repeated fields, serialized a slice at a time so that other threads run between slices:
    protobuf parses concatenated serializations as one message whose repeated fields are concatenated."""
    n = max(map(len, fields.values()))
    return b"".join(message(**{k: v[i:i + part] for k, v in fields.items()}).SerializeToString()
                    for i in range(0, max(n, 1), part))


def to_response(chunk: Chunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish_reason is not None:
        resp.finish_reason = FINISH[chunk.finish_reason]
        resp.usage.prompt_tokens = chunk.prompt_tokens
        resp.usage.completion_tokens = chunk.completion_tokens
    return resp


register(ServiceSpec(GenerationService.name, GenerationService, add_arguments))
