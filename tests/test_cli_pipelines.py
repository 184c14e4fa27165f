"""`python -m clients files|datasets|models|jobs` against a real server (a token required) through main(argv)."""
from __future__ import annotations

import hashlib
import io
import json

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_fixture import InProcessServer, make_toy_checkpoint

from clients.cli import main as cli_main
from clients.resources import CHUNK_BYTES, upload_requests
from clients.watch import ProgressView
from protos.ulm.v1 import jobs_pb2 as jpb

TOKEN = "cli-test-token"
TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "tokens").write_text(f"{TOKEN}\n")
    # a training run (its best/ checkpoint) in the data root before the server starts: what `models list` shows
    make_toy_checkpoint(d / "root" / "models" / "toy-a" / "best", seed=1)
    argv = ["--checkpoint", str(make_toy_checkpoint(d / "default")), "--data-root", str(d / "root"),
            "--auth-token-file", str(d / "tokens")]
    with InProcessServer(argv) as s:
        yield s


@pytest.fixture(scope="module")
def services(server) -> set[str]:
    with grpc.insecure_channel(server.target) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def needs(services: set[str], *names: str) -> None:
    missing = [n for n in names if n not in services]
    if missing:
        pytest.skip(f"not registered yet: {', '.join(missing)}")


def cli(capsys, server, *argv: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    capsys.readouterr()
    extra = ["--target", server.target] + (["--token", token] if token is not None else [])
    rc = cli_main([*argv, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_upload_streams_one_mib_chunks():
    data = bytes(range(256)) * (5 * CHUNK_BYTES // 512)  # 2.5 MiB
    requests = list(upload_requests(io.BytesIO(data), "a.txt", overwrite=True))
    assert requests[0].WhichOneof("part") == "header" and requests[0].header.name == "a.txt"
    assert requests[0].header.overwrite and requests[0].header.size_bytes == len(data)
    assert [len(r.chunk) for r in requests[1:]] == [CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES // 2]
    assert b"".join(r.chunk for r in requests[1:]) == data


def test_files_upload_list_delete(server, services, tmp_path, capsys):
    needs(services, "ulm.v1.Files")
    path = tmp_path / "hamlet.txt"
    data = (TEXT * 700).encode()  # over 2 MiB: three chunks on the wire
    path.write_bytes(data)
    rc, out, err = cli(capsys, server, "files", "upload", str(path))
    assert rc == 0, err
    assert out.startswith("uploaded hamlet.txt") and hashlib.sha256(data).hexdigest()[:16] in out
    rc, out, err = cli(capsys, server, "files", "upload", str(path))
    assert rc == 1 and err.startswith("error: ALREADY_EXISTS")
    assert cli(capsys, server, "files", "upload", str(path), "--name", "copy.txt")[0] == 0
    assert cli(capsys, server, "files", "upload", str(path), "--name", "copy.txt", "--overwrite")[0] == 0
    rc, out, _ = cli(capsys, server, "files", "list")
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["copy.txt", "hamlet.txt"]
    rc, out, _ = cli(capsys, server, "files", "list", "--json")
    listed = {f["name"]: f for f in json.loads(out)["files"]}
    assert int(listed["hamlet.txt"]["size_bytes"]) == len(data)
    assert listed["hamlet.txt"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert cli(capsys, server, "files", "delete", "copy.txt")[:2] == (0, "deleted copy.txt\n")
    rc, out, err = cli(capsys, server, "files", "delete", "copy.txt")
    assert rc == 1 and err.startswith("error: NOT_FOUND")
    rc, out, _ = cli(capsys, server, "files", "list")
    assert [line.split()[0] for line in out.splitlines()] == ["hamlet.txt"]
    rc, _, err = cli(capsys, server, "files", "upload", str(tmp_path / "absent.txt"))
    assert rc == 2 and "absent.txt" in err


def test_the_token_flag_and_its_environment_variable(server, services, capsys, monkeypatch):
    monkeypatch.delenv("ULM_TOKEN", raising=False)
    rc, _, err = cli(capsys, server, "info", token=None)
    assert rc == 1 and err == "error: UNAUTHENTICATED: missing bearer token in the authorization metadata\n"
    rc, _, err = cli(capsys, server, "info", token="not-it")
    assert rc == 1 and err == "error: UNAUTHENTICATED: invalid bearer token\n"
    monkeypatch.setenv("ULM_TOKEN", TOKEN)
    rc, out, err = cli(capsys, server, "info", token=None)
    assert rc == 0 and "context_length:" in out, err
    rc, out, err = cli(capsys, server, "generate", "To be", "--max-new-tokens", "3", "--seed", "1", token=None)
    assert rc == 0 and len(out) > 1, err
    rc, out, err = cli(capsys, server, "bench", "--streams", "2", "--max-new-tokens", "2", token=None)  # asyncio
    assert rc == 0 and "2 streams:" in out and "errors" not in out, out + err
    if "ulm.v1.Files" in services:
        assert cli(capsys, server, "files", "list", token=None)[0] == 0


def test_models_list_load_unload_delete(server, services, capsys):
    needs(services, "ulm.v1.Models")
    rc, out, err = cli(capsys, server, "models", "loaded")
    assert rc == 0 and "(default)" in out and out.count("\n") == 1, err
    rc, out, err = cli(capsys, server, "models", "list")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert rc == 0 and "checkpoint" in lines["toy-a"] and "loaded" not in lines["toy-a"], err
    rc, out, err = cli(capsys, server, "models", "load", "toy-a", "--backend", "torch")
    assert rc == 0 and "name: toy-a" in out and "backend: torch" in out, err
    rc, out, _ = cli(capsys, server, "models", "loaded")
    assert [line.split()[0] for line in out.splitlines()].count("toy-a") == 1
    rc, out, _ = cli(capsys, server, "generate", "To be", "--model", "toy-a", "--max-new-tokens", "3")
    assert rc == 0 and len(out) > 1
    rc, out, _ = cli(capsys, server, "models", "get", "toy-a", "--json")
    assert json.loads(out)["loaded"] is True
    rc, _, err = cli(capsys, server, "models", "delete", "toy-a")
    assert rc == 1 and err.startswith("error: FAILED_PRECONDITION")
    assert cli(capsys, server, "models", "unload", "toy-a")[:2] == (0, "unloaded toy-a\n")
    assert cli(capsys, server, "models", "delete", "toy-a")[:2] == (0, "deleted toy-a\n")
    rc, out, _ = cli(capsys, server, "models", "list")
    assert "toy-a" not in out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_view_shows_steps_and_prints_lines_above(capsys):
    terminal = Terminal()
    view = ProgressView(terminal)
    view.job(jpb.Job(id="j1", kind=jpb.JOB_KIND_TRAINING, state=jpb.JOB_STATE_RUNNING,
                     progress=jpb.JobProgress(step=0, total=100)))
    view.step(jpb.StepEvent(step=40, loss=1.2345, learning_rate=3e-4, tokens_per_s=1500, eta_s=75))
    view.write("a line the job printed")
    view.eval(jpb.EvalEvent(step=40, val_loss=1.5, val_perplexity=4.48))
    assert view.bar.n == 40 and view.bar.total == 100
    view.close()
    out, _ = capsys.readouterr()
    bar = terminal.getvalue()
    assert out.splitlines() == ["a line the job printed", "eval at step 40: val loss 1.5000, perplexity 4.48"]
    assert "j1 training RUNNING" in bar and "loss 1.2345" in bar and "eta 1:15" in bar and "40/100" in bar


def test_progress_view_writes_plain_lines_where_there_is_no_terminal(capsys):
    view = ProgressView()  # stderr under capsys: not a terminal
    running = jpb.Job(id="j1", kind=jpb.JOB_KIND_TRAINING, state=jpb.JOB_STATE_RUNNING,
                      progress=jpb.JobProgress(step=0, total=100))
    view.job(running)
    for step in range(10, 101, 10):
        view.step(jpb.StepEvent(step=step, loss=1.0, learning_rate=3e-4, tokens_per_s=1500, eta_s=5))
    view.job(running)  # the same state again: no new line
    view.job(jpb.Job(id="j1", kind=jpb.JOB_KIND_TRAINING, state=jpb.JOB_STATE_SUCCEEDED,
                     progress=jpb.JobProgress(step=100, total=100)))
    view.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["job j1 training RUNNING at step 0/100",
                                "step 10/100: loss 1.0000, lr 3.00e-04, 1500 tok/s, eta 0:05",
                                "step 100/100: loss 1.0000, lr 3.00e-04, 1500 tok/s, eta 0:05",
                                "job j1 training SUCCEEDED at step 100/100"]


def test_datasets_create_watch_and_train(server, services, tmp_path, capsys):
    needs(services, "ulm.v1.Files", "ulm.v1.Datasets", "ulm.v1.Jobs")
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT)
    assert cli(capsys, server, "files", "upload", str(path))[0] == 0
    rc, out, err = cli(capsys, server, "datasets", "create", "tiny", "--file", "tiny.txt", "--tokenizer", "char",
                       "--watch")
    assert rc == 0, err
    assert "SUCCEEDED" in out and "tiny" in out.splitlines()[-1]
    rc, out, _ = cli(capsys, server, "datasets", "list")
    assert rc == 0 and out.split()[0] == "tiny"
    rc, out, _ = cli(capsys, server, "datasets", "get", "tiny", "--json")
    assert json.loads(out)["tokenizer"] == "char"
    overrides = ["model=toy", "block_size=32", "batch_size=4", "max_iters=20", "warmup_iters=2", "lr_decay_iters=20",
                 "eval_interval=10", "eval_iters=2"]
    rc, out, err = cli(capsys, server, "jobs", "start-training", "--dataset", "tiny", "--model", "m1", "--recipe",
                       "shakespeare-char", *(x for o in overrides for x in ("--set", o)), "--seed", "1", "--watch")
    assert rc == 0, err
    assert out.splitlines()[-1].endswith("m1") and "training" in out and "/20" in err
    rc, out, _ = cli(capsys, server, "jobs", "list", "--kind", "training", "--state", "succeeded")
    assert rc == 0 and len(out.splitlines()) == 1 and "m1" in out
    job_id = out.split()[0]
    rc, out, _ = cli(capsys, server, "jobs", "watch", job_id)  # a job that has ended: its state, at once
    assert rc == 0 and "SUCCEEDED" in out
    rc, out, _ = cli(capsys, server, "jobs", "get", job_id)
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert (fields["id"], fields["kind"], fields["state"]) == (job_id, "TRAINING", "SUCCEEDED")
    assert json.loads(fields["spec_json"])  # the request it was started with, on one line
    rc, out, _ = cli(capsys, server, "jobs", "get", job_id, "--json")
    assert json.loads(out)["progress"]["step"] in (20, "20")
    rc, out, err = cli(capsys, server, "jobs", "start-training", "--dataset", "missing", "--model", "m2",
                       "--recipe", "shakespeare-char", "--watch")
    assert rc == 1 and "missing" in err, err  # refused at once, or a job that FAILED: the dataset named either way
