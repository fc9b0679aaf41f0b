"""Differential and standard attention against direct float64 transcriptions of their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq_diff.attention import (
    KVCache,
    MultiheadAttention,
    MultiheadDiffAttention,
    RotaryEmbedding,
    causal_mask,
    lambda_init_fn,
)

E, H = 32, 2  # d_model, differential heads -> head_dim 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Interleaved rotary embedding written out pair by pair: x (B, L, heads, D)."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for pos in range(x.shape[1]):
        for i in range(d // 2):
            theta = pos / base ** (2 * i / d)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, pos, :, 2 * i], x[:, pos, :, 2 * i + 1]
            out[:, pos, :, 2 * i] = a * c - b * s
            out[:, pos, :, 2 * i + 1] = a * s + b * c
    return out


def reference_diff(attn, x, source, mask, use_rotary):
    """The paper's formula with einsum, float64: x (B,T,E), source (B,S,E), mask (B,T,S)."""
    b, t, _ = x.shape
    s = source.shape[1]
    d, nh = attn.head_dim, attn.num_heads
    q = (x @ attn.q_proj.weight.T).view(b, t, 2 * nh, d)
    k = (source @ attn.k_proj.weight.T).view(b, s, 2 * nh, d)
    v = (source @ attn.v_proj.weight.T).view(b, s, nh, 2 * d)
    if use_rotary:
        q, k = rotate(q), rotate(k)
    lam = (
        torch.exp((attn.lambda_q1 * attn.lambda_k1).sum())
        - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum())
        + attn.lambda_init
    )
    heads = []
    for h in range(nh):
        q1, q2 = q[:, :, 2 * h], q[:, :, 2 * h + 1]
        k1, k2 = k[:, :, 2 * h], k[:, :, 2 * h + 1]
        s1 = torch.einsum("btd,bsd->bts", q1, k1) / math.sqrt(d)
        s2 = torch.einsum("btd,bsd->bts", q2, k2) / math.sqrt(d)
        s1 = s1.masked_fill(~mask, float("-inf"))
        s2 = s2.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s1, -1) - lam * torch.softmax(s2, -1)
        o = torch.einsum("bts,bsd->btd", a, v[:, :, h])
        o = o / torch.sqrt((o**2).mean(-1, keepdim=True) + 1e-5) * attn.subln.weight
        heads.append(o * (1 - attn.lambda_init))
    return torch.cat(heads, -1) @ attn.out_proj.weight.T


def reference_standard(attn, x, source, mask, use_rotary):
    b, t, _ = x.shape
    s = source.shape[1]
    d, nh = attn.head_dim, 2 * attn.num_heads
    q = (x @ attn.q_proj.weight.T).view(b, t, nh, d)
    k = (source @ attn.k_proj.weight.T).view(b, s, nh, d)
    v = (source @ attn.v_proj.weight.T).view(b, s, nh, d)
    if use_rotary:
        q, k = rotate(q), rotate(k)
    heads = []
    for h in range(nh):
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h]) / math.sqrt(d)
        a = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        heads.append(torch.einsum("bts,bsd->btd", a, v[:, :, h]))
    return torch.cat(heads, -1) @ attn.out_proj.weight.T


def make(kind, layer_index=0):
    """kind: "diff" / "standard" (explicit maps on the CPU) or "*-fused" (SDPA kernels)."""
    cls = MultiheadAttention if kind.startswith("standard") else MultiheadDiffAttention
    attn = cls(E, H, layer_index).double().eval()
    if kind.endswith("-fused"):
        attn.max_explicit_scores = 0
    if not kind.startswith("standard"):  # random λ far from init, a non-trivial subln weight
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            getattr(attn, name).data.normal_(0, 0.5)
        attn.subln.weight.data.uniform_(0.5, 1.5)
    return attn


REFERENCES = {"diff": reference_diff, "diff-fused": reference_diff, "standard": reference_standard,
              "standard-fused": reference_standard}
