"""ulm.v1.TextGeneration: streaming generation over the engines (model process, scheduler) of the models.

A Generate call: pick the engine of the model it names (server.models.ModelRegistry; empty = the default, the
--checkpoint one, whose engine this service builds and loads at start), parse and tokenize the request
(server.generate_request), submit its token ids to the engine with a TextOutput as the sequence's listener
(detokenization, stop strings), then stream the chunks it makes. Errors are ServiceErrors, which the server's
interceptor turns into status codes.
"""
from __future__ import annotations

import argparse
import functools
import time

import grpc

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.backends import BACKENDS, QUANTIZING
from server.backends.base import Backend
from server.engine import Engine, EngineSettings
from server.errors import ResourceExhausted, Unavailable, call_end_code
from server.generate_request import ON_LOOP_CHARS, Limits, TextRequest, parse_generate
from server.model_catalog import auto_max_batch, config_of
from server.models import ModelRegistry, model_info, registry_of
from server.scheduler import NotAccepting, QueueFull, Scheduler
from server.sequence import Sequence
from server.services import ServiceSpec, register
from server.shared import Shared
from server.text_output import Chunk, TextOutput
from server.tokenize_worker import TokenizeWorker
from ulm.quantize import check_quantize

STREAM_INTERVAL = 16
FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text generation")
    g.add_argument("--checkpoint", help="checkpoint directory; none = the built-in default model")
    g.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    g.add_argument("--quantize", help="int8: the torch backend's Linear weights in int8 (FBGEMM dynamic "
                                      "quantization, CPU); bf16: the model in bf16 (a CPU with AVX-512 BF16 or "
                                      "AMX, or a GPU); the default model's only")
    g.add_argument("--max-batch", type=int, default=0,
                   help="requests decoded together (KV cache slots); 0 = as many as fit in 2.5 GiB of KV cache, "
                        "at most 64")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get RESOURCE_EXHAUSTED")
    g.add_argument("--default-max-new-tokens", type=int, default=128,
                   help="used when a request asks for 0")
    g.add_argument("--max-new-tokens", type=int, default=4096,
                   help="the most a request may ask for (past the model's context, its window slides)")
    g.add_argument("--stream-interval", type=int, default=STREAM_INTERVAL,
                   help="the most tokens a stream gets in one message: a decode pass runs up to this many steps "
                        "while under 10 ms, so a fast model sends several tokens a message and a slow one (10 ms or "
                        "more a step) one (1: a message per token always)")
    g.add_argument("--threads", type=int, default=0,
                   help="model threads (torch's, and ONNX Runtime's intra-op); 0 = one per core")


def check_flags(args: argparse.Namespace) -> None:
    for flag in ("default_max_new_tokens", "max_new_tokens", "stream_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.default_max_new_tokens > args.max_new_tokens:
        raise ValueError(f"--default-max-new-tokens ({args.default_max_new_tokens}) exceeds --max-new-tokens "
                         f"({args.max_new_tokens})")
    if args.max_batch < 0:
        raise ValueError(f"--max-batch must be >= 0 (0: sized by the model), got {args.max_batch}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.checkpoint:
        raise ValueError("no --checkpoint given")
    quantize = getattr(args, "quantize", None)  # a server assembled from its own Namespace may lack it
    if quantize is not None:
        if args.backend not in QUANTIZING:
            raise ValueError(f"--quantize is for the {', '.join(QUANTIZING)} backend, not {args.backend} (an int8 "
                             "ONNX model is an export: python -m export --quantize int8)")
        check_quantize(quantize, args.device)


class GenerationService(pb_grpc.TextGenerationServicer):
    name = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name

    def __init__(self, args: argparse.Namespace, shared: Shared):
        check_flags(args)
        self.args = args
        self.limits = Limits(args.max_new_tokens, args.default_max_new_tokens)
        slots = args.max_batch or auto_max_batch(config_of(args.checkpoint))
        self.engine = Engine(EngineSettings(args.backend, args.checkpoint, args.device, slots,
                                            args.max_queue, args.threads, getattr(args, "quantize", None),
                                            args.stream_interval),
                             shared.metrics)  # the default model's
        self.models: ModelRegistry = registry_of(args, shared)
        self.tokenizing = TokenizeWorker()  # large texts, in a process of their own

    @property
    def backend(self) -> Backend | None:
        return self.engine.backend

    @property
    def scheduler(self) -> Scheduler | None:
        return self.engine.scheduler

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TextGenerationServicer_to_server(self, server)

    async def start(self) -> None:
        await self.models.load_default(self.engine)

    async def drain(self, timeout: float) -> None:
        """The models' engines, the default's among them, are drained and closed by the Models service."""

    async def close(self) -> None:
        await self.tokenizing.close()

    # -- RPCs -------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        engine = self.models.get(request.model)  # held to the end: an unloaded model drains its streams
        req = await self.parse(request, engine)
        output = TextOutput(engine.tokenizer, req.stop, engine.cancel)
        seq = self._submit(engine, request.model, req, output, context.time_remaining())
        context.add_done_callback(lambda ctx: engine.cancel(seq, call_end_reason(ctx)))  # free the slot
        try:
            while True:
                chunk = await output.next()
                if chunk.error is not None:
                    raise chunk.error
                if chunk.finish_reason == "cancelled":  # only seen if the client is gone already
                    return
                yield to_response(chunk)
                if chunk.finish_reason is not None:
                    return
        finally:
            engine.cancel(seq, call_end_reason(context))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        engine = self.models.get(request.model)
        tok = engine.tokenizer
        if len(request.text) <= ON_LOOP_CHARS:
            return pb.TokenizeResponse(token_ids=(ids := tok.encode(request.text)), tokens=tok.token_strings(ids))
        return await self.tokenizing.tokenize_response(engine.settings.checkpoint, request.text)  # serialized

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        engine = self.models.get(request.model)
        return model_info(request.model or self.models.default, engine)

    # -- helpers ----------------------------------------------------------------------------------------

    async def parse(self, r: pb.GenerateRequest, engine: Engine | None = None) -> TextRequest:
        """Validate a request; errors name the field. A prompt that cannot fit is refused before it is tokenized."""
        engine = engine or self.engine
        return await parse_generate(r, engine.tokenizer, engine.backend.config.block_size, self.limits,
                                    functools.partial(self.tokenizing.encode, engine.settings.checkpoint))

    def _submit(self, engine: Engine, model: str, req: TextRequest, output: TextOutput,
                remaining: float | None) -> Sequence:
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return engine.submit(req.tokens(engine.tokenizer.eos_id, deadline), output.on_output)
        except NotAccepting as e:
            which = f"model {model!r}" if model else "the default model"
            raise Unavailable(f"{which} is being unloaded, or the server is shutting down") from e
        except QueueFull as e:
            raise ResourceExhausted(f"queue is full: {e} (--max-queue {self.args.max_queue})") from e


def call_end_reason(context: grpc.aio.ServicerContext) -> str:
    return "deadline" if call_end_code(context) == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled"


def to_response(chunk: Chunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish_reason is not None:
        resp.finish_reason = FINISH[chunk.finish_reason]
        resp.usage.prompt_tokens = chunk.prompt_tokens
        resp.usage.completion_tokens = chunk.completion_tokens
    return resp


register(ServiceSpec(GenerationService.name, GenerationService, add_arguments))
