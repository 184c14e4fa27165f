"""The OpenAI-compatible API under /v1: completions (plain and streamed), the loaded models, and a clear refusal of
chat completions, so that the OpenAI client libraries and the tools built on them work against µLM.

POST /v1/completions calls TextGeneration.Generate (the very servicer method gRPC calls, through call_stream):
one GenerateRequest from the OpenAI fields, and the OpenAI text_completion object (or its SSE chunks, one per
GenerateResponse, then `data: [DONE]`) from the responses. A field OpenAI defines that µLM does not do (logprobs,
echo, best_of > 1, penalties, logit_bias, suffix) is a 400 naming it unless it holds its no-op default; an unknown
field is a 400 naming it (extra="forbid"); top_k is µLM's own, as it is vLLM's. Defaults are OpenAI's: max_tokens
16, temperature 1, top_p 1. A client that leaves cancels its generation, streamed (the SSE stream closes the call)
or not (the handler watches for the disconnect). GET /v1/models lists what Models.ListLoadedModels lists. µLM's
models carry no chat template, so /v1/chat/completions answers 400 saying so (after the same checks as every call:
a caller without a valid token learns nothing).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from protos.ulm.v1 import models_pb2 as mpb
from protos.ulm.v1 import text_generation_pb2 as pb
from server.errors import InvalidArgument, NotFound
from server.http.calls import ClientGone, call_stream, call_unary, sse_response
from server.http.context import HttpContext
from server.http.rest import body_fields
from server.http.routes import error_responses, json_text, sse_events
from server.http.schema import REF
from server.services.generation import GenerationService
from server.services.models import ModelsService

GENERATE = f"/{GenerationService.name}/Generate"
LIST_LOADED = f"/{ModelsService.name}/ListLoadedModels"
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop"}
NO_CHAT = ("µLM's models carry no chat template, so there is no chat to complete: send the conversation as a "
           "prompt to /v1/completions")
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # the service's field names in its messages, as OpenAI names them
U32, U64 = 2**32 - 1, 2**64 - 1  # the proto fields' ranges (uint32 max_new_tokens and top_k, uint64 seed)
T = TypeVar("T")
# OpenAI's fields that µLM does not do, with the values that ask for nothing (a 400 names the field otherwise)
UNSUPPORTED: dict[str, tuple] = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (), "logit_bias": ({},),
                                 "presence_penalty": (0,), "frequency_penalty": (0,), "suffix": ("",)}


# -- requests -------------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(None, description="a last chunk with the usage and no choices")


class CompletionRequest(BaseModel):
    """OpenAI's completion request; a field µLM does not do is accepted only at its no-op value."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a loaded model's name (GET /v1/models); '' = the server's default model")
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="the text to complete (a list of one string is taken too; token ids are not)")
    max_tokens: int | None = Field(16, ge=1, le=U32, description="null = the server's --default-max-new-tokens")
    temperature: float | None = Field(1.0, description="0 = greedy")
    top_p: float | None = Field(1.0)
    top_k: int | None = Field(None, ge=0, le=U32, description="µLM's own (as vLLM's): 0 or null = off")
    seed: int | None = Field(None, ge=0, le=U64)
    stop: str | list[str] | None = Field(None, description="generation ends before the first of these")
    n: Literal[1] | None = Field(1, description="only 1: one completion per request")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end user's id, as OpenAI documents it: accepted, not used")
    # OpenAI's, which µLM does not do: refused (a 400 naming the field) unless at their no-op value
    best_of: Literal[1] | None = Field(None, description="only 1")
    echo: Literal[False] | None = Field(None, description="only false")
    logprobs: None = Field(None, description="only null: µLM returns no log-probabilities")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="only {} or null")
    presence_penalty: Literal[0] | None = Field(None, description="only 0")
    frequency_penalty: Literal[0] | None = Field(None, description="only 0")
    suffix: Literal[""] | None = Field(None, description="only ''")

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def no_op_only(cls, v: Any, info: ValidationInfo) -> None:
        allowed = UNSUPPORTED[info.field_name]
        # True == 1 in Python: a bool matches only a bool
        if v is None or any(v == ok and isinstance(v, bool) == isinstance(ok, bool) for ok in allowed):
            return None
        taken = " or ".join(json.dumps(ok) for ok in (*allowed, None))
        raise ValueError(f"µLM does not support {info.field_name}: only {taken} is taken, got {json.dumps(v)[:80]}")

    @field_validator("prompt", mode="before")
    @classmethod
    def one_text_prompt(cls, v: Any) -> Any:
        # token-id prompts and batches are valid OpenAI; say plainly that µLM takes neither
        if isinstance(v, list) and any(not isinstance(x, str) for x in v):
            raise ValueError("token-id prompts are not supported: send the prompt as a string")
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"one prompt per request (n=1), got a list of {len(v)}")
        return v

    @field_validator("stream_options")
    @classmethod
    def options_need_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def generate_request(self) -> pb.GenerateRequest:
        r = pb.GenerateRequest(model=self.model, prompt=self.prompt if isinstance(self.prompt, str) else self.prompt[0],
                               max_new_tokens=self.max_tokens or 0, top_k=self.top_k or 0,
                               temperature=1.0 if self.temperature is None else self.temperature,
                               top_p=1.0 if self.top_p is None else self.top_p,
                               stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []))
        if self.seed is not None:
            r.seed = self.seed
        return r


# -- responses (the OpenAPI document's; the handlers build the same objects as dicts) -------------------------