KINDS = list(REFERENCES)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_index", [0, 1, 5])
def test_bidirectional_self_attention_with_padding(kind, layer_index):
    attn = make(kind, layer_index)
    x = torch.randn(3, 7, E, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 1])
    key_mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, S)
    out = attn(x, mask=key_mask[:, None, None, :], rotary=RotaryEmbedding(attn.head_dim))
    ref = REFERENCES[kind](attn, x, x, key_mask[:, None, :].expand(3, 7, 7), True)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_index", [0, 3])
def test_causal_self_attention(kind, layer_index):
    attn = make(kind, layer_index)
    x = torch.randn(2, 9, E, dtype=torch.float64)
    out = attn(x, causal=True, rotary=RotaryEmbedding(attn.head_dim))
    ref = REFERENCES[kind](attn, x, x, causal_mask(9, 9).expand(2, 9, 9), True)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_with_source_padding(kind):
    attn = make(kind, 2)
    x = torch.randn(3, 5, E, dtype=torch.float64)
    memory = torch.randn(3, 11, E, dtype=torch.float64)
    key_mask = torch.arange(11)[None, :] < torch.tensor([11, 6, 2])[:, None]
    out = attn(x, source=memory, mask=key_mask[:, None, None, :])
    ref = REFERENCES[kind](attn, x, memory, key_mask[:, None, :].expand(3, 5, 11), False)
    assert rel_err(out, ref) < 1e-10


def test_rotary_is_refused_in_cross_attention():
    attn = make("diff")
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(1, 2, E), source=torch.randn(1, 3, E), rotary=RotaryEmbedding(8))


@pytest.mark.parametrize("kind", KINDS)
def test_cached_causal_self_attention_equals_full(kind):
    attn = make(kind, 1)
    rotary = RotaryEmbedding(attn.head_dim)
    x = torch.randn(2, 8, E, dtype=torch.float64)
    full = attn(x, causal=True, rotary=rotary)
    cache = KVCache()
    parts = [attn(x[:, :3], causal=True, rotary=rotary, cache=cache)]  # a 3-token prefix ...
    parts += [attn(x[:, i : i + 1], causal=True, rotary=rotary, cache=cache) for i in range(3, 6)]
    parts.append(attn(x[:, 6:], causal=True, rotary=rotary, cache=cache))  # ... and a 2-token step
    assert len(cache) == 8
    assert rel_err(torch.cat(parts, 1), full) < 1e-12


def test_deferred_reorder_is_applied_once_at_the_next_append_or_read():
    """Beam search reorders, then appends: one copy of the cache, the rows of two."""
    k, v = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
    new_k, new_v = torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)
    first, second = torch.tensor([3, 1, 1, 0]), torch.tensor([2, 0, 1])  # then drop a row
    for grad in (False, True):  # with autograd on, out= cannot be used: the plain path
        with torch.set_grad_enabled(grad):
            cache = KVCache()
            cache.append(k.clone().requires_grad_(grad), v.clone())
            cache.reorder(first)
            cache.reorder(second)
            assert len(cache) == 3
            got_k, got_v = cache.append(new_k, new_v)
        rows = first[second]
        assert torch.equal(got_k, torch.cat([k[rows], new_k], 2))
        assert torch.equal(got_v, torch.cat([v[rows], new_v], 2))
    cache = KVCache()
    cache.append(k, v)
    cache.reorder(first)
    assert torch.equal(cache.k, k[first]) and torch.equal(cache.v, v[first])  # read: applied
    got_k, _ = cache.append(torch.randn(4, 2, 1, 5), torch.randn(4, 2, 1, 5))
    assert torch.equal(got_k[:, :, :3], k[first])  # and not applied twice


def test_self_cache_appends_in_place_and_grows_by_doubling():
    """Appends without a reorder write into the buffers' room (no copy of the cached
    positions), a full buffer grows to twice its size, and views returned earlier keep their
    values."""
    steps = [(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)) for _ in range(40)]
    cache = KVCache()
    returned = []
    for i, (k, v) in enumerate(steps):
        before = cache.capacity and cache._k.data_ptr()
        got_k, got_v = cache.append(k, v)
        returned.append(got_k)
        assert len(cache) == i + 1 and got_k.shape[2] == i + 1
        assert torch.equal(got_k, torch.cat([s[0] for s in steps[: i + 1]], 2))
        assert torch.equal(got_v, torch.cat([s[1] for s in steps[: i + 1]], 2))
        if 0 < i < 16:  # the first buffer holds 16 positions: same storage
            assert cache._k.data_ptr() == before and cache.capacity == 16
    assert cache.capacity == 64  # full at 16: grown to 32, then to 64
    for i, k in enumerate(returned):
        assert torch.equal(k, torch.cat([s[0] for s in steps[: i + 1]], 2))


