"""Auth and TLS against a real server: bearer tokens on every µLM method, health and reflection open, TLS with a
certificate made here, and the refusal to serve an address other than loopback without a token."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_fixture import ROOT, InProcessServer, make_toy_checkpoint

from clients.cli import main as cli_main
from protos.ulm.v1 import text_generation_pb2 as pb
from protos.ulm.v1 import text_generation_pb2_grpc as pb_grpc
from server.__main__ import build_parser
from server.auth import INVALID, MISSING, is_loopback, load_tokens, security_from_args

TOKEN = "s3cret-token-one"
OTHER_TOKEN = "another-token"
REQUEST_LIMIT = 1000  # --max-request-bytes of the token server: a larger request is refused only after the token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_toy_checkpoint(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# the team's tokens\n\n{TOKEN}\n   {OTHER_TOKEN}  \n# {TOKEN}-old (revoked)\n")
    return path


def server_argv(checkpoint, tmp_path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "root"), *extra]


@pytest.fixture(scope="module")
def server(checkpoint, token_file, tmp_path_factory):
    argv = server_argv(checkpoint, tmp_path_factory.mktemp("srv"), "--auth-token-file", str(token_file),
                       "--max-request-bytes", str(REQUEST_LIMIT))
    with InProcessServer(argv) as s:
        yield s


def ulm_methods(channel: grpc.Channel) -> list:
    """Every method of every µLM service the server registered, found as grpcurl finds them (reflection)."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    names = [n for n in database.get_services() if n.startswith("ulm.")]
    return [m for n in names for m in pool.FindServiceByName(n).methods]


