"""Bounded fuzzing (Hypothesis, derandomized so CI sees the same cases): random requests at the generation
service's parser, random token streams and stop strings at the detokenizer and stop matcher."""
from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixture import CONTEXT, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from server.__main__ import build_parser
from server.backends import load_backend
from server.data_root import DataRoot
from server.detokenize import TextStream
from server.errors import InvalidArgument
from server.metrics import Metrics
from server.services.generation import GenerationService
from server.shared import Shared
from ulm.generate import SamplingParams, sample_token
from ulm.tokenizer import byte_level, char_level

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENIZERS = {"byte": byte_level(), "char": char_level("abc hélo ✓")}

float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["", "x"]),
    prompt=st.one_of(st.text(max_size=40), st.text(alphabet="ab", min_size=CONTEXT - 4, max_size=CONTEXT + 4)),
    max_new_tokens=st.integers(0, 2**32 - 1),
    temperature=st.one_of(float32, st.sampled_from([0.0, 1e-45, 1e-38, 0.7, 100.0, 100.5])),
    top_k=st.integers(0, 2**32 - 1),
    top_p=st.one_of(float32, st.sampled_from([0.0, 0.9, 1.0])),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(st.text(max_size=300), max_size=20),
)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The generation service with its real backend, without the scheduler: only its parser runs."""
    checkpoint = make_toy_checkpoint(tmp_path_factory.mktemp("toy"))
    args = build_parser().parse_args(["--checkpoint", str(checkpoint)])
    s = GenerationService(args, Shared(Metrics(), DataRoot(tmp_path_factory.mktemp("root"))))
    s.engine.backend = load_backend("torch", checkpoint, "cpu", 4)
    yield s


@FUZZ
@given(request=requests)
def test_the_parser_accepts_a_valid_request_or_names_the_field(service, request):
    try:
        req = asyncio.run(service.parse(request))
    except InvalidArgument as e:
        fields = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop")
        assert any(f in e.message for f in fields) and "\n" not in e.message, e.message
        return
    assert 1 <= len(req.prompt_ids) <= CONTEXT
    assert 1 <= req.max_new_tokens <= service.args.max_new_tokens
    req.params.validate()
    assert all(math.isfinite(v) for v in (req.params.temperature, req.params.top_p))
    assert req.stop == list(request.stop)


def tokens_of(tokenizer_name: str):
    n = TOKENIZERS[tokenizer_name].vocab_size
    return st.lists(st.integers(0, n - 1), max_size=60)


@FUZZ
@given(name=st.sampled_from(sorted(TOKENIZERS)), data=st.data())
def test_streamed_text_is_the_decoded_completion_cut_at_the_first_stop(name, data):
    tokenizer = TOKENIZERS[name]
    ids = data.draw(tokens_of(name), label="ids")
    full = tokenizer.decode(ids)
    # stop strings: random ones, and pieces of the completion itself (so they do match, across tokens)
    pieces = st.builds(lambda i, n: full[i:i + n], st.integers(0, max(0, len(full) - 1)), st.integers(1, 4))
    stops = data.draw(st.lists(st.one_of(st.text(min_size=1, max_size=4), pieces).filter(bool), max_size=3),
                      label="stops")
    stream, out, stopped = TextStream(tokenizer, stops), [], False
    for token in ids:
        text, stopped = stream.push(token)
        out.append(text)
        if stopped:
            break
    if not stopped:
        text, stopped = stream.flush()
        out.append(text)
    cut = first_stop_cut(tokenizer, ids, full, stops)
    assert "".join(out) == (full if cut is None else full[:cut])
    assert stopped == (cut is not None)
    assert all("\ufffd" not in t or "\ufffd" in full for t in out)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(logits=st.lists(st.floats(-1e4, 1e4, width=32), min_size=2, max_size=50),
       temperature=st.one_of(st.floats(0, 100, width=32, exclude_min=True), st.sampled_from([1e-45, 1e-38, 100.0])),
       top_k=st.integers(0, 60), top_p=st.floats(0, 1, width=32), seed=st.integers(0, 2**32))
def test_sampling_picks_a_valid_token_for_every_accepted_setting(logits, temperature, top_k, top_p, seed):
    import torch

    params = SamplingParams(temperature, top_k, top_p, seed)
    params.validate()
    t = torch.tensor(logits)
    token = sample_token(t, params, params.make_generator())
    assert 0 <= token < len(logits)
    if temperature <= 1e-30:
        assert t[token] == t.max()  # a tiny temperature is greedy (ties aside)


def first_stop_cut(tokenizer, ids: list[int], full: str, stops: list[str]) -> int | None:
    """Where a stream must cut: stops are looked for in the text known after each token (whole characters), so
    the first token boundary whose text holds a stop decides, and the cut is the earliest start among the stops
    in that text (a longer stop that started earlier but completes later is never seen)."""
    boundaries = sorted({len(t) for i in range(1, len(ids) + 1) if full.startswith(t := tokenizer.decode(ids[:i]))
                         and not t.endswith("\ufffd")} | {len(full)})
    for end in boundaries:
        starts = [i for i in (full[:end].find(s) for s in stops) if i >= 0]
        if starts:
            return min(starts)
    return None

