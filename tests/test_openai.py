"""The OpenAI-compatible API (/v1) against a real server on loopback ports, with the official `openai` client:
completions equal to the gRPC stream's for the same greedy request (streamed and not), usage, include_usage, stop
strings, finish reasons, every unsupported field a 400 naming it, the models list, chat refused, bearer tokens,
and a closed stream that frees its slot."""
from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from server_fixture import CONTEXT, InProcessServer, make_toy_checkpoint

from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.detokenize import TextStream
from ulm.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "The quick brown fox"  # a random toy model repeats tokens; after this prompt, two different ones
MAX_NEW_TOKENS = 50 * CONTEXT  # the server's --max-new-tokens (past the context, the window slides)
TOKEN = "openai-test-token"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def server(checkpoint):
    argv = ["--checkpoint", str(checkpoint), "--http-port", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--default-max-new-tokens", "8"]
    with InProcessServer(argv) as s:
        yield s


def client_of(server, api_key: str = "x") -> openai.OpenAI:
    # no retries: a 429 or 5xx must reach the test as the server sent it
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key=api_key, max_retries=0,
                         timeout=30)


@pytest.fixture(scope="module")
def client(server):
    with client_of(server) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TextGenerationStub(channel)


@pytest.fixture(scope="module")
def default_name(stub) -> str:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name


def grpc_stream(stub, prompt: str = PROMPT, max_new_tokens: int = 48, **fields) -> list[pb.GenerateResponse]:
    fields = {"temperature": 0, **fields}
    return list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, **fields),
                              timeout=30))


def token_boundaries(checkpoint, token_ids: list[int]) -> set[int]:
    """Where each token's text ends in the completion (the server's own detokenizer, token by token): a chunk that
    carries whole tokens ends at one of these."""
    stream, total, ends = TextStream(load_checkpoint(checkpoint)[1], []), 0, {0}
    for t in token_ids:
        total += len(stream.push(t)[0])
        ends.add(total)
    ends.add(total + len(stream.flush()[0]))
    return ends


def chunk_ends(texts: list[str]) -> set[int]:
    ends, total = set(), 0
    for t in texts:
        total += len(t)
        ends.add(total)
    return ends


@pytest.mark.parametrize("prompt, sampling", [
    (PROMPT, {"temperature": 0}),
    ("Once upon a time", {"temperature": 0.8, "seed": 1}),  # many bytes that are no whole character: held back
], ids=["greedy", "seeded"])
def test_streamed_completion_is_the_grpc_stream_token_for_token(client, stub, checkpoint, default_name, prompt,
                                                                 sampling):
    messages = grpc_stream(stub, prompt, **sampling)
    chunks = list(client.completions.create(model="", prompt=prompt, max_tokens=48, stream=True,
                                            stream_options={"include_usage": True}, **sampling))
    *text_chunks, usage_chunk = chunks
    texts = [c.choices[0].text for c in text_chunks]
    assert "".join(texts) == "".join(m.text for m in messages)
    assert usage_chunk.usage.completion_tokens == messages[-1].usage.completion_tokens == 48
    # the same tokens, each chunk whole tokens' text: one chunk per GenerateResponse, and a client that lags
    # behind the decoding gets the tokens waiting for it in one (over gRPC as over HTTP, each as it happens to lag)
    ends = token_boundaries(checkpoint, [t for m in messages for t in m.token_ids])
    assert chunk_ends(texts) <= ends and chunk_ends([m.text for m in messages]) <= ends
    assert 1 < sum(1 for t in texts if t) <= len(text_chunks) <= 48  # streamed, not sent whole
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert {c.model for c in chunks} == {default_name} and {c.object for c in chunks} == {"text_completion"}


def test_completion_has_the_grpc_text_and_usage(client, stub, default_name):
    final = grpc_stream(stub, max_new_tokens=20)
    done = client.completions.create(model=default_name, prompt=PROMPT, max_tokens=20, temperature=0)
    assert done.choices[0].text == "".join(m.text for m in final)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (final[-1].usage.prompt_tokens,
                                                                       final[-1].usage.completion_tokens)
    prompt_tokens = len(stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=10).token_ids)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens == prompt_tokens + 20
    assert done.choices[0].finish_reason == "length" and done.choices[0].index == 0
    assert done.object == "text_completion" and done.model == default_name and done.id.startswith("cmpl-")
    assert done.created > 1.7e9


