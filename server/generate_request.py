"""A Generate call's request, validated and tokenized: every error is InvalidArgument naming the field.

A prompt that cannot fit the context is refused from its length in characters, before it is tokenized; a long
text is tokenized by `encode_large` (the tokenizer worker process), so that the event loop keeps serving the other
calls meanwhile.
"""
from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from protos.ulm.v1 import text_generation_pb2 as pb
from server.errors import InvalidArgument
from server.sequence import TokenRequest
from ulm.generate import SamplingParams
from ulm.tokenizer import Tokenizer

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
ON_LOOP_CHARS = 4096  # longer texts are tokenized in the worker process: on the event loop they would stall calls
LargeEncoder = Callable[[str], Awaitable[list[int]]]


@dataclass
class Limits:
    max_new_tokens: int  # the most a request may ask for (--max-new-tokens)
    default_max_new_tokens: int  # what asking for 0 means (--default-max-new-tokens)


@dataclass
class TextRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop: list[str]

    def tokens(self, eos_id: int | None, deadline: float | None = None) -> TokenRequest:
        """What the scheduler runs: the same request without its stop strings (the text's business)."""
        return TokenRequest(self.prompt_ids, self.max_new_tokens, self.params, eos_id, deadline)


async def encode(tokenizer: Tokenizer, text: str, encode_large: LargeEncoder) -> list[int]:
    return tokenizer.encode(text) if len(text) <= ON_LOOP_CHARS else await encode_large(text)


def sampling_params(r: pb.GenerateRequest) -> SamplingParams:
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(r, name)):
            raise InvalidArgument(f"{name} must be a finite number, got {getattr(r, name)}")
    params = SamplingParams(r.temperature, r.top_k, r.top_p, r.seed if r.HasField("seed") else None)
    try:
        params.validate()
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
    return params


def stop_strings(stop: list[str]) -> list[str]:
    if len(stop) > MAX_STOP:
        raise InvalidArgument(f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(stop)


async def prompt_ids(prompt: str, tokenizer: Tokenizer, context: int, encode_large: LargeEncoder) -> list[int]:
    if len(prompt) > context * tokenizer.max_token_chars:  # cheap: no tokenizing of what cannot fit anyway
        raise InvalidArgument(f"prompt ({len(prompt)} characters) cannot fit the context length {context} "
                              f"(a token holds at most {tokenizer.max_token_chars} characters)")
    ids = await encode(tokenizer, prompt, encode_large)
    if not ids:
        raise InvalidArgument("prompt must not be empty")
    if len(ids) > context:
        raise InvalidArgument(f"prompt ({len(ids)} tokens) exceeds the context length {context}")
    return ids


def max_new_tokens(asked: int, limits: Limits) -> int:
    if asked > limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens ({asked}) exceeds this server's limit "
                              f"({limits.max_new_tokens}, --max-new-tokens)")
    return asked or limits.default_max_new_tokens  # past the context, the window slides


async def parse_generate(r: pb.GenerateRequest, tokenizer: Tokenizer, context: int, limits: Limits,
                         encode_large: LargeEncoder) -> TextRequest:
    """The request the scheduler and the text output need; the first check that fails, in this order, raises."""
    params = sampling_params(r)
    stop = stop_strings(list(r.stop))
    ids = await prompt_ids(r.prompt, tokenizer, context, encode_large)
    return TextRequest(ids, max_new_tokens(r.max_new_tokens, limits), params, stop)