def test_self_cache_room_after_a_reorder():
    """A reorder that drops rows (finished sentences) keeps the buffers' room; one that keeps
    the number of rows (beam search, every step) copies into tight buffers. The contents are
    the rows taken either way."""
    k, v = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 5)
    cache = KVCache()
    cache.append(k, v)
    assert cache.capacity == 16
    cache.reorder(torch.tensor([2, 0]))
    got_k, _ = cache.append(torch.ones(2, 2, 1, 5), torch.ones(2, 2, 1, 5))
    assert cache.capacity == 16 and torch.equal(got_k[:, :, :3], k[[2, 0]])
    cache.reorder(torch.tensor([1, 1]))
    got_k, _ = cache.append(torch.zeros(2, 2, 1, 5), torch.zeros(2, 2, 1, 5))
    assert cache.capacity == 5 and torch.equal(got_k[:, :, :3], k[[0, 0]])
    assert got_k[:, :, 3].eq(1).all() and got_k[:, :, 4].eq(0).all()


def test_cache_kept_in_place_reads_what_a_reordered_cache_holds():
    """Kept in place, positions are never moved: reorders (beam reordering, widening, dropping
    rows) only gather the lineage, appends write row i into buffer row i, and every append and
    read gives what the copying cache gives; the buffers grow in rows and positions as needed."""
    torch.manual_seed(0)
    first = torch.randn(2, 2, 3, 5), torch.randn(2, 2, 3, 5)
    plain, kept = KVCache(), KVCache()
    for cache in (plain, kept):
        cache.append(*first)
    kept.keep_in_place(1)
    reorders = [torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([2, 0, 1, 5, 5, 3]),
                torch.tensor([1, 1, 0, 4, 3, 3]), torch.tensor([3, 5, 4])]  # widen, ..., drop
    reorders += [torch.randint(0, 3, (3,)) for _ in range(24)]  # 31 positions: room grows
    storage = capacity = None
    for index in reorders:
        for cache in (plain, kept):
            cache.reorder(index)
        new = torch.randn(len(index), 2, 1, 5), torch.randn(len(index), 2, 1, 5)
        got, want = kept.append(*new), plain.append(*new)
        assert kept._pending.shape == (len(index), len(plain))  # the lineage: a row a position
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if kept.capacity == capacity:
            assert kept._k.data_ptr() == storage  # written in place
        storage, capacity = kept._k.data_ptr(), kept.capacity
    assert kept._k.shape[0] == 6 and kept.capacity == 32  # rows of the widest step; doubled
    assert torch.equal(kept.k, plain.k) and kept._pending is None  # read: gathered once


