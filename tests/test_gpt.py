"""GPT: causality, the KV cache against full forward passes, greedy generation, preset sizes."""
from __future__ import annotations

import psutil
import pytest
import torch

from ulm.config import GPTConfig, gpt_preset
from ulm.generate import SamplingParams, generate_ids
from ulm.kv_cache import KVCache
from ulm.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
CONFIGS = {
    "toy": gpt_preset("toy"),  # pre-norm, learned positions, tied, GELU-tanh
    "post_norm_sinusoidal": GPTConfig(vocab_size=61, block_size=40, n_layer=2, n_head=4, n_embd=32, activation="relu",
                                      norm_first=False, pos_encoding="sinusoidal", tie_weights=False, bias=False),
    # pre-norm with bias-free LayerNorms and Linears (the cache path's optional biases)
    "pre_norm_no_bias": GPTConfig(vocab_size=61, block_size=40, n_layer=2, n_head=2, n_embd=32, activation="relu",
                                  norm_first=True, pos_encoding="sinusoidal", tie_weights=False, bias=False),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def model(request) -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIGS[request.param]).eval()


def full_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of a cache-free causal pass over one sequence: the reference."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def rand_ids(model: GPT, n: int, generator: torch.Generator | None = None) -> list[int]:
    return torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_causality(model):
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 22):
            y = x.clone()
            y[:, t + 1:] = torch.randint(0, model.config.vocab_size, (2, 23 - t))
            changed = model(y)
            assert max_diff(changed[:, : t + 1], base[:, : t + 1]) <= 1e-6, f"position {t} saw the future"
            assert max_diff(changed[:, t + 1:], base[:, t + 1:]) > 1e-4  # later positions do see the change


@pytest.mark.parametrize("prompt_len", [1, 4, 11])
def test_kv_cache_prefill_and_steps_match_full_forward(model, prompt_len):
    torch.manual_seed(prompt_len)
    ids = rand_ids(model, prompt_len + 6)
    want = full_logits(model, ids)
    cache = KVCache.for_model(model.config, max_batch=1, max_len=len(ids))
    with torch.no_grad():
        pos = torch.arange(prompt_len)[None]
        got = model(torch.tensor([ids[:prompt_len]]), pos, cache)  # prefill, all positions
        assert max_diff(got[0], want[:prompt_len]) <= TOL
        for p in range(prompt_len, len(ids)):
            step = model(torch.tensor([[ids[p]]]), torch.tensor([[p]]), cache)
            assert max_diff(step[0, 0], want[p]) <= TOL, f"step at position {p}"


def decode_batch(model: GPT, cache: KVCache, rows: slice, seqs: list[list[int]], prompt_lens: list[int],
                 static: bool = False) -> None:
    """Padded prefill of each row's prompt, then per-row steps (GPT.decode_step's with `static`); every logit
    checked against a full pass."""
    B, T = len(seqs), max(prompt_lens)
    pad = model.config.vocab_size - 1
    idx = torch.tensor([s[:n] + [pad] * (T - n) for s, n in zip(seqs, prompt_lens)])
    lens = torch.tensor(prompt_lens)
    with torch.no_grad():
        logits = model(idx, torch.arange(T).expand(B, T), cache, rows=rows, logits_at=lens - 1)
        assert logits.shape == (B, 1, model.config.vocab_size)
        for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
            assert max_diff(logits[b, 0], full_logits(model, s[:n])[-1]) <= TOL, f"prefill row {b}"
        for i in range(len(seqs[0]) - T):  # every row advances by one token at its own position
            pos = lens + i
            tok = torch.tensor([s[p] for s, p in zip(seqs, pos.tolist())])
            if static:
                logits = model.decode_step(tok[:, None], pos[:, None], cache, rows)[:, None]
            else:
                logits = model(tok[:, None], pos[:, None], cache, rows=rows)
            for b, (s, p) in enumerate(zip(seqs, pos.tolist())):
                assert max_diff(logits[b, 0], full_logits(model, s[: p + 1])[-1]) <= TOL, f"row {b} position {p}"


def test_kv_cache_ragged_batch(model):
    torch.manual_seed(2)
    prompt_lens = [5, 1, 9]
    seqs = [rand_ids(model, 9 + 4) for _ in prompt_lens]
    decode_batch(model, KVCache.for_model(model.config, 3, max_len=16), slice(0, 3), seqs, prompt_lens)


def test_kv_cache_offset_rows_leave_other_rows_alone(model):
    torch.manual_seed(3)
    prompt_lens = [3, 7]
    seqs = [rand_ids(model, 7 + 3) for _ in prompt_lens]
    cache = KVCache.for_model(model.config, 5, max_len=12)
    decode_batch(model, cache, slice(2, 4), seqs, prompt_lens)
    for t in (cache.k, cache.v):
        assert t[:, 2:4].abs().sum() > 0
        assert t[:, :2].abs().sum() == 0 and t[:, 4:].abs().sum() == 0


def test_decode_step_attends_over_the_whole_cache_as_forward_does(model):
    """The fixed-shape step (CUDA graphs) gives a full pass's logits for ragged rows in the middle of the cache, and
    writes nothing outside its rows."""
    torch.manual_seed(4)
    prompt_lens = [4, 1, 8]
    seqs = [rand_ids(model, 8 + 5) for _ in prompt_lens]
    cache = KVCache.for_model(model.config, 5, max_len=16)
    decode_batch(model, cache, slice(1, 4), seqs, prompt_lens, static=True)
    for t in (cache.k, cache.v):
        assert t[:, 0].abs().sum() == 0 and t[:, 4].abs().sum() == 0


