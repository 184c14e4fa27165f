"""bench.http_vs_grpc: a smoke run on the toy checkpoint (a started server, every path, the table, the ratios, the
result files); no timing assertions."""
from __future__ import annotations

import json

from bench import http_vs_grpc


def test_bench_http_vs_grpc_measures_every_path_of_one_server(toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "http_vs_grpc.json"
    assert http_vs_grpc.main(["--checkpoint", str(toy_checkpoint), "--streams", "1,2", "--max-new-tokens", "4",
                              "--rounds", "1", "--threads", "1", "--out", str(out), "--cache", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for label in http_vs_grpc.LABELS.values():  # a table row per path and level
        for streams in (1, 2):
            assert any(line.split()[:len(label.split()) + 1] == [*label.split(), str(streams)]
                       for line in printed.splitlines()), (label, streams, printed)
    assert "SSE /ulm/v1/generate over gRPC at 2 stream(s): cost" in printed
    res = json.loads(out.read_text())
    assert set(res["levels"]) == {"grpc", "sse", "openai"}
    for path, levels in res["levels"].items():
        assert [lv["streams"] for lv in levels] == [1, 2]
        for lv in levels:
            assert lv["errors"] == {}, (path, lv)
            assert lv["tokens"] == 4 * lv["streams"]  # every stream's every token counted, OpenAI's by its usage
            assert lv["aggregate_tokens_per_s"] > 0 and lv["itl_ms"]["p99"] >= lv["itl_ms"]["p50"] >= 0
    assert {(r["path"], r["streams"]) for r in res["ratios"]} == {(p, c) for p in ("sse", "openai") for c in (1, 2)}
    assert out.with_suffix(".png").stat().st_size > 0
