"""The encoder-decoder: typed config, tied embeddings, encoder and decoder stacks, KV cache.

Shapes: B batch, S source length, T target length, E d_model, V vocabulary.
Token conventions: ``src`` = pieces + [eos]; ``tgt_in`` = [bos] + pieces; right-padded with pad.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from seq2seq_diff.attention import ATTENTION_KINDS, KVCache, RotaryEmbedding
from seq2seq_diff.errors import ConfigError
from seq2seq_diff.layers import DecoderLayer, EncoderLayer
from seq2seq_diff.norm_dropout import Dropout, RMSNorm
from seq2seq_diff.onednn import linear, use_onednn
from seq2seq_diff.selection import best_extensions


@dataclass
class ModelConfig:
    """Architecture of a ``Seq2SeqTransformer``.

    Attributes:
        vocab_size: joint source/target SentencePiece vocabulary size.
        d_model: model width E.
        num_heads: differential heads H; the standard twin uses 2H heads, so both kinds share
            head_dim = d_model // num_heads // 2 and (almost) every parameter.
        num_encoder_layers: encoder depth.
        num_decoder_layers: decoder depth.
        ffn_dim: hidden size of the SwiGLU feed-forward (≈ 2/3 of a ReLU FFN's for equal size).
        dropout: residual, embedding and feed-forward dropout.
        attention_dropout: dropout on attention probabilities.
        attention: "diff" (differential) or "standard".
        rotary: rotary position embedding in self-attention; False uses sinusoidal absolute
            positions. Neither caps the length.
        rope_base: rotary frequency base.
        tie_embeddings: share source/target embeddings with the output projection.
        norm_eps: RMSNorm epsilon.
        pad_id: padding id (never attended to, ignored by the loss).
        unk_id: unknown-piece id.
        bos_id: beginning-of-sentence id, the first decoder input.
        eos_id: end-of-sentence id, closing source and target.
    """

    vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    ffn_dim: int = 768
    dropout: float = 0.1
    attention_dropout: float = 0.0
    attention: str = "diff"
    rotary: bool = True
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"model config: {message}")

        check(self.attention in ATTENTION_KINDS, f"attention must be one of "
              f"{sorted(ATTENTION_KINDS)}, got {self.attention!r}")
        for name in ("vocab_size", "d_model", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "ffn_dim"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, "
                  f"got {value!r}")
        check(self.d_model % (2 * self.num_heads) == 0,
              f"d_model ({self.d_model}) must be divisible by 2*num_heads ({2 * self.num_heads}): "
              "each differential head splits into two halves of head_dim")
        head_dim = self.d_model // self.num_heads // 2
        check(not self.rotary or head_dim % 2 == 0,
              f"rotary embedding needs an even head_dim, got {head_dim}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(0.0 <= self.attention_dropout < 1.0,
              f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        ids = {"pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id,
               "eos_id": self.eos_id}
        for name, value in ids.items():
            check(0 <= value < self.vocab_size, f"{name} ({value}) must be in [0, vocab_size)")
        check(len(set(ids.values())) == len(ids), f"special token ids must differ, got {ids}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"model config: unknown key(s) {unknown}; known keys: {sorted(known)}"
            )
        return cls(**values)


class DecoderCache:
    """Per-layer self- and cross-attention KV caches for incremental decoding."""

    def __init__(self, num_layers: int):
        self.self_attn = [KVCache() for _ in range(num_layers)]
        self.cross_attn = [KVCache(static=True) for _ in range(num_layers)]

    def __len__(self) -> int:
        """Number of target positions already decoded."""
        return self.length

    @property
    def length(self) -> int:
        """``len``, symbolic when traced by ``torch.export`` (``KVCache.length``)."""
        return self.self_attn[0].length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in that order, in every layer."""
        self.reorder_self(index)
        self.reorder_cross(index)

    def reorder_self(self, index: Tensor) -> None:
        """Reorder the self-attention caches only.

        Beam search reorders beams with this alone: beams of one sentence share one source, so
        their cross-attention keys and values are equal and only dropping finished sentences
        (``reorder_cross``) changes them.
        """
        for cache in self.self_attn:
            cache.reorder(index)

    def reorder_cross(self, index: Tensor) -> None:
        """Reorder the cross-attention caches only."""
        for cache in self.cross_attn:
            cache.reorder(index)

    def index_rows(self) -> Tensor | None:
        """Every self-attention cache takes its next rows by index (``KVCache.index_rows``), one
        index tensor shared by all layers: they are always reordered alike, and a compiled step
        then sees the same inputs whether the reorders gave each layer its own copy or not.
        Returns the index (None: empty)."""
        rows = self.self_attn[0].index_rows()
        for cache in self.self_attn[1:]:
            cache.index_rows(rows)
        return rows

    def keep_in_place(self, room: int) -> Tensor | None:
        """Every self-attention cache keeps its positions in place from now on, read through a
        lineage shared by all layers, with room for ``room`` more (``KVCache.keep_in_place``):
        an ahead-of-time compiled beam step then writes in place and gathers nothing but the
        lineage. Returns the lineage (None: empty)."""
        lineage = self.self_attn[0].keep_in_place(room)
        for cache in self.self_attn[1:]:
            cache.keep_in_place(room, lineage)
        return lineage

    def reserve(self, positions: int) -> None:
        """Every self-attention cache applies its pending reorder and makes room for
        ``positions`` more (``KVCache.reserve``): a compiled greedy step then writes in place."""
        for cache in self.self_attn:
            cache.reserve(positions)

    def share_cross(self, group: int) -> None:
        """Let each row of cross-attention keys serve ``group`` consecutive rows, without a copy
        (beam search: a source's K beams; ``KVCache.share``)."""
        for cache in self.cross_attn:
            cache.share(group)


def _stacked_linear(*linears: nn.Linear) -> nn.Linear:
    """One bias-free ``nn.Linear`` whose outputs are those of ``linears``, concatenated."""
    weight = torch.cat([linear.weight for linear in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                        device=weight.device, dtype=weight.dtype)
    stacked.weight.copy_(weight)
    return stacked.requires_grad_(linears[0].weight.requires_grad)


def sinusoidal_positions(length: int, dim: int, offset: int = 0, device=None) -> Tensor:
    """Fixed sinusoidal position encodings (Vaswani et al. 2017), (length, dim)."""
    position = torch.arange(offset, offset + length, dtype=torch.float32, device=device)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                     * (-math.log(10000.0) / dim))
    angles = torch.outer(position, freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer; every attention is ``config.attention`` (diff or standard)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.embed_scale = math.sqrt(c.d_model)
        self.embed_dropout = Dropout(c.dropout)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_base) if c.rotary else None
        layer_args = dict(d_model=c.d_model, num_heads=c.num_heads, ffn_dim=c.ffn_dim,
                          attention=c.attention, dropout=c.dropout,
                          attention_dropout=c.attention_dropout, norm_eps=c.norm_eps)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(layer_index=i, **layer_args) for i in range(c.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(layer_index=i, **layer_args) for i in range(c.num_decoder_layers))
        self.encoder_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.decoder_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.output_proj = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, False)
        self.onednn = False  # the tied projection through oneDNN (seq2seq_diff.onednn.use_onednn)
        self._init_weights()

    def _init_weights(self) -> None:
        # fairseq's Transformer init: N(0, E^-1/2) embeddings (scaled by √E on use), Xavier
        # projections; λ vectors and norms keep their own init.
        nn.init.normal_(self.embed.weight, mean=0.0, std=self.config.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[self.config.pad_id].zero_()
        for name, p in self.named_parameters():
            if p.dim() == 2 and not name.startswith("embed"):
                nn.init.xavier_uniform_(p)

    def _embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        x = self.embed(tokens) * self.embed_scale  # (B, L, E)
        if self.rotary is None:
            x = x + sinusoidal_positions(tokens.shape[1], x.shape[-1], offset, x.device).to(x.dtype)
        return self.embed_dropout(x)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src (B, S) ids, src_mask (B, S) True = real token -> memory (B, S, E)."""
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(src)
        for layer in self.encoder_layers:
            x = layer(x, mask, self.rotary)
        return self.encoder_norm(x)

    def new_cache(self, memory: Tensor | None = None) -> DecoderCache:
        """A cache for ``decode(..., cache=...)``, one step at a time.

        Empty, or with ``memory`` (B, S, E) its cross-attention keys and values are computed now
        and every ``decode`` call may pass ``memory=None``. Beam search then lets each source's
        row serve its K beams (``share_cross``): projected and stored once per source.
        """
        cache = DecoderCache(len(self.decoder_layers))
        if memory is not None:
            for layer, cross in zip(self.decoder_layers, cache.cross_attn, strict=True):
                layer.cross_attn.fill_static_cache(cross, memory)
        return cache

    def start_cache(self, src: Tensor, src_mask: Tensor) -> DecoderCache:
        """Encode ``src`` (B, S) and return a decoding cache holding every cross-attention's
        keys and values: what a search starts from (the memory is not needed again)."""
        return self.new_cache(self.encode(src, src_mask))

    def decode(
        self, tgt_in: Tensor, memory: Tensor | None, src_mask: Tensor,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Decoder logits (B, T, V) for ``tgt_in`` (B, T).

        Without a cache, ``tgt_in`` is the whole prefix (teacher forcing). With one, ``tgt_in``
        holds only the new positions; earlier ones come from the cache, which is extended. Once
        the cache holds the cross-attention keys and values (after its first step, or from
        ``new_cache(memory)``), ``memory`` is no longer read and may be None.
        """
        return self.project(self.decode_states(tgt_in, memory, src_mask, cache))

    def best_extensions(self, tgt_in: Tensor, src_mask: Tensor, cache: DecoderCache,
                        scores: Tensor, ban_eos: Tensor, only_eos: Tensor, width: int,
                        count: int) -> tuple[Tensor, Tensor]:
        """One beam-search step: decode ``tgt_in`` (B, 1) on the cache (which is extended) and
        return the ``count`` best extensions of each source's ``width`` rows, ranked, scored as
        ``scores`` (B,) plus log-probabilities (``selection.best_extensions``). One overridable
        call, so a compiled decoder can fuse the choice into its last product
        (``seq2seq_diff.exported``)."""
        logits = self.decode(tgt_in, None, src_mask, cache=cache)[:, -1]
        return best_extensions(logits, scores, ban_eos, only_eos, width, count, self.config)

    def decode_states(
        self, tgt_in: Tensor, memory: Tensor | None, src_mask: Tensor,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """The decoder's final states (B, T, E), before the output projection (see ``decode``)."""
        if memory is None and (cache is None or cache.cross_attn[0].k is None):
            raise ValueError("memory is needed until the cache holds the cross-attention keys")
        offset = 0 if cache is None else cache.length
        mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(tgt_in, offset)
        for i, layer in enumerate(self.decoder_layers):
            self_cache = None if cache is None else cache.self_attn[i]
            cross_cache = None if cache is None else cache.cross_attn[i]
            x = layer(x, memory, mask, self.rotary, self_cache, cross_cache)
        return self.decoder_norm(x)

    def untie_output(self) -> None:
        """Give the output projection its own copy of the embedding matrix (no-op if untied).

        Inference copies do this before changing how the projection is computed (int8, bf16,
        oneDNN-packed) so the embedding lookup keeps its float32 table.
        """
        if self.output_proj is None:
            out = nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)
            out.weight = nn.Parameter(self.embed.weight.detach().clone())
            self.output_proj = out

    def inference_copy(self) -> Seq2SeqTransformer:
        """A copy in eval mode, output projection untied and projections fused: what the int8,
        bf16 and oneDNN-packed variants start from before converting its linear layers."""
        model = use_onednn(copy.deepcopy(self).eval(), False)
        model.untie_output()
        model.fuse_projections()
        return model

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """For inference copies: one product where training has several (no-op if done).

        Every self-attention's Q, K and V projections become one ``qkv_proj`` of 3E outputs and
        every feed-forward's w1 and w3 one ``w13`` of 2F outputs, so a decoding step runs two
        matrix products per layer fewer (and int8 quantises each input once, not three times).
        The same function; the separate modules are dropped (a fused model loads no training
        checkpoint: fuse a copy).
        """
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            attn, ffn = layer.self_attn, layer.ffn
            if attn.qkv_proj is None:
                attn.qkv_proj = _stacked_linear(attn.q_proj, attn.k_proj, attn.v_proj)
                attn.q_proj = attn.k_proj = attn.v_proj = None
            if ffn.w13 is None:
                ffn.w13 = _stacked_linear(ffn.w1, ffn.w3)
                ffn.w1 = ffn.w3 = None

    def project(self, states: Tensor) -> Tensor:
        """Vocabulary logits (..., V) of decoder states (..., E)."""
        if self.output_proj is not None:  # untied, or quantised (seq2seq_diff.quantize)
            return self.output_proj(states)
        if self.onednn:
            return linear(states, self.embed.weight)
        return states @ self.embed.weight.t()

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V); padding found from ``config.pad_id``."""
        src_mask = src != self.config.pad_id
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
