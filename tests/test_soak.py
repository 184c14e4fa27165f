"""Soak: a server's memory levels off under traffic of varied prompt lengths (bench.soak, shortened).

A prefill pass runs (prompts x padded length) rows through every Linear. oneDNN made and kept a kernel for each row
count it met (~0.5 MB resident per row count and weight shape, in its primitive cache and ideep's), so a server's
RSS grew by hundreds of MiB as prompt lengths varied. Now the packed (oneDNN) products run at most the server's batch
of rows (the row counts of decode steps, made once), larger ones MKL. The "tiny" preset's weights are large enough
for the packed products and it runs hundreds of calls in seconds; more streams than slots, and calls of varied
lengths, so that requests are admitted a few at a time with prompts of every length.
"""
from __future__ import annotations

import pytest
import torch

from bench import soak as bench_soak
from server.backends.torch_backend import MMAP_MAX, MMAP_MIN, mmap_threshold, return_large_frees
from tests.server_fixture import SubprocessServer
from ulm.checkpoint import save_checkpoint
from ulm.config import gpt_preset
from ulm.inference import InferenceLinear
from ulm.model import GPT

REQUESTS, STREAMS, SLOTS = 600, 32, 16


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("soak") / "tiny", GPT(gpt_preset("tiny")), extra={"preset": "tiny"})


@pytest.mark.parametrize("connections", ["reused", "new"])
def test_rss_levels_off_over_varied_prompt_lengths(tiny_checkpoint, connections):
    args = bench_soak.options(["--checkpoint", str(tiny_checkpoint), "--streams", str(STREAMS), "--requests",
                               str(REQUESTS), "--max-new-tokens", "2,12", "--prompt-chars", "2,160",
                               "--sample-every", "25", "--max-seconds", "90", "--timeout", "60", "--quiet"])
    server = SubprocessServer(["--checkpoint", str(tiny_checkpoint), "--threads", "2", "--max-batch", str(SLOTS)])
    try:
        run = bench_soak.soak_mode(connections, server.target, server.proc.pid, args)
    finally:
        server.close()
    m = run["rss_mib"]
    print(f"\n{connections}: RSS start {m['start']:.1f} MiB, half {m['half']:.1f}, end {m['end']:.1f}; peaks "
          f"{m['peak_first_half']:.1f} -> {m['peak_second_half']:.1f}; {run['seconds']:.0f} s")
    assert run["requests"] == REQUESTS and not run["errors"], run["errors"]
    # before the fix: ~100 MiB. The server and its model process (and their forkserver) are summed: runs of this
    # test saw 1-13 MiB of growth in that sum (most of it the model process's first touches of its heap)
    grew = max(m["end"], m["peak_second_half"]) - m["half"]
    assert grew < 20, f"RSS grew {grew:.1f} MiB over the second {REQUESTS // 2} calls ({m})"
    assert run["met"], m


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_products_of_more_rows_than_the_packed_ones_are_the_linear_product(activation):
    """Over max_rows rows the product leaves oneDNN for MKL (and the activation runs on its own): the same values."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(384, 512)
    prepared = InferenceLinear(ref, pack=True, activation=activation, max_rows=4)
    assert prepared.packed is not None and prepared.max_rows == 4
    act = torch.nn.GELU(approximate="tanh") if activation else torch.nn.Identity()
    with torch.inference_mode():
        for rows in (2, 4, 5, 37):
            x = torch.randn(1, rows, 384)
            torch.testing.assert_close(prepared(x), act(ref(x)), atol=1e-5, rtol=1e-5)


def test_large_frees_threshold_sits_above_a_decode_steps_tensors():
    assert mmap_threshold(1 << 10) == MMAP_MIN == 4 << 20
    assert mmap_threshold(6 << 20) == 16 << 20  # a batch's 6 MiB logits: twice them stay under the threshold
    assert mmap_threshold(MMAP_MAX) is None  # too large for glibc's threshold: its defaults are left alone
    assert return_large_frees(MMAP_MAX) is None