def test_cache_kept_in_place_under_autograd_gathers_as_without():
    k = torch.randn(3, 2, 4, 5, requires_grad=True)
    cache = KVCache()
    cache.append(k, k.detach())
    cache.keep_in_place(1)
    cache.reorder(torch.tensor([2, 2, 0]))
    got_k, _ = cache.append(torch.zeros(3, 2, 1, 5), torch.zeros(3, 2, 1, 5))
    assert torch.equal(got_k[:, :, :4], k[[2, 2, 0]]) and got_k.requires_grad
    got_k.sum().backward()
    assert k.grad[2].eq(2).all() and k.grad[0].eq(1).all() and k.grad[1].eq(0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_cache_computes_keys_once(kind):
    attn = make(kind)
    memory = torch.randn(2, 6, E, dtype=torch.float64)
    x = torch.randn(2, 4, E, dtype=torch.float64)
    full = attn(x, source=memory)
    cache = KVCache(static=True)
    steps = [attn(x[:, i : i + 1], source=memory, cache=cache) for i in range(4)]
    keys = cache.k
    assert rel_err(torch.cat(steps, 1), full) < 1e-12
    attn(x[:, :1], source=memory, cache=cache)
    assert cache.k is keys  # reused, not recomputed


@pytest.mark.parametrize("kind", KINDS)
def test_shared_cross_cache_equals_repeated_keys(kind):
    """Beam search's cross cache: K query rows per source read one row of keys, not K copies;
    reordering by whole groups keeps sharing, parting a group gives rows their own copy."""
    attn = make(kind)
    memory = torch.randn(3, 6, E, dtype=torch.float64)
    mask = torch.rand(3, 1, 1, 6) > 0.3
    mask[:, ..., 0] = True
    group = 4
    x = torch.randn(3 * group, 2, E, dtype=torch.float64)
    rows = torch.arange(3).repeat_interleave(group)
    want = attn(x, source=memory[rows], mask=mask[rows])
    shared = KVCache(static=True)
    attn.fill_static_cache(shared, memory)
    shared.share(group)
    got = attn(x, source=None, mask=mask[rows], cache=shared)
    assert shared.k.shape[0] == 3 and rel_err(got, want) < 1e-12
    keep = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])  # sources 2 and 0, whole groups
    shared.reorder(keep)
    assert shared.group == group and shared.k.shape[0] == 2
    assert rel_err(attn(x[keep], mask=mask[rows][keep], cache=shared), want[keep]) < 1e-12
    parted = torch.tensor([5, 0, 1])  # rows of source 0, out of their group: copies
    shared.reorder(parted)
    assert shared.group == 1 and shared.k.shape[0] == 3
    assert rel_err(attn(x[keep][parted], mask=mask[rows][keep][parted], cache=shared),
                   want[keep][parted]) < 1e-12
    with pytest.raises(ValueError, match="static"):
        KVCache().share(2)


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_rows_give_no_nan(kind):
    attn = make(kind).float()
    x = torch.randn(2, 5, E, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    mask[0, ..., :3] = True  # row 1 is entirely padding
    out = attn(x, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_long_sequence_and_bf16_autocast_are_finite(kind):
    attn = make(kind).float()
    x = torch.randn(1, 4096, E)
    rotary = RotaryEmbedding(attn.head_dim)
    assert torch.isfinite(attn(x, causal=True, rotary=rotary)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x[:, :256], causal=True, rotary=rotary)
    ref = attn(x[:, :256], causal=True, rotary=rotary)
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 0.05


def test_lambda_init_schedule():
    assert lambda_init_fn(0) == pytest.approx(0.2)
    assert lambda_init_fn(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert lambda_init_fn(100) == pytest.approx(0.8)
    assert make("diff", 4).lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-1.2))


# --- the official module, transcribed from unilm Diff-Transformer/multihead_diffattn.py
# (its non-flash path, n_kv_heads = num_heads, no rotary embedding)


class OfficialRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x):
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * self.weight if self.weight is not None else out


class OfficialMultiheadDiffAttn(nn.Module):
    def __init__(self, embed_dim, depth, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads // 2
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            p = torch.zeros(self.head_dim, dtype=torch.float32).normal_(mean=0, std=0.1)
            setattr(self, name, nn.Parameter(p))
        self.subln = OfficialRMSNorm(2 * self.head_dim, eps=1e-5, elementwise_affine=True)

    def forward(self, x, attn_mask=None):
        bsz, tgt_len, embed_dim = x.size()
        src_len = tgt_len
        q = self.q_proj(x).view(bsz, tgt_len, 2 * self.num_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, src_len, 2 * self.num_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, src_len, self.num_heads, 2 * self.head_dim)
        offset = src_len - tgt_len
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * self.scaling
        attn_weights = torch.matmul(q, k.transpose(-1, -2))
        if attn_mask is None:
            attn_mask = torch.triu(
                torch.zeros([tgt_len, src_len]).float().fill_(float("-inf")).type_as(attn_weights),
                1 + offset,
            )
        attn_weights = torch.nan_to_num(attn_weights)
        attn_weights += attn_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).type_as(attn_weights)
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1).float()).type_as(q)
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1).float()).type_as(q)
        lambda_full = lambda_1 - lambda_2 + self.lambda_init
        attn_weights = attn_weights.view(bsz, self.num_heads, 2, tgt_len, src_len)
        attn_weights = attn_weights[:, :, 0] - lambda_full * attn_weights[:, :, 1]
        attn = torch.matmul(attn_weights, v)
        attn = self.subln(attn)
        attn = attn * (1 - self.lambda_init)
        attn = attn.transpose(1, 2).reshape(bsz, tgt_len, self.num_heads * 2 * self.head_dim)
        return self.out_proj(attn)