class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def documented(model: type[BaseModel], streamed: str | None = None) -> dict[int | str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": REF + model.__name__}}}
    if streamed is not None:  # an event's data: a chunk (the Completion object, choices[0] new text), then [DONE]
        data = {"if": {"const": "[DONE]"}, "else": json_text(REF + streamed)}
        content["text/event-stream"] = {"itemSchema": sse_events(data, "with stream: true, a chunk per event (a "
                                                                       "Completion of the new text), then [DONE]")}
    return {200: {"model": model, "content": content}, **error_responses()}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's openapi_extra: the model's JSON schema as the body (the handler reads and checks it itself)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    text = json.dumps(schema)
    for name, sub in defs.items():  # nested models, inlined (their refs point into the model's own $defs)
        text = text.replace(json.dumps({"$ref": f"#/$defs/{name}"}), json.dumps(sub))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": json.loads(text)}}}}


# -- the router -------------------------------------------------------------------------------------------------

def openai_router(app) -> APIRouter:
    """The /v1 routes; app is the server's App (server.app), whose services they call."""
    generation = service(app, GenerationService)
    models = service(app, ModelsService)
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    @router.post("/completions", responses=documented(Completion, streamed="Completion"),
                 openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        """A completion of the prompt (OpenAI's legacy Completions API); with stream: true, SSE chunks."""
        body = checked(CompletionRequest, await body_fields(request, app.max_request_bytes))
        ctx = HttpContext.from_headers(request.headers)
        messages = await start_generate(app, generation, body.generate_request(), ctx)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or generation.models.default}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(chunks(head, messages, usage))
        return JSONResponse(await unless_gone(request, whole(head, messages)))

    @router.get("/models", responses=documented(ModelList))
    async def list_models(request: Request) -> JSONResponse:
        """The models loaded on this server (what a completion's `model` may name)."""
        names = await loaded(app, models, request)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    @router.get("/models/{model}", responses=documented(ModelCard))
    async def get_model(model: str, request: Request) -> JSONResponse:
        """One loaded model; 404 when it is not loaded here."""
        if model not in await loaded(app, models, request):
            raise NotFound(f"model {model!r} is not loaded here; GET /v1/models lists the loaded ones")
        return JSONResponse(model_card(model))

    @router.post("/chat/completions", responses=error_responses())
    async def chat_completions(request: Request) -> JSONResponse:
        """Refused: µLM's models carry no chat template (use /v1/completions)."""
        async def refuse(_, ctx):
            raise InvalidArgument(NO_CHAT)
        return await call_unary(app, "/v1/chat/completions", refuse, None, HttpContext.from_headers(request.headers))

    return router


def checked(model: type[BaseModel], fields: dict[str, Any]) -> BaseModel:
    """The body as the model; its errors answered as FastAPI's own (400 naming the field)."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


async def loaded(app, models: ModelsService, request: Request) -> list[str]:
    answer = await call_unary(app, LIST_LOADED, models.ListLoadedModels, mpb.ListLoadedModelsRequest(),
                              HttpContext.from_headers(request.headers))
    return [m.name for m in answer.models]


def service(app, cls):
    return next(s for s in app.services if s.name == cls.name)


def model_card(name: str) -> dict[str, Any]:
    # ModelInfo tells no creation time; OpenAI's field is required, and 0 says "unknown" without inventing one
    return {"id": name, "object": "model", "created": 0, "owned_by": "ulm"}


async def start_generate(app, generation: GenerationService, request: pb.GenerateRequest,
                         ctx: HttpContext) -> AsyncIterator[pb.GenerateResponse]:
    """The Generate call, started (an error before its first message raises, so it is the HTTP status); the
    service's messages name its own fields, renamed here to OpenAI's."""
    try:
        return await call_stream(app, GENERATE, generation.Generate, request, ctx)
    except InvalidArgument as e:
        field = e.message.split(" ", 1)[0]
        if field in OPENAI_NAMES:
            raise InvalidArgument(OPENAI_NAMES[field] + e.message[len(field):]) from e
        raise


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled should the client leave first: a non-streamed completion's slot is freed at once, as a
    closed stream's is, not when max_tokens are made for no one."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # the call's messages close: the generation is cancelled (HttpContext.finish)
            await asyncio.wait([task])
    if task.cancelled():
        raise ClientGone("the client left before its completion was made")
    return task.result()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def choice(text: str, finish_reason: int) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish_reason)}


def usage(m: pb.GenerateResponse) -> dict[str, int]:
    u = m.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


async def whole(head: dict, messages: AsyncIterator[pb.GenerateResponse]) -> dict[str, Any]:
    texts, last = [], pb.GenerateResponse()
    async for last in messages:
        texts.append(last.text)
    return {**head, "choices": [choice("".join(texts), last.finish_reason)], "usage": usage(last)}


async def chunks(head: dict, messages: AsyncIterator[pb.GenerateResponse], include_usage: bool) -> AsyncIterator[str]:
    """One chunk per GenerateResponse (the last one with its finish_reason), the usage chunk when asked, [DONE].
    Closing this generator (the client left) closes the call's messages, which cancels the generation."""
    extra = {"usage": None} if include_usage else {}  # OpenAI: null in every chunk but the usage one
    try:
        last = None
        async for last in messages:
            yield dumps({**head, "choices": [choice(last.text, last.finish_reason)], **extra})
        if include_usage and last is not None:
            yield dumps({**head, "choices": [], "usage": usage(last)})
        yield "[DONE]"
    finally:
        await messages.aclose()


def dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
