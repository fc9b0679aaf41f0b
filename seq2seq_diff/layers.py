"""Pre-norm encoder and decoder layers: RMSNorm, SwiGLU feed-forward, swappable attention.

Shapes: B batch, S source length, T target length, E d_model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq_diff.attention import ATTENTION_KINDS, KVCache, RotaryEmbedding
from seq2seq_diff.norm_dropout import Dropout, RMSNorm


class FeedForward(nn.Module):
    """SwiGLU feed-forward, w2(silu(w1·x) ⊙ w3·x), as in the DIFF Transformer paper."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)
        self.dropout = Dropout(dropout)
        # Inference copies (seq2seq_diff.packed) may replace w1 and w3 by one product of 2F
        # outputs, [w1; w3].
        self.w13: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(self.dropout(F.silu(gate) * up))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention and feed-forward, each as a pre-norm residual block."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        layer_index: int,
        attention: str = "diff",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        attention_cls = ATTENTION_KINDS[attention]
        self.self_attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.self_attn = attention_cls(d_model, num_heads, layer_index, attention_dropout)
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None, rotary: RotaryEmbedding | None) -> Tensor:
        """x (B, S, E); mask (B, 1, 1, S), True = real source token."""
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), mask=mask, rotary=rotary))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the memory, feed-forward; pre-norm residuals."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        layer_index: int,
        attention: str = "diff",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        attention_cls = ATTENTION_KINDS[attention]
        self.self_attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.self_attn = attention_cls(d_model, num_heads, layer_index, attention_dropout)
        self.cross_attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.cross_attn = attention_cls(d_model, num_heads, layer_index, attention_dropout)
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        rotary: RotaryEmbedding | None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, E); memory (B, S, E), None once ``cross_cache`` holds its keys and values;
        memory_mask (B, 1, 1, S), True = real source token."""
        h = self.self_attn(self.self_attn_norm(x), causal=True, rotary=rotary, cache=self_cache)
        x = x + self.dropout(h)
        h = self.cross_attn(
            self.cross_attn_norm(x), source=memory, mask=memory_mask, cache=cross_cache
        )
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