def test_max_tokens_defaults_to_openais_16_and_null_to_the_servers_default(client):
    assert client.completions.create(model="", prompt=PROMPT, temperature=0).usage.completion_tokens == 16
    done = client.completions.create(model="", prompt=PROMPT, temperature=0, max_tokens=None)
    assert done.usage.completion_tokens == 8  # --default-max-new-tokens


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="", prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_list_of_one_prompt_is_the_prompt(client):
    one = client.completions.create(model="", prompt=[PROMPT], max_tokens=6, temperature=0)
    assert one.choices[0].text == client.completions.create(model="", prompt=PROMPT, max_tokens=6,
                                                            temperature=0).choices[0].text


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string_ends_the_text_before_it(client, stub, stream, as_list):
    full = "".join(m.text for m in grpc_stream(stub, max_new_tokens=40))
    stop = full[12:15]
    cut = full[:full.index(stop)]
    request = dict(model="", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop] if as_list else stop)
    if stream:
        chunks = list(client.completions.create(**request, stream=True))
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        done = client.completions.create(**request)
        text, finish = done.choices[0].text, done.choices[0].finish_reason
    assert (text, finish) == (cut, "stop")


def test_sampling_with_a_seed_repeats(client):
    runs = [client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.9, seed=7)
            for _ in range(2)]
    other = client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.9, seed=8)
    assert runs[0].choices[0].text == runs[1].choices[0].text != other.choices[0].text


def test_top_k_one_is_greedy(client):
    """top_k, µLM's (and vLLM's) own field beside OpenAI's: reaches the sampler."""
    greedy = client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    top1 = client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1}).choices[0].text
    sampled = client.completions.create(model="", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3)
    assert top1 == greedy != sampled.choices[0].text


def test_the_defaults_of_unsupported_fields_are_taken(client):
    done = client.completions.create(model="", prompt=PROMPT, max_tokens=3, temperature=0, n=1, best_of=1, echo=False,
                                     logprobs=None, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                     suffix="", user="end-user-42")
    assert done.usage.completion_tokens == 3


