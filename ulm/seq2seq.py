"""The encoder-decoder Transformer ("Attention Is All You Need"): Encoder, Decoder and their layers.

Shapes: B batch, S source length, T target length, C = n_embd, V target vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ulm.config import Seq2SeqConfig
from ulm.model import (
    Embedder,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    block_stack,
    dropout_layer,
    final_norm,
    init_weights,
)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder's output, feed-forward."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, activation: str = "relu", bias: bool = True,
                 dropout: float = 0.0, norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn, self.cross_attn = (MultiHeadAttention(d_model, n_head, bias, dropout) for _ in range(2))
        self.mlp = FeedForward(d_model, d_ff, activation, bias, dropout)
        self.ln_1, self.ln_2, self.ln_3 = (LayerNorm(d_model, bias, eps) for _ in range(3))  # one per sublayer
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, tgt_padding_mask: torch.Tensor | None = None,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        def sa(h):
            return self.dropout(self.self_attn(h, key_padding_mask=tgt_padding_mask, causal=True))

        def ca(h):
            return self.dropout(self.cross_attn(h, memory, key_padding_mask=memory_padding_mask))

        def ff(h):
            return self.dropout(self.mlp(h))

        if self.norm_first:
            x = x + sa(self.ln_1(x))
            x = x + ca(self.ln_2(x))
            return x + ff(self.ln_3(x))
        x = self.ln_1(x + sa(x))
        x = self.ln_2(x + ca(x))
        return self.ln_3(x + ff(x))



class Encoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed = Embedder(cfg.src_vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.layers = block_stack(cfg, cfg.n_encoder_layer)
        self.ln_f = final_norm(cfg)

    def forward(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(src.shape[1], device=src.device)
        x = self.embed(src, pos)
        for layer in self.layers:
            x = layer(x, key_padding_mask=src_padding_mask)
        return self.ln_f(x)  # (B, S, C)


class Decoder(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.embed = Embedder(cfg.tgt_vocab_size, cfg.n_embd, cfg.block_size, cfg.pos_encoding, cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.n_embd, cfg.n_head, cfg.d_ff, activation=cfg.activation, bias=cfg.bias,
                         dropout=cfg.dropout, norm_first=cfg.norm_first, eps=cfg.layer_norm_eps)
            for _ in range(cfg.n_decoder_layer)
        )
        self.ln_f = final_norm(cfg)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_padding_mask: torch.Tensor | None = None,
                memory_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(tgt.shape[1], device=tgt.device)
        x = self.embed(tgt, pos)
        for layer in self.layers:
            x = layer(x, memory, tgt_padding_mask, memory_padding_mask)
        return self.ln_f(x)  # (B, T, C)


class Transformer(nn.Module):
    """Encoder-decoder for sequence-to-sequence tasks."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.tgt_vocab_size, bias=False)
        self.apply(init_weights)
        if cfg.tie_weights:
            self.lm_head.weight = self.decoder.embed.tok.weight

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_padding_mask: torch.Tensor | None = None,
                tgt_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encoder(src, src_padding_mask)
        h = self.decoder(tgt, memory, tgt_padding_mask, src_padding_mask)
        return self.lm_head(h)  # (B, T, V)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, max_len: int,
                      src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: returns (B, max_len) generated ids, BOS excluded.

        Not ulm.generate.decode_loop: the decoder has no KV cache (each step runs it over the whole prefix, with
        cross-attention over the encoder's memory), so there is no prefill/decode stepper to drive."""
        memory = self.encoder(src, src_padding_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            h = self.decoder(out, memory, None, src_padding_mask)
            nxt = self.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out[:, 1:]
