"""Components against PyTorch's reference modules (copied weights, eval mode) and the paper's closed forms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ulm.model import Block, FeedForward, LayerNorm, MultiHeadAttention, SinusoidalPositionalEncoding, sinusoidal_table
from ulm.seq2seq import DecoderLayer

pytestmark = pytest.mark.usefixtures("single_thread")

B, T, S, C, NH, FF = 3, 7, 5, 32, 4, 64
TOL = 1e-5

# PyTorch module names -> ours
MHA_NAMES = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias",
             "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"}
FF_NAMES = {"linear1.weight": "mlp.fc.weight", "linear1.bias": "mlp.fc.bias",
            "linear2.weight": "mlp.proj.weight", "linear2.bias": "mlp.proj.bias"}
ENCODER_NAMES = {
    **{f"self_attn.{k}": f"attn.{v}" for k, v in MHA_NAMES.items()}, **FF_NAMES,
    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias",
}
DECODER_NAMES = {
    **{f"self_attn.{k}": f"self_attn.{v}" for k, v in MHA_NAMES.items()},
    **{f"multihead_attn.{k}": f"cross_attn.{v}" for k, v in MHA_NAMES.items()}, **FF_NAMES,
    **{f"norm{i}.{p}": f"ln_{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")},
}


def randomized(module: nn.Module) -> nn.Module:
    """Perturb every parameter (LayerNorm's ones/zeros too) so that a missed copy shows; eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


def copy_weights(ref: nn.Module, ours: nn.Module, names: dict[str, str]) -> None:
    ref_state = ref.state_dict()
    assert set(ref_state) == set(names), "the name map must cover every reference parameter"
    ours.load_state_dict({names[k]: v for k, v in ref_state.items()}, strict=True)
    ours.eval()


def padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    """(B, total) True at padding (nn.MultiheadAttention's convention)."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).detach().abs().max())


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def make_mha() -> tuple[nn.MultiheadAttention, MultiHeadAttention]:
    ref = randomized(nn.MultiheadAttention(C, NH, batch_first=True))
    ours = MultiHeadAttention(C, NH)
    copy_weights(ref, ours, MHA_NAMES)
    return ref, ours


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])  # no_grad takes PyTorch's fast path
def test_self_attention_matches_torch(grad):
    ref, ours = make_mha()
    x = torch.randn(B, T, C)
    kpm = padding_mask([T, 4, 2], T)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked, PyTorch's convention
    with torch.set_grad_enabled(grad):
        cases = {
            "plain": (ref(x, x, x, need_weights=False)[0], ours(x)),
            "padding": (ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0], ours(x, key_padding_mask=kpm)),
            "causal": (ref(x, x, x, attn_mask=causal, need_weights=False)[0], ours(x, causal=True)),
            "causal+padding": (ref(x, x, x, attn_mask=causal, key_padding_mask=kpm, need_weights=False)[0],
                               ours(x, causal=True, key_padding_mask=kpm)),
            # SDPA-style explicit mask (True = may attend), overriding the others
            "attn_mask": (ref(x, x, x, attn_mask=causal, need_weights=False)[0], ours(x, attn_mask=~causal)),
        }
    for name, (want, got) in cases.items():
        assert max_diff(got, want) <= TOL, name
    # the masks must matter, or the checks above prove little
    assert max_diff(cases["plain"][1], cases["causal"][1]) > 1e-3
    assert max_diff(cases["plain"][1], cases["padding"][1]) > 1e-3


def test_cross_attention_matches_torch():
    ref, ours = make_mha()
    x, memory = torch.randn(B, T, C), torch.randn(B, S, C)
    kpm = padding_mask([S, 3, 1], S)
    with torch.no_grad():
        assert max_diff(ours(x, memory), ref(x, memory, memory, need_weights=False)[0]) <= TOL
        want = ref(x, memory, memory, key_padding_mask=kpm, need_weights=False)[0]
        got = ours(x, memory, key_padding_mask=kpm)
    assert max_diff(got, want) <= TOL
    # padding keys are ignored: changing them changes nothing
    memory2 = memory.clone()
    memory2[kpm] = torch.randn(int(kpm.sum()), C)
    with torch.no_grad():
        assert max_diff(ours(x, memory2, key_padding_mask=kpm), got) <= TOL


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_block_matches_transformer_encoder_layer(norm_first, activation):
    ref = randomized(nn.TransformerEncoderLayer(C, NH, FF, dropout=0.1, activation=activation, batch_first=True,
                                                norm_first=norm_first))
    ours = Block(C, NH, FF, activation=activation, dropout=0.1, norm_first=norm_first)
    copy_weights(ref, ours, ENCODER_NAMES)
    x = torch.randn(B, T, C)
    kpm = padding_mask([T, 5, 3], T)
    valid = ~kpm
    got = ours(x, key_padding_mask=kpm)
    assert max_diff(got, ref(x, src_key_padding_mask=kpm)) <= TOL  # grad on: PyTorch's reference (slow) path
    with torch.no_grad():  # PyTorch's fused fast path, which may zero padded positions: compare real ones
        assert max_diff(got[valid], ref(x, src_key_padding_mask=kpm)[valid]) <= TOL
        assert max_diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_transformer_decoder_layer(norm_first, activation):
    ref = randomized(nn.TransformerDecoderLayer(C, NH, FF, dropout=0.1, activation=activation, batch_first=True,
                                                norm_first=norm_first))
    ours = DecoderLayer(C, NH, FF, activation=activation, dropout=0.1, norm_first=norm_first)
    copy_weights(ref, ours, DECODER_NAMES)
    x, memory = torch.randn(B, T, C), torch.randn(B, S, C)
    tgt_kpm, mem_kpm = padding_mask([T, 6, 2], T), padding_mask([S, 2, 4], S)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked
    with torch.no_grad():
        want = ref(x, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm,
                   tgt_is_causal=True)
        got = ours(x, memory, tgt_kpm, mem_kpm)
        assert max_diff(got, want) <= TOL
        assert max_diff(ours(x, memory), ref(x, memory, tgt_mask=causal, tgt_is_causal=True)) <= TOL


def test_sinusoidal_encoding_matches_closed_form():
    for length, d in [(50, 16), (9, 7)]:  # even and odd widths
        want = [[0.0] * d for _ in range(length)]
        for pos in range(length):
            for i in range(0, d, 2):  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
                angle = pos / 10000 ** (i / d)
                want[pos][i] = math.sin(angle)
                if i + 1 < d:
                    want[pos][i + 1] = math.cos(angle)
        table = sinusoidal_table(length, d)
        assert table.shape == (length, d) and table.dtype == torch.float32
        assert max_diff(table.double(), torch.tensor(want, dtype=torch.float64)) <= 1e-6
    pe = SinusoidalPositionalEncoding(50, 16)
    pos = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.equal(pe(pos), sinusoidal_table(50, 16)[pos])
    assert "table" not in pe.state_dict()  # fixed: nothing to save


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(bias):
    ref = randomized(nn.LayerNorm(C, eps=1e-6, bias=bias))
    ours = LayerNorm(C, bias=bias, eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, C) * 3 + 1
    assert max_diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("activation,act", [("relu", nn.ReLU()), ("gelu", nn.GELU()),
                                            ("gelu_tanh", nn.GELU(approximate="tanh"))])
def test_feed_forward_matches_sequential(activation, act):
    ref = randomized(nn.Sequential(nn.Linear(C, FF), act, nn.Linear(FF, C)))
    ours = FeedForward(C, FF, activation)
    ours.load_state_dict({"fc.weight": ref[0].weight, "fc.bias": ref[0].bias,
                          "proj.weight": ref[2].weight, "proj.bias": ref[2].bias})
    x = torch.randn(B, T, C) * 2
    assert max_diff(ours(x), ref(x)) <= TOL