@pytest.mark.parametrize("depth", [0, 2])
def test_official_state_dict_loads_strictly_and_matches(depth):
    official = OfficialMultiheadDiffAttn(E, depth, H).double()
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        getattr(official, name).data.normal_(0, 0.5)
    ours = MultiheadDiffAttention(E, H, depth).double()
    ours.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(ours.state_dict(), strict=True)
    assert ours.lambda_init == official.lambda_init
    x = torch.randn(2, 6, E, dtype=torch.float64)
    # The official code casts λ to float32 (`.float()`) even in a float64 model: ~1e-8 apart.
    assert rel_err(ours(x, causal=True), official(x)) < 1e-6
    official.float()
    ours.float()
    assert rel_err(ours(x.float(), causal=True), official(x.float())) < 1e-5


def test_rotary_table_built_while_translating_serves_training():
    # The table is cached; one first built under inference mode must still work with autograd.
    rotary = RotaryEmbedding(8)
    with torch.inference_mode():
        rotary(torch.randn(1, 2, 3, 8), offset=5)
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    rotary(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rotary_rotates_each_pair_by_its_angle_in_any_dtype(dtype):
    rotary = RotaryEmbedding(4, base=100.0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = rotary(x.to(dtype), offset=7).to(torch.float64)
    theta = 100.0 ** (-torch.arange(0, 4, 2, dtype=torch.float64) / 4)  # (D/2,)
    angle = (7 + torch.arange(5, dtype=torch.float64))[:, None] * theta  # (L, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x1 * angle.cos() - x2 * angle.sin(),
                            x1 * angle.sin() + x2 * angle.cos()), dim=-1).flatten(-2)
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert rotary(x.to(dtype)).dtype == dtype


def test_lambda_is_reused_while_decoding_and_follows_every_parameter_change():
    attn = MultiheadDiffAttention(E, 2, layer_index=1)
    with torch.no_grad():
        first = attn.lambda_full()
        assert attn.lambda_full() is first  # reused without autograd
        attn.lambda_q1.add_(0.5)  # an optimizer step or load_state_dict changes it in place
        changed = attn.lambda_full()
    assert changed is not first and not torch.equal(changed, first)
    attn.load_state_dict({**attn.state_dict(), "lambda_k2": torch.zeros(attn.head_dim)})
    with torch.inference_mode():
        loaded = attn.lambda_full()
    expected = (torch.exp(attn.lambda_q1 @ attn.lambda_k1) - 1.0 + attn.lambda_init).detach()
    torch.testing.assert_close(loaded, expected)
    trained = attn.lambda_full()  # with autograd: a fresh value that carries gradients
    assert trained.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_bf16_decoding_attends_in_float32_over_a_float32_cache(kind):
    attn = make(kind, 1).float().eval()
    rotary = RotaryEmbedding(attn.head_dim)
    x = torch.randn(2, 6, E)
    source = torch.randn(2, 5, E)
    with torch.no_grad():
        full = attn(x, causal=True, rotary=rotary)
        cross_full = attn(x, source=source)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache, cross = KVCache(), KVCache(static=True)
            steps = [attn(x[:, i : i + 1], causal=True, rotary=rotary, cache=cache)
                     for i in range(6)]
            cross_steps = [attn(x[:, i : i + 1], source=source, cache=cross) for i in range(6)]
    assert cache.k.dtype == cache.v.dtype == cross.k.dtype == torch.float32
    assert rel_err(torch.cat(steps, 1).float(), full) < 2e-2  # bf16 projections only
    assert rel_err(torch.cat(cross_steps, 1).float(), cross_full) < 2e-2
