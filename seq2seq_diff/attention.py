"""Differential attention (DIFF Transformer, arXiv 2410.05258) and its standard twin.

Shape legend:
    B batch, T query length, S key/value length, E d_model,
    H differential heads, D head_dim = E // H // 2 (the standard twin uses 2H heads of D).

Mask convention (one, everywhere): boolean, True = may attend, broadcastable to (B, 1, T, S), the
convention of ``F.scaled_dot_product_attention``. A causal mask over a cache is aligned
bottom-right: query t of T new positions sees the S - T cached positions and new positions <= t.

Both modules share projections, rotary embedding and KV-cache handling (``_Attention``) and differ
only in how they attend, so the A/B comparison changes exactly one thing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq_diff.norm_dropout import RMSNorm, dropout


def lambda_init_fn(layer_index: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·l), l counted from 0 within a stack (DIFF Transformer §2.1)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), interleaved pairs as in the official DIFF code.

    Pair (x1, x2) at position p rotates by p·θ_i: (x1 + i·x2)·e^{i·p·θ_i}, in eager mode as one
    complex product, a single kernel instead of the ten element-wise ops of the real form (8-27×
    faster on the CPU, the same numbers); under ``torch.compile`` in the real form, which inductor
    fuses. Computed in at least float32, so bf16 inputs are rotated by exact angles. Holds no
    parameters and no length cap: the table grows on demand, so a long document is never limited
    by a learned position table.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[torch.dtype, Tensor] = {}  # (L, D/2, 2): cos, sin per real dtype

    def _angles(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(cos, sin) of p·θ_i for positions start .. start+length-1: (L, D/2, 2), computed in
        float64 and then cast to ``dtype``."""
        t = torch.arange(start, start + length, dtype=torch.float64, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (L, D/2)
        return torch.stack((freqs.cos(), freqs.sin()), dim=-1).to(dtype)

    def _table(self, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        table = self._tables.get(dtype)
        if table is None or table.shape[0] < length or table.device != device:
            size = max(length, 2 * (0 if table is None else table.shape[0]), 256)
            # A normal tensor even when first built while translating: training may reuse it.
            with torch.inference_mode(False), torch.no_grad():
                table = self._angles(0, size, device, dtype)
            self._tables[dtype] = table
        return table

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` (B, heads, L, D) as positions ``offset .. offset+L-1``."""
        length = x.shape[-2]
        real = torch.promote_types(x.dtype, torch.float32)
        pairs = x.to(real).unflatten(-1, (-1, 2))  # (B, heads, L, D/2, 2)
        if torch.compiler.is_compiling():
            # Inductor generates no code for complex ops but fuses the real form into one kernel.
            # The angles come from the positions in the graph: reading or growing the eager
            # table would make the graph guard on it, and recompile when it changes (for a
            # training graph, 90 s on 2 CPU cores).
            cos, sin = self._angles(offset, length, x.device, real).unbind(-1)
            x1, x2 = pairs.unbind(-1)
            rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        else:
            table = self._table(offset + length, x.device, real)[offset : offset + length]
            if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
                pairs = pairs.contiguous()  # a complex view needs even strides (projections have)
            cis = torch.view_as_complex(table)  # e^{i·p·θ} (L, D/2)
            rotated = torch.view_as_real(torch.view_as_complex(pairs) * cis)
        return rotated.flatten(-2).to(x.dtype)


class KVCache:
    """Keys and values of one attention for incremental decoding.

    ``k`` is (B, 2H, L, D); ``v`` is (B, H, L, 2D) for differential and (B, 2H, L, D) for standard
    attention. Self-attention appends positions; cross-attention (``static``) computes its keys
    and values once per source and reuses them.

    A self-attention cache keeps its positions in buffers with room for more (``capacity``,
    doubled when full), and an append writes the new positions in place: no copy of the cached
    ones, which a ``torch.cat`` a step made (O(L) a step, O(L²) a sentence; BENCHMARKS.md,
    thirteenth session). It defers ``reorder`` to its next ``append``, which copies the
    reordered rows into new buffers and then writes the new positions: one copy of the cache a
    step, which beam search pays every step (into tight buffers; ``_apply_pending``). Reading
    ``k``/``v`` in between applies a pending reorder first, so readers never see stale rows.
    Under autograd, and in compiled steps that reorder (beam search), appends make a new tensor
    instead (``_take_and_append``).

    Or it keeps every position where it was written (``keep_in_place``): each row then reads its
    cached positions through its lineage, a (B', L) index of the buffer row holding each one,
    and a reorder gathers that index, a few integers a row, not the cache. Appends write row i's
    new positions into buffer row i (positions past L are in no lineage yet). An ahead-of-time
    compiled beam step reads the keys through the lineage inside its attention kernels: no copy
    of the cache a step (``seq2seq_diff.exported``).

    A cross-attention cache can serve ``group`` consecutive query rows per row of keys
    (``share``): beam search's K beams of one source read its keys once, not K copies of them.
    """

    def __init__(self, static: bool = False):
        self.static = static
        # static: the keys and values; self-attention: buffers whose first ``_length``
        # positions are cached
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._length = 0
        # rows to take, deferred until the next append: (B',) for all positions, or a lineage
        # (B', L), the buffer row of each position (``keep_in_place``)
        self._pending: Tensor | None = None
        self.group = 1  # static: query rows per row of keys and values

    @property
    def k(self) -> Tensor | None:
        self._apply_pending()
        return self._k if self.static or self._k is None else self._k[:, :, : self._length]

    @property
    def v(self) -> Tensor | None:
        self._apply_pending()
        return self._v if self.static or self._v is None else self._v[:, :, : self._length]

    @property
    def capacity(self) -> int:
        """Positions the buffers hold before the next append must grow them."""
        return 0 if self._k is None else self._k.shape[2]

    def set(self, k: Tensor, v: Tensor) -> None:
        """Replace the contents (cross-attention: the source's keys and values)."""
        self._k, self._v, self._pending, self.group = k, v, None, 1

    def share(self, group: int) -> None:
        """Static: each row of keys and values now serves ``group`` consecutive query rows (the
        K beams of a source), with no copy; row indices of ``reorder`` count query rows."""
        if not self.static:
            raise ValueError("only a static (cross-attention) cache shares its rows")
        self.group *= group

    def __len__(self) -> int:
        return self.length

    @property
    def length(self) -> int:
        """Cached positions (``len``, but a symbolic size when traced by ``torch.export``,
        where ``len`` must return a Python int)."""
        if self.static:
            return 0 if self._k is None else self._k.shape[2]
        return self._length

    def index_rows(self, rows: Tensor | None = None) -> Tensor | None:
        """Self-attention: the next ``append`` takes its rows by index even when nothing was
        reordered, so a compiled beam step sees one cache state, not two
        (``seq2seq_diff.compiled``).

        ``rows`` replaces the pending reorder (the caller knows them equal); by default the
        pending one is kept, or every row in order is taken. Returns the index (None: empty).
        Buffers with room to grow are cut to their positions first (a copy; compiled steps that
        reorder leave them so), or the graph would specialise on which of the two it reads.
        """
        if self.static or self._k is None:
            return None
        if self.capacity != self._length or self._by_lineage():
            self._apply_pending()  # may leave them tight already
        if self.capacity != self._length:
            self._k = _take(self._k, None, self._length, self._length)
            self._v = _take(self._v, None, self._length, self._length)
        if rows is not None:
            self._pending = rows
        elif self._pending is None:
            self._pending = torch.arange(self._k.shape[0], device=self._k.device)
        return self._pending

    def reserve(self, positions: int) -> None:
        """Self-attention: apply a pending reorder, and make room for ``positions`` more
        without growing the buffers (a compiled greedy step then only writes in place)."""
        self._apply_pending(positions)
        needed = self._length + positions
        if self._k is not None and needed > self.capacity:
            capacity = max(needed, 2 * self.capacity)
            self._k = _take(self._k, None, self._length, capacity)
            self._v = _take(self._v, None, self._length, capacity)

    def keep_in_place(self, room: int, lineage: Tensor | None = None) -> Tensor | None:
        """Self-attention: keep the cached positions where they are from now on and read them
        through each row's lineage (class docstring); make room for ``room`` more positions and
        for every row to write its own. ``lineage``: the one to take (the caller knows it
        equal: the layers of a decoder share theirs). Returns the lineage (None: empty)."""
        if self.static or self._k is None:
            return None
        if lineage is None:
            lineage = self._pending if self._pending is not None else torch.arange(
                self._k.shape[0], device=self._k.device)
            if lineage.dim() == 1:
                lineage = lineage[:, None].expand(-1, self._length).contiguous()
        self._pending = lineage
        rows = max(lineage.shape[0], self._k.shape[0])
        capacity = self.capacity
        if self._length + room > capacity:
            capacity = max(self._length + room, 2 * capacity, FIRST_CAPACITY)
        if rows > self._k.shape[0] or capacity > self.capacity:  # same rows, same positions
            self._k = _grown(self._k, rows, self._length, capacity)
            self._v = _grown(self._v, rows, self._length, capacity)
        return lineage

    def _by_lineage(self) -> bool:
        return self._pending is not None and self._pending.dim() == 2

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in that order: beam reordering or dropping rows."""
        if self._k is None:
            return
        if self.static:
            if self.group > 1:
                sources = _whole_groups(index, self.group)
                if sources is None:  # the rows of a group part: each row gets its own copy
                    self._k = self._k.repeat_interleave(self.group, dim=0)
                    self._v = self._v.repeat_interleave(self.group, dim=0)
                    self.group = 1
                else:
                    index = sources
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)
        else:  # composed with an earlier pending reorder: row i takes old row pending[index[i]]
            self._pending = index if self._pending is None else self._pending[index]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append T new positions (B', ., T, .) after the (reordered) cached ones; all of them."""
        length, new = self._length, k.shape[2]
        if self._by_lineage():
            if not _recorded(k, self._k):
                return self._append_in_place(k, v)
            self._apply_pending()  # (under autograd: gathered, as without a lineage)
        if self._k is None:
            self._k, self._v = _take_and_append(None, None, k), _take_and_append(None, None, v)
        elif _functional(k, self._k, self._pending):
            self._k = _take_and_append(self._k[:, :, :length], self._pending, k)
            self._v = _take_and_append(self._v[:, :, :length], self._pending, v)
            self._pending = None
        else:
            self.reserve(new)
            self._k[:, :, length : length + new] = k
            self._v[:, :, length : length + new] = v
        self._length = length + new
        return self._k[:, :, : self._length], self._v[:, :, : self._length]

    def _append_in_place(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``append`` keeping positions in place: row i's new ones go to buffer row i, and the
        positions come back gathered through the lineage (a graph fuses the gather into the
        attention that reads them)."""
        length, new = self._length, k.shape[2]
        lineage = self._pending
        if not torch.compiler.is_compiling():  # (a graph's caller makes the room beforehand)
            self.keep_in_place(new, lineage)
        own = torch.arange(lineage.shape[0], device=lineage.device)
        # rows 0..B'-1 by index, not a slice: a graph then needs no relation between B' and
        # the buffer's rows
        self._k[:, :, length : length + new].index_copy_(0, own, k)
        self._v[:, :, length : length + new].index_copy_(0, own, v)
        own = own[:, None].expand(-1, new)
        self._pending = torch.cat([lineage, own], dim=1)
        self._length = length + new
        return _through(self._k, self._pending), _through(self._v, self._pending)

    def _apply_pending(self, room: int = 0) -> None:
        """Take the pending rows now, into buffers with ``room`` more positions at least."""
        if self._pending is None:
            return
        if self.static:  # never deferred, kept for safety
            self._k = self._k.index_select(0, self._pending)
            self._v = self._v.index_select(0, self._pending)
        else:
            # A reorder that keeps the number of rows (beam search's, every step) copies into
            # tight buffers: the next step reorders again, and unused room in each row costs
            # allocation and page faults (beam 5 on 150 sentences ran 0.74-0.96x with it). One
            # that drops rows (finished sentences) keeps the room: greedy search appends next.
            capacity = self._length + room
            if self._pending.shape[0] < self._k.shape[0]:
                capacity = max(capacity, self.capacity)
            self._k = _take(self._k, self._pending, self._length, capacity)
            self._v = _take(self._v, self._pending, self._length, capacity)
        self._pending = None


def _fresh(x: Tensor) -> Tensor:
    """A copy of ``x`` in its own storage with the standard contiguous strides (also along dims
    of size 1): cached tensors then always look alike to a compiled step, which would otherwise
    recompile for a view's storage offset or strides (``seq2seq_diff.compiled``)."""
    return x.clone(memory_format=torch.contiguous_format)


# Positions a self-attention buffer holds at first: a translation's first steps then never grow it.
FIRST_CAPACITY = 16


def _tracked(*tensors: Tensor | None) -> bool:
    """Whether writing into existing tensors (``out=``) is off limits: while compiling (Dynamo
    takes no strided ``out=``) or while autograd records one of ``tensors`` (``out=`` has no
    autograd, and in-place writes would break the tensors saved for earlier steps)."""
    return torch.compiler.is_compiling() or _recorded(*tensors)


def _recorded(*tensors: Tensor | None) -> bool:
    """Whether autograd records operations on one of ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _functional(new: Tensor, cached: Tensor, rows: Tensor | None) -> bool:
    """Whether an append makes a new tensor rather than writing into the buffers: under
    autograd, and in compiled steps that reorder (inductor fuses the gather and the
    concatenation into one kernel). Compiled steps without a reorder write in place."""
    if torch.compiler.is_compiling():
        return rows is not None
    return _tracked(new, cached)


def _through(buffer: Tensor, lineage: Tensor) -> Tensor:
    """Positions (B', H, L, D) of ``buffer`` (B0, H, capacity, D): position j of row i from
    buffer row ``lineage[i, j]`` ((B', L))."""
    positions = torch.arange(lineage.shape[1], device=lineage.device)
    return buffer[lineage, :, positions].transpose(1, 2)  # (B', L, H, D) -> (B', H, L, D)


def _grown(buffer: Tensor, rows: int, length: int, capacity: int) -> Tensor:
    """A new buffer of ``rows`` rows and ``capacity`` positions whose first rows and
    ``length`` positions are ``buffer``'s, in place."""
    out = buffer.new_empty(rows, buffer.shape[1], capacity, buffer.shape[3])
    out[: buffer.shape[0], :, :length] = buffer[:, :, :length]
    return out


def _take(buffer: Tensor, rows: Tensor | None, length: int, capacity: int) -> Tensor:
    """A new buffer of ``capacity`` positions whose first ``length`` are ``buffer``'s, rows
    ``rows`` of them (None: all; a lineage (B', L): by position) in that order."""
    if rows is not None and rows.dim() == 2:
        out = buffer.new_empty(rows.shape[0], buffer.shape[1], capacity, buffer.shape[3])
        out[:, :, :length] = _through(buffer, rows)
        return out
    taken = buffer[:, :, :length]
    if _tracked(buffer):
        taken = taken if rows is None else taken.index_select(0, rows)
        if capacity == length:
            return taken
        room = taken.new_empty(taken.shape[0], taken.shape[1], capacity - length, taken.shape[3])
        return torch.cat([taken, room], dim=2)
    out = buffer.new_empty(buffer.shape[0] if rows is None else rows.shape[0], buffer.shape[1],
                           capacity, buffer.shape[3])
    if rows is None:
        out[:, :, :length] = taken
    else:
        torch.index_select(taken, 0, rows, out=out[:, :, :length])
    return out


def _whole_groups(index: Tensor, group: int) -> Tensor | None:
    """The groups that row ``index`` takes if it takes whole groups of ``group`` rows in order
    (rows g·i .. g·i+g-1 of group i), else None."""
    if index.numel() % group:
        return None
    first = index.view(-1, group)[:, :1]
    rows = first + torch.arange(group, device=index.device)
    if bool((first % group).any()) or not torch.equal(index.view(-1, group), rows):
        return None
    return first.squeeze(1) // group


def _take_and_append(cached: Tensor | None, rows: Tensor | None, new: Tensor) -> Tensor:
    """``cat([cached[rows], new], dim=2)`` (rows None: all; cached None: nothing) written once
    into a new tensor, with room to grow unless under autograd or compiled."""
    if _tracked(new, cached):  # inductor fuses the two ops
        if cached is None:
            return _fresh(new)
        return torch.cat([cached if rows is None else cached.index_select(0, rows), new], dim=2)
    length = 0 if cached is None else cached.shape[2]
    total = length + new.shape[2]
    capacity = max(total, FIRST_CAPACITY)
    out = (new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3]) if cached is None
           else _take(cached, rows, length, capacity))
    out[:, :, length:total] = new
    return out


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> Tensor:
    """(T, S) boolean causal mask aligned bottom-right (the last query sees every key)."""
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)


def _float_steps(x: Tensor) -> bool:
    """Whether cached decoding attends in float32 over a float32 cache: on a CPU under bf16
    autocast. oneDNN's bf16 batched products and bf16 copies are slower than float32's on
    one-query steps (a greedy book translation: 1.15 s in bmm against 0.32 s); the projections
    stay bf16."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class _Attention(nn.Module):
    """Projections, rotary embedding and KV cache shared by both attention kinds."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % (2 * num_heads):
            raise ValueError(
                f"d_model ({d_model}) must be divisible by 2*num_heads ({2 * num_heads})"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads // 2
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # Inference copies of self-attention (seq2seq_diff.packed) may replace the three input
        # projections by one of 3E outputs, [Q; K; V]: one product per step instead of three.
        self.qkv_proj: nn.Module | None = None
        # Analysis hook (seq2seq_diff.analysis): called as recorder(self, q, k, mask, causal)
        # with the attention's final queries, keys and mask; None in normal use.
        self.recorder: Any = None

    def _split_v(self, v: Tensor) -> Tensor:
        """(B, S, E) -> the value layout of this attention kind."""
        raise NotImplementedError

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """(B, 2H, T, D), (B, 2H, S, D), values -> (B, T, E) before ``out_proj``."""
        raise NotImplementedError

    def _explicit_probs(self, q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Attention probabilities (B, 2H, T, S) of each of the 2H heads, materialised."""
        t, d = q.shape[2], q.shape[3]
        scores = (q * d**-0.5) @ k.transpose(-1, -2)  # (B, 2H, T, S)
        if causal:
            step_mask = causal_mask(t, k.shape[2], q.device)
            mask = step_mask if mask is None else mask & step_mask
        if mask is not None:  # a finite floor: fully masked (padding) rows stay finite
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # softmax in at least float32 (bf16 scores under autocast), never below the input's dtype
        probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        if self.training and self.dropout > 0:
            probs = dropout(probs, self.dropout)
        return probs

    def _keys_values(self, source: Tensor, rotary: RotaryEmbedding | None, offset: int,
                     projected: tuple[Tensor, Tensor] | None = None):
        """Keys (B, 2H, S, D) and values of ``source``; ``projected``: its K and V projections
        (B, S, E) if already computed (by ``qkv_proj``)."""
        b, s, _ = source.shape
        k_lin, v_lin = projected or (self.k_proj(source), self.v_proj(source))
        k = k_lin.view(b, s, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            k = rotary(k, offset)  # (B, 2H, S, D)
        return k, self._split_v(v_lin)

    def fill_static_cache(self, cache: KVCache, source: Tensor,
                          rotary: RotaryEmbedding | None = None) -> None:
        """Compute the keys and values of ``source`` (B, S, E) into ``cache`` once (beam search
        then lets each source's row serve its K beams with ``cache.share``: one projection and
        one stored copy per source, not K).

        Stored contiguous, or every decoding step's products would copy the projection's views;
        in float32 when a CPU decodes under bf16 autocast (as ``forward`` attends then).
        """
        k, v = self._keys_values(source, rotary, 0)
        if _float_steps(source):
            k, v = k.float(), v.float()
        cache.set(_fresh(k), _fresh(v))

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        rotary: RotaryEmbedding | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` (B, T, E) to ``source`` (B, S, E), or to ``x`` itself if None.

        Args:
            x: queries (B, T, E).
            source: keys/values for cross-attention (B, S, E); None for self-attention.
            mask: boolean (True = may attend), broadcastable to (B, 1, T, S).
            causal: causal self-attention (aligned bottom-right over the cache).
            rotary: rotary embedding for Q and K; self-attention only.
            cache: a ``KVCache`` updated in place for incremental decoding.
        """
        b, t, _ = x.shape
        if source is not None and rotary is not None:
            raise ValueError("rotary embedding applies to self-attention only")
        offset = cache.length if cache is not None and not cache.static else 0
        projected = None
        if self.qkv_proj is not None and source is None and not (cache is not None
                                                                      and cache.static):
            q_lin, *projected = self.qkv_proj(x).split(self.d_model, dim=-1)
        else:
            q_lin = self.q_proj(x)
        q = q_lin.view(b, t, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q = rotary(q, offset)  # (B, 2H, T, D)
        float_steps = cache is not None and _float_steps(x)
        if float_steps:
            q = q.float()
        group = 1
        if cache is not None and cache.static:
            if cache.k is None:
                self.fill_static_cache(cache, x if source is None else source, rotary=rotary)
            k, v = cache.k, cache.v
            group = cache.group
            if group > 1 and (self.recorder is not None
                              or (mask is not None and mask.shape[-2] != 1)):
                k = k.repeat_interleave(group, dim=0)  # rare: materialise the shared rows
                v = v.repeat_interleave(group, dim=0)
                group = 1
            if group > 1:  # a source's query rows attend together: one product of G·T rows
                q = q.unflatten(0, (-1, group)).transpose(1, 2).flatten(2, 3)  # (B/G, 2H, G·T, D)
                if mask is not None and mask.shape[0] > 1:
                    mask = mask[::group]  # the rows of a group share their source
        else:
            k, v = self._keys_values(x if source is None else source, rotary, offset, projected)
            if float_steps:
                k, v = k.float(), v.float()
            if cache is not None:
                k, v = cache.append(k, v)  # (B, 2H, offset+T, D)
        if causal and (t == 1 or offset > 0):  # (t first: a traced offset stays unguarded)
            causal = False
            if t > 1:  # one new step sees everything cached; several need a bottom-right mask
                step_mask = causal_mask(t, k.shape[2], x.device)
                mask = step_mask if mask is None else mask & step_mask
        elif causal and mask is not None:
            causal = False
            mask = mask & causal_mask(t, k.shape[2], x.device)
        if self.recorder is not None:
            self.recorder(self, q, k, mask, causal)
        if float_steps:
            with torch.autocast("cpu", enabled=False):
                o = self._attend(q, k, v, mask, causal)
        else:
            o = self._attend(q, k, v, mask, causal)
        if group > 1:
            o = o.view(b, t, -1)  # (B/G, G·T, E) -> (B, T, E)
        return self.out_proj(o)


class MultiheadDiffAttention(_Attention):
    """Differential multi-head attention; parameter names match the official ``MultiheadDiffAttn``.

    A = softmax(Q1K1ᵀ/√D) − λ·softmax(Q2K2ᵀ/√D), O = A·V, per-head RMSNorm (``subln``), scaled by
    (1 − λ_init). Heads 2h and 2h+1 of the Q/K projections are (Q1, K1) and (Q2, K2) of head h.

    Two kernels, chosen by size: up to ``max_explicit_scores`` query×key pairs the maps are
    materialised and subtracted before A·V (cheapest in FLOPs); beyond it, fused SDPA keeps memory
    linear in length. Both compute the same function (tests check each against the formula).
    """

    # Measured crossover on 2 CPU cores (benchmarks/attention.py --max-explicit-scores): explicit
    # maps win up to T=S=64, fused SDPA from 128 on.
    max_explicit_scores: int = 100 * 100

    def __init__(self, d_model: int, num_heads: int, layer_index: int, dropout: float = 0.0):
        super().__init__(d_model, num_heads, dropout)
        self.lambda_init = lambda_init_fn(layer_index)
        d = self.head_dim
        self.lambda_q1 = nn.Parameter(torch.zeros(d, dtype=torch.float32).normal_(0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.zeros(d, dtype=torch.float32).normal_(0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.zeros(d, dtype=torch.float32).normal_(0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.zeros(d, dtype=torch.float32).normal_(0, 0.1))
        self.subln = RMSNorm(2 * d, eps=1e-5, elementwise_affine=True)
        self._lambda_cache: tuple[tuple, Tensor] | None = None  # see lambda_full

    def lambda_full(self) -> Tensor:
        """The scalar λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, in the parameters' dtype.

        The λ vectors stay float32 under autocast, so λ is never computed in bf16. Without
        autograd (decoding) the value is reused until a λ vector changes (its version counter or
        storage): eight ops per attention per decoding step saved.
        """
        params = (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if reuse:
            key = tuple((p.data_ptr(), p._version) for p in params)
            if self._lambda_cache is not None and self._lambda_cache[0] == key:
                return self._lambda_cache[1]
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2))
        lam = lambda_1 - lambda_2 + self.lambda_init
        if reuse:
            self._lambda_cache = (key, lam)
        return lam

    def _split_v(self, v: Tensor) -> Tensor:
        b, s, _ = v.shape
        return v.view(b, s, self.num_heads, 2 * self.head_dim).transpose(1, 2)  # (B, H, S, 2D)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        b, _, t, _ = q.shape
        lam = self.lambda_full()
        if t * k.shape[2] <= self.max_explicit_scores:
            o = self._attend_explicit(q, k, v, mask, causal, lam)
        else:
            o = self._attend_fused(q, k, v, mask, causal, lam)  # (B, H, T, 2D)
        o = self.subln(o) * (1.0 - self.lambda_init)
        return o.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, E)

    def _attend_explicit(self, q, k, v, mask, causal, lam):
        """Materialise both maps and subtract them before A·V: the FLOPs of standard attention.

        (A1 − λA2)·V costs one (T×S)·(S×2D) product per head, as much as standard attention's
        two (T×S)·(S×D) products; computing A1·V − λA2·V would cost twice that.
        """
        probs = self._explicit_probs(q, k, mask, causal)  # (B, 2H, T, S), >= float32
        probs = probs.unflatten(1, (self.num_heads, 2))  # (B, H, 2, T, S)
        # One fused A1 − λ·A2 in the softmax's dtype, then one cast of the single map (under bf16
        # autocast: half the cast of both maps, and no bf16 element-wise kernels).
        diff = torch.addcmul(probs[:, :, 0], probs[:, :, 1], -lam.to(probs.dtype))
        return diff.to(v.dtype) @ v  # (B, H, T, 2D)

    def _attend_fused(self, q, k, v, mask, causal, lam):
        """Fused SDPA with memory linear in length, for long sequences.

        SDPA's fused CPU/GPU kernels need equal q/k/v head dims, so Q and K are zero-padded to
        2D (their dot products are unchanged; the scale stays 1/√D), and A1·V − λA2·V is
        computed as two calls (A·V is linear in A).
        """
        b, _, t, d = q.shape
        q = F.pad(q, (0, d)).view(b, self.num_heads, 2, t, 2 * d)  # (B, H, 2, T, 2D)
        k = F.pad(k, (0, d)).view(b, self.num_heads, 2, -1, 2 * d)  # (B, H, 2, S, 2D)
        p = self.dropout if self.training else 0.0
        o1 = F.scaled_dot_product_attention(
            q[:, :, 0], k[:, :, 0], v, mask, p, is_causal=causal, scale=d**-0.5)
        o2 = F.scaled_dot_product_attention(
            q[:, :, 1], k[:, :, 1], v, mask, p, is_causal=causal, scale=d**-0.5)
        return o1 - lam.to(o1.dtype) * o2  # (B, H, T, 2D)


class MultiheadAttention(_Attention):
    """Standard multi-head attention, the baseline twin: 2H heads of D, same projections."""

    def __init__(self, d_model: int, num_heads: int, layer_index: int = 0, dropout: float = 0.0):
        super().__init__(d_model, num_heads, dropout)

    def _split_v(self, v: Tensor) -> Tensor:
        b, s, _ = v.shape
        return v.view(b, s, 2 * self.num_heads, self.head_dim).transpose(1, 2)  # (B, 2H, S, D)

    # On the CPU, small score maps are materialised as in the DIFF module: SDPA's CPU kernel is
    # slow in bf16 (the small-enro training step: 527 vs 694 ms, BENCHMARKS.md); float32 and
    # decoding are level. GPUs always take SDPA's fused kernels.
    max_explicit_scores: int = 100 * 100

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        b, _, t, _ = q.shape
        if q.device.type == "cpu" and t * k.shape[2] <= self.max_explicit_scores:
            o = self._explicit_probs(q, k, mask, causal).to(v.dtype) @ v  # (B, 2H, T, D)
        else:
            p = self.dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal)
        return o.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, E)


ATTENTION_KINDS = {"diff": MultiheadDiffAttention, "standard": MultiheadAttention}