def call_code(channel: grpc.Channel, method, metadata=(), timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    """Call a method with an empty request (raw bytes: any message may be empty) and return its status."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = iter([b""]) if method.client_streaming else b""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    multicallable = kind[(method.client_streaming, method.server_streaming)](path)
    try:
        if not method.server_streaming:
            multicallable(request, metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, ""
        stream = multicallable(request, metadata=metadata, timeout=timeout)
        try:
            next(stream)  # the first message is enough: the call got past the interceptor
            return grpc.StatusCode.OK, ""
        finally:
            stream.cancel()
    except grpc.RpcError as e:
        return e.code(), e.details()
    except StopIteration:
        return grpc.StatusCode.OK, ""


def test_token_file_lines(token_file, tmp_path):
    assert load_tokens(str(token_file)) == (TOKEN.encode(), OTHER_TOKEN.encode())
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(ValueError, match="--auth-token-file .* holds no token"):
        load_tokens(str(empty))
    with pytest.raises(ValueError, match="--auth-token-file"):
        load_tokens(str(tmp_path / "missing"))


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_every_ulm_method_wants_the_token(server):
    with grpc.insecure_channel(server.target) as channel:
        methods = ulm_methods(channel)  # reflection needs no token
        services = {m.containing_service.full_name for m in methods}
        assert services == {s.name for s in server.app.services} and "ulm.v1.TextGeneration" in services
        for method in methods:
            label = f"{method.containing_service.full_name}/{method.name}"
            before = server.metric("ulm_requests_total", method=label, code="UNAUTHENTICATED")
            assert call_code(channel, method) == (grpc.StatusCode.UNAUTHENTICATED, MISSING), label
            assert call_code(channel, method, bearer("wrong")) == (grpc.StatusCode.UNAUTHENTICATED, INVALID), label
            assert call_code(channel, method, bearer(TOKEN + "x")) == (grpc.StatusCode.UNAUTHENTICATED, INVALID)
            assert call_code(channel, method, (("authorization", f"Basic {TOKEN}"),))[1] == MISSING, label
            assert server.metric("ulm_requests_total", method=label, code="UNAUTHENTICATED") == before + 4, label


def test_health_and_reflection_stay_open(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ulm.v1.TextGeneration"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert "grpc.health.v1.Health" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_token_is_checked_before_the_request_is_read(server):
    big = pb.TokenizeRequest(text="x" * (2 * REQUEST_LIMIT))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(big, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(big, metadata=bearer(TOKEN), timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the scheme is case-insensitive, and every token of the file is good
        assert stub.Tokenize(pb.TokenizeRequest(text="ab"), metadata=(("authorization", f"bearer {OTHER_TOKEN}"),),
                             timeout=5).token_ids


def test_the_right_token_passes_every_method(checkpoint, token_file, tmp_path):
    # its own server: empty requests with a good token reach the handlers, which may change state
    with InProcessServer(server_argv(checkpoint, tmp_path, "--auth-token-file", str(token_file))) as s, \
            grpc.insecure_channel(s.target) as channel:
        methods = ulm_methods(channel)
        for method in methods:
            code, details = call_code(channel, method, bearer(TOKEN))
            assert code != grpc.StatusCode.UNAUTHENTICATED, f"{method.full_name}: {details}"
        r = "".join(m.text for m in pb_grpc.TextGenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="ab", max_new_tokens=5), metadata=bearer(OTHER_TOKEN), timeout=10))
        assert len(r) > 0


def test_tls_with_stubs_reflection_and_the_cli(checkpoint, token_file, certificate, tmp_path, capsys):
    cert, key = certificate
    argv = server_argv(checkpoint, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
                       "--auth-token-file", str(token_file))
    with InProcessServer(argv) as s:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(s.target, credentials) as channel:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()  # grpcurl -cacert ... list
            assert {"ulm.v1.TextGeneration", "grpc.health.v1.Health"} <= set(services)
            method = ulm_methods(channel)[0]  # grpcurl ... describe: the descriptors resolve over TLS too
            assert method.containing_service.full_name.startswith("ulm.v1.")
            stub = pb_grpc.TextGenerationStub(channel)
            text = "".join(m.text for m in stub.Generate(pb.GenerateRequest(prompt="ab", max_new_tokens=4, seed=1),
                                                         metadata=bearer(TOKEN), timeout=10))
            assert len(text) > 0
        with grpc.insecure_channel(s.target) as plain:  # a plaintext client gets no answer from a TLS port
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.TextGenerationStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        capsys.readouterr()
        assert cli_main(["tokenize", "ab", "--target", s.target, "--tls-ca", str(cert), "--token", TOKEN]) == 0
        assert '"token_ids"' in capsys.readouterr().out
        assert cli_main(["bench", "--streams", "2", "--max-new-tokens", "2", "--target", s.target, "--tls-ca",
                         str(cert), "--token", TOKEN]) == 0
        out = capsys.readouterr().out
        assert "2 streams:" in out and "errors" not in out, out
        assert cli_main(["info", "--target", s.target, "--tls-ca", str(cert)]) == 1
        assert f"error: UNAUTHENTICATED: {MISSING}" in capsys.readouterr().err


def test_tls_flags_go_together(certificate, tmp_path):
    cert, _ = certificate
    args = build_parser().parse_args(["--data-root", str(tmp_path), "--tls-cert", str(cert)])
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        security_from_args(args)


def test_an_open_non_loopback_address_is_refused(checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", *server_argv(checkpoint, tmp_path), "--host", "0.0.0.0",
                        "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "--auth-token-file" in line]
    assert len(lines) == 1 and "--allow-unauthenticated" in lines[0] and "0.0.0.0" in lines[0], r.stderr


@pytest.mark.parametrize("flags", [["--allow-unauthenticated"], ["--auth-token-file"]])
def test_a_non_loopback_address_starts_with_a_token_or_the_flag(checkpoint, token_file, tmp_path, flags):
    flags = [*flags, str(token_file)] if flags == ["--auth-token-file"] else flags
    with InProcessServer(server_argv(checkpoint, tmp_path, "--host", "0.0.0.0", *flags)) as s, \
            grpc.insecure_channel(s.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