@pytest.mark.parametrize("field, fields", [
    ("logprobs", {"logprobs": 1}), ("echo", {"echo": True}), ("best_of", {"best_of": 2}),
    ("presence_penalty", {"presence_penalty": 0.5}), ("frequency_penalty", {"frequency_penalty": -1}),
    ("logit_bias", {"logit_bias": {"65": 10}}), ("suffix", {"suffix": " the end"}), ("n", {"n": 2}),
    ("prompt", {"prompt": [17, 42, 99]}), ("prompt", {"prompt": ["one", "two"]}), ("prompt", {"prompt": [[1, 2]]}),
    ("stream_options", {"stream_options": {"include_usage": True}}),
    ("include_obfuscation", {"stream": True, "stream_options": {"include_obfuscation": True}}),
    ("response_format", {"extra_body": {"response_format": {"type": "json_object"}}}),
    ("max_tokens", {"max_tokens": 0}), ("max_tokens", {"max_tokens": MAX_NEW_TOKENS + 1}),
    ("max_tokens", {"max_tokens": 2**32}), ("top_k", {"extra_body": {"top_k": -1}}), ("seed", {"seed": 2**64}),
    ("seed", {"seed": -1}), ("temperature", {"temperature": -0.5}), ("top_p", {"top_p": 1.5}),
    ("stop", {"stop": ["x"] * 17}), ("model", {"extra_body": {"model": 3}}),
])
def test_an_unsupported_or_bad_field_is_a_400_naming_it(client, field, fields):
    request = {"model": "", "prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        result = client.completions.create(**request)
        list(result) if request.get("stream") else None
    assert field in e.value.body["message"], e.value.body
    assert e.value.body["code"] == "INVALID_ARGUMENT"


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert "no-such-model" in e.value.body["message"]


def test_models_lists_the_loaded_models(client, default_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [default_name]
    assert {(m.object, m.owned_by) for m in models.data} == {("model", "ulm")}
    assert client.models.retrieve(default_name).id == default_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-loaded")


def test_chat_is_refused_naming_the_missing_template(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"] and "/v1/completions" in e.value.body["message"]


def test_closing_a_stream_cancels_the_generation(server, client):
    cancelled = server.metric("ulm_finished_requests_total", reason="cancelled")
    tokens = server.metric("ulm_generated_tokens_total")
    many = MAX_NEW_TOKENS  # seconds of work, even at a fast model's several tokens a message
    stream = client.completions.create(model="", prompt=PROMPT, max_tokens=many, temperature=0, stream=True)
    for _, _ in zip(stream, range(3)):
        pass
    assert server.metric("ulm_running_requests") == 1
    stream.close()
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=5)
    assert server.metric("ulm_finished_requests_total", reason="cancelled") == cancelled + 1
    assert server.metric("ulm_generated_tokens_total") - tokens < many  # it stopped generating
    assert server.metric("ulm_running_requests") == 0


def test_a_client_that_leaves_a_completion_cancels_it(server):
    """Not streamed: a client that gives up (its timeout) frees the slot at once, not after max_tokens."""
    cancelled = server.metric("ulm_finished_requests_total", reason="cancelled")
    tokens = server.metric("ulm_generated_tokens_total")
    left = server.metric("ulm_http_requests_total", route="POST /v1/completions", code="499")
    many = MAX_NEW_TOKENS  # seconds of work
    with client_of(server).with_options(timeout=0.5) as client, pytest.raises(openai.APITimeoutError):
        client.completions.create(model="", prompt=PROMPT, max_tokens=many, temperature=0)  # no EOS
    assert server.wait_until(lambda: server.scheduler.busy_slots == 0, timeout=5)
    assert server.metric("ulm_finished_requests_total", reason="cancelled") == cancelled + 1
    assert server.metric("ulm_generated_tokens_total") - tokens < many
    assert server.wait_until(lambda: server.metric("ulm_http_requests_total", route="POST /v1/completions",
                                                   code="499") == left + 1)


def test_http_requests_are_counted_by_route_and_code(server, client):
    route = "POST /v1/completions"
    before = {code: server.metric("ulm_http_requests_total", route=route, code=code) for code in ("200", "400")}
    client.completions.create(model="", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="", prompt=PROMPT, max_tokens=2, echo=True)
    assert server.metric("ulm_http_requests_total", route=route, code="200") == before["200"] + 1
    assert server.metric("ulm_http_requests_total", route=route, code="400") == before["400"] + 1


# -- a full queue, bearer tokens (servers of their own) ------------------------------------------------------------

def test_a_full_queue_is_a_429_with_retry_after(checkpoint):
    argv = ["--checkpoint", str(checkpoint), "--http-port", "0", "--max-batch", "1", "--max-queue", "0",
            "--max-new-tokens", str(MAX_NEW_TOKENS)]
    with InProcessServer(argv) as server, client_of(server) as client:
        busy = client.completions.create(model="", prompt=PROMPT, max_tokens=MAX_NEW_TOKENS, temperature=0,
                                         stream=True)  # seconds of work
        next(iter(busy))
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="", prompt=PROMPT, max_tokens=2)
        assert "queue is full" in e.value.body["message"]
        assert int(e.value.response.headers["retry-after"]) >= 1
        busy.close()


@pytest.fixture(scope="module")
def token_server(checkpoint, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    argv = ["--checkpoint", str(checkpoint), "--http-port", "0", "--auth-token-file", str(tokens)]
    with InProcessServer(argv) as s:
        yield s


def test_the_bearer_token_is_the_api_key(token_server, default_name):
    with client_of(token_server, TOKEN) as client:  # greedy: OpenAI's default temperature 1 may sample EOS
        assert client.completions.create(model="", prompt=PROMPT, max_tokens=3,
                                         temperature=0).usage.completion_tokens == 3
        chunks = list(client.completions.create(model="", prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert [m.id for m in client.models.list().data] == [default_name]


@pytest.mark.parametrize("call", ["completion", "stream", "models", "chat"])
def test_a_wrong_api_key_is_a_401(token_server, call):
    with client_of(token_server, "wrong-token") as client, pytest.raises(openai.AuthenticationError) as e:
        if call == "completion":
            client.completions.create(model="", prompt=PROMPT, max_tokens=3)
        elif call == "stream":
            list(client.completions.create(model="", prompt=PROMPT, max_tokens=3, stream=True))
        elif call == "models":
            client.models.list()
        else:
            client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body == {"code": "UNAUTHENTICATED", "message": "invalid bearer token"}


def test_no_token_is_a_401_before_the_body_is_looked_at(token_server):
    url = f"http://127.0.0.1:{token_server.app.http_port}/v1/completions"
    for body in ({"model": "", "prompt": PROMPT}, {"model": "", "prompt": PROMPT, "echo": True}, {"junk": 1}):
        r = httpx.post(url, json=body, timeout=10)
        assert r.status_code == 401, (body, r.text)
        assert r.json()["error"]["code"] == "UNAUTHENTICATED"