def test_kv_cache_takes_memory_only_where_written():
    """A server preallocates every slot's cache (2.4 GB for 32 GPT-2-small slots); untouched, it costs nothing."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = KVCache(n_layer=4, max_batch=32, n_head=8, max_len=1024, head_dim=64)  # 2 x 256 MiB
    assert cache.nbytes() == 2**29 and proc.memory_info().rss - before < 32 * 2**20
    k, v = cache.layer(3, slice(30, 32))
    k[:, :, :16] = 1.0  # writes land in the cache, and only what is written is taken
    assert float(cache.k[3, 30:32].sum()) == 2 * 8 * 16 * 64 and float(cache.v[3, 30:32].abs().sum()) == 0
    assert proc.memory_info().rss - before < 40 * 2**20


def test_kv_cache_move_row(model):
    """Three rows decode; row 1 finishes, row 2 moves into it, and rows 0-1 go on decoding as a batch."""
    torch.manual_seed(4)
    lens = [6, 3, 8]
    seqs = [rand_ids(model, 14) for _ in lens]
    cache = KVCache.for_model(model.config, 3, max_len=16)
    pad = model.config.vocab_size - 1
    with torch.no_grad():
        idx = torch.tensor([s[:n] + [pad] * (8 - n) for s, n in zip(seqs, lens)])
        model(idx, torch.arange(8).expand(3, 8), cache, rows=slice(0, 3), logits_at=torch.tensor(lens) - 1)
        cache.move_row(2, 1, lens[2])
        cache.k[:, 2], cache.v[:, 2] = float("nan"), float("nan")  # the old row must no longer be read
        live = [seqs[0], seqs[2]]
        pos = torch.tensor([lens[0], lens[2]])
        for i in range(4):
            tok = torch.tensor([s[p] for s, p in zip(live, pos.tolist())])
            logits = model(tok[:, None], pos[:, None], cache, rows=slice(0, 2))
            for b, (s, p) in enumerate(zip(live, pos.tolist())):
                assert max_diff(logits[b, 0], full_logits(model, s[: p + 1])[-1]) <= TOL, f"row {b} step {i}"
            pos = pos + 1


def test_generate_ids_greedy_matches_full_forward_argmax(model):
    torch.manual_seed(5)
    prompt = rand_ids(model, 4)
    got = generate_ids(model, prompt, 12, SamplingParams(temperature=0.0))
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert got == seq[len(prompt):]
    # stops right after EOS
    assert generate_ids(model, prompt, 12, eos_id=got[2]) == got[: got.index(got[2]) + 1]


def test_forward_rejects_lengths_beyond_context_and_cache(model):
    cfg = model.config
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))
    cache = KVCache.for_model(cfg, 1, max_len=4)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), cache)
    with pytest.raises(ValueError, match="prompt .* exceeds the context length"):
        generate_ids(model, [1] * (cfg.block_size + 1), 1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate_ids(model, [1, 2], -1)


@pytest.mark.parametrize("prompt_len", [1, 5, "context"])
def test_generation_past_the_context_slides_its_window(model, prompt_len):
    """Past the context, each token is the argmax of a cache-free pass over the window it was sampled from: the
    window starts at the prompt and, whenever a new token would not fit, restarts at the last half of it."""
    context = model.config.block_size
    n = context if prompt_len == "context" else prompt_len
    torch.manual_seed(6)
    prompt = rand_ids(model, n)
    new = 2 * context + 3
    got = generate_ids(model, prompt, new)
    seq, start, slides = list(prompt), 0, 0
    for _ in range(new):
        if len(seq) - start > context:
            start, slides = len(seq) - context // 2, slides + 1
        seq.append(int(full_logits(model, seq[start:])[-1].argmax()))
    assert got == seq[len(prompt):]
    assert slides >= 3


def expected_params(cfg: GPTConfig) -> int:
    """Closed-form count: embeddings, per-layer attention + MLP + 2 norms, final norm, untied head."""
    C, F, V, b = cfg.n_embd, cfg.d_ff, cfg.vocab_size, int(cfg.bias)
    per_layer = (3 * C * C + 3 * C * b) + (C * C + C * b) + (C * F + F * b) + (F * C + C * b) + 2 * (C + C * b)
    n = V * C + cfg.n_layer * per_layer + (C + C * b if cfg.norm_first else 0)
    n += cfg.block_size * C if cfg.pos_encoding == "learned" else 0
    return n + (0 if cfg.tie_weights else V * C)


def meta_gpt(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):  # shapes only: instant, no memory
        return GPT(cfg)


def test_preset_sizes():
    toy = GPT(gpt_preset("toy"))
    assert toy.num_params() == expected_params(toy.config)
    assert 100_000 <= toy.num_params() <= 150_000  # ~0.1M

    gpt2 = meta_gpt(gpt_preset("gpt2-small"))
    assert gpt2.num_params() == 124_439_808  # GPT-2 small with tied embeddings
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    assert gpt2.memory_bytes() == 4 * 124_439_808

    big = meta_gpt(gpt_preset("gpt-250m"))
    assert big.num_params() == expected_params(big.config)
    assert 0.95e9 <= big.memory_bytes() <= 1.1e9  # ~1 GB of fp32 weights

    for overrides in (dict(tie_weights=False), dict(pos_encoding="sinusoidal", bias=False, norm_first=False)):
        cfg = gpt_preset("gpt2-small", **overrides)
        assert meta_gpt(cfg).num_params() == expected_params(cfg), overrides
    assert meta_gpt(gpt_preset("gpt2-small", tie_weights=False)).num_params() == 124_439_808 + 50257 * 768


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="swish")
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown preset"):
        gpt_preset("gpt-9")
