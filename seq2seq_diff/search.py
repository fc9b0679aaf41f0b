"""Greedy, beam and sampling search on the decoder's KV cache.

Shapes: B sentences, K beam size, n sentences still searching, S source length, t pieces decoded
so far, V vocabulary.

Conventions shared by every search here:
    * ``src`` = pieces + [eos], right-padded; ``src_mask`` True = real token (docs/CONTRACTS.md).
    * Results are target pieces without bos/eos.
    * Maximum length, per sentence: ``floor(max_len_a * S_i + max_len_b)`` pieces, where ``S_i``
      counts the real source tokens (eos included). At that length eos is forced, so nothing runs
      away; a cap below ``min_len`` wins over ``min_len``.
    * ``min_len``: eos is banned until that many pieces exist. pad and bos are never produced.
    * The prefix is never recomputed: each step feeds one new token per row into
      ``model.decode(..., cache=cache)`` (beam search: ``model.best_extensions``). Sentences
      that are done leave the batch (``cache.reorder``), so a long late sentence does not pay
      for finished short ones.
    * Everything runs under ``torch.inference_mode()`` with the model in eval mode (restored
      afterwards), so dropout never makes a search random.

Length penalty (beam search): GNMT's lp(L) = ((5 + L) / 6) ** alpha (Wu et al. 2016, eq. 14),
score = sum of log-probs / lp(L), where L counts the hypothesis pieces plus its eos. alpha = 0
ranks by plain summed log-probability; larger alpha favours longer hypotheses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from seq2seq_diff.model import DecoderCache, Seq2SeqTransformer
from seq2seq_diff.selection import (
    NEG_INF,
    beam_candidates,
    best_tokens,
    constrain,
    eos_rules,
)


class Hypothesis(NamedTuple):
    """A finished beam hypothesis: target pieces (no bos/eos) and its length-penalised score."""

    tokens: list[int]
    score: float


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the duration; the caller's training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def length_penalty_factor(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT length penalty lp(L) = ((5 + L) / 6) ** alpha; L = pieces + eos."""
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_mask: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """Per-sentence piece cap (B,): floor(a * real source tokens + b), at least 0."""
    src_len = src_mask.sum(dim=1).to(torch.float64)
    return (max_len_a * src_len + max_len_b).floor().clamp_min(0).long()


def _next_logits(model: Seq2SeqTransformer, step: Tensor, src_mask: Tensor, cache) -> Tensor:
    """Next-token logits (rows, V) after ``step`` (rows, 1), at least float32; ``cache`` holds
    the cross-attention keys and values (``model.start_cache``)."""
    logits = model.decode(step, None, src_mask, cache=cache)[:, -1]  # (rows, V)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _decode_loop(
    model: Seq2SeqTransformer,
    src: Tensor,
    src_mask: Tensor,
    pick: Callable[[Tensor], Tensor],
    max_len_a: float,
    max_len_b: int,
    min_len: int,
) -> list[list[int]]:
    """One hypothesis per sentence, choosing each next token with ``pick(logits) -> (rows,)``.

    ``pick`` gets constrained logits, not log-probs: argmax and softmax(logits / T) are the same
    either way, and skipping the log-softmax saves a pass over (rows, V).
    """
    config = model.config
    batch = src.shape[0]
    if batch == 0:
        return []
    row_max_len = max_lengths(src_mask, max_len_a, max_len_b)
    limit = int(row_max_len.max()) if batch else 0
    out = torch.full((batch, limit + 1), config.pad_id, dtype=torch.long, device=src.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=src.device)
    rows = torch.arange(batch, device=src.device)  # original sentence of each active row
    step = torch.full((batch, 1), config.bos_id, dtype=torch.long, device=src.device)
    cache = model.start_cache(src, src_mask)
    t = 0
    while rows.numel():
        logits = constrain(_next_logits(model, step, src_mask, cache),
                           *eos_rules(t, row_max_len, min_len), config)
        token = pick(logits)  # (rows,)
        out[rows, t] = token
        is_eos = token == config.eos_id
        lengths[rows] = torch.where(is_eos, t, t + 1)
        t += 1
        # A row at its cap next step could only get a forced eos (``constrain``): it ends now,
        # without a decoder step whose logits nothing would read.
        finished = is_eos | (row_max_len <= t)
        if bool(finished.any()):
            # Dropping finished rows (a copy of each cache tensor) beats masking them: on a
            # batch with mixed lengths it saves the decoder work of every finished row.
            keep = (~finished).nonzero().squeeze(1)
            cache.reorder(keep)
            src_mask = src_mask.index_select(0, keep)
            rows, row_max_len, token = rows[keep], row_max_len[keep], token[keep]
        step = token[:, None]
    return [out[i, : lengths[i]].tolist() for i in range(batch)]


def greedy_search(
    model: Seq2SeqTransformer,
    src: Tensor,
    src_mask: Tensor,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
) -> list[list[int]]:
    """Greedy decoding on the KV cache.

    Args:
        model: the translation model (put in eval mode for the call).
        src: (B, S) source ids, pieces + [eos], right-padded.
        src_mask: (B, S) bool, True = real token.
        max_len_a: length cap slope, per real source token.
        max_len_b: length cap intercept, in pieces.
        min_len: eos is banned before this many pieces.

    Returns:
        For each sentence, its target pieces without bos/eos.
    """
    with _eval_mode(model):
        return _decode_loop(model, src, src_mask, best_tokens, max_len_a,
                            max_len_b, min_len)


def sample(
    model: Seq2SeqTransformer,
    src: Tensor,
    src_mask: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Ancestral sampling (for back-translation), optionally restricted to top-k / nucleus top-p.

    Args:
        model: the translation model.
        src: (B, S) source ids; src_mask: (B, S) bool, True = real token.
        temperature: divides the logits; must be > 0.
        top_k: sample among the k most probable tokens; 0 = no restriction.
        top_p: sample from the smallest set of tokens whose probability reaches p; 1 = all.
        max_len_a, max_len_b, min_len: as in ``greedy_search``.
        generator: a ``torch.Generator`` for reproducible draws.

    Returns:
        For each sentence, its sampled target pieces without bos/eos.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy_search for 0)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def pick(logits: Tensor) -> Tensor:
        scores = logits / temperature
        if 0 < top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, NEG_INF)
        if top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
            probs = sorted_scores.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (the first is kept).
            drop = probs.cumsum(dim=-1) - probs >= top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, NEG_INF))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    with _eval_mode(model):
        return _decode_loop(model, src, src_mask, pick, max_len_a, max_len_b, min_len)


def beam_search(
    model: Seq2SeqTransformer,
    src: Tensor,
    src_mask: Tensor,
    beam_size: int = 5,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 0,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search on the KV cache, all sentences of the batch at once.

    Each step scores the K open hypotheses of every sentence, takes the top 2K of its K·V
    extensions (ties broken by lower beam, then lower token id), finishes the eos candidates
    ranked in the top K and continues with the best K others (as fairseq does). A sentence is
    done once it has K finished hypotheses and no open one can beat the worst of them even at the
    most favourable length; done sentences leave the batch. Deterministic: no randomness.

    With ``length_penalty=0``, beam size 1 is exactly greedy search. With alpha > 0 it finishes
    greedy's hypothesis at the same step but goes on while a longer open one could still win after
    the penalty, so its result scores at least as well as greedy's.

    Args:
        model: the translation model (put in eval mode for the call).
        src: (B, S) source ids, pieces + [eos], right-padded.
        src_mask: (B, S) bool, True = real token.
        beam_size: K, open hypotheses per sentence.
        length_penalty: GNMT alpha; score = summed log-probs / ((5 + L) / 6) ** alpha.
        max_len_a: length cap slope, per real source token.
        max_len_b: length cap intercept, in pieces.
        min_len: eos is banned before this many pieces.
        n_best: hypotheses returned per sentence (<= beam_size), best first.

    Returns:
        For each sentence, ``n_best`` ``Hypothesis(tokens, score)`` sorted by score, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    with _eval_mode(model):
        return _beam_search(model, src, src_mask, beam_size, length_penalty, max_len_a,
                            max_len_b, min_len, n_best)


def _widen(cache: DecoderCache, src_mask: Tensor, row_max_len: Tensor,
           k: int) -> tuple[Tensor, Tensor]:
    """One row per sentence -> K: source mask and caps repeated, the cross-attention keys (in
    ``cache``) shared by the K rows of their source, not copied."""
    rows = torch.arange(src_mask.shape[0], device=src_mask.device).repeat_interleave(k)
    cache.share_cross(k)
    return src_mask.index_select(0, rows), row_max_len.index_select(0, rows)


def _beam_search(
    model: Seq2SeqTransformer,
    src: Tensor,
    src_mask: Tensor,
    k: int,
    alpha: float,
    max_len_a: float,
    max_len_b: int,
    min_len: int,
    n_best: int,
) -> list[list[Hypothesis]]:
    config = model.config
    device = src.device
    batch = src.shape[0]
    if batch == 0:
        return []
    vocab = config.vocab_size
    sent_max_len = max_lengths(src_mask, max_len_a, max_len_b)  # (B,)
    limit = int(sent_max_len.max())

    num_candidates = beam_candidates(k, config)
    # The first step has one live beam per sentence: it runs on B rows (as CTranslate2 does),
    # and the rows and the source mask grow to B·K after it. Each source's cross-attention keys
    # are projected once and stay one row: its K beams share them (``share_cross``) and attend
    # to them in one product, and only dropping done sentences moves them.
    width = 1 if vocab >= num_candidates else k  # rows per sentence in this step
    cache = model.start_cache(src, src_mask)  # cross keys: B rows
    sents = torch.arange(batch, device=device)  # (n,) original sentence of each active one
    row_max_len = sent_max_len
    if width > 1:
        src_mask, row_max_len = _widen(cache, src_mask, row_max_len, k)
    # Scores in the log-prob dtype: float32 (for float32/16 models) or float64 (float64 models).
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    scores = torch.full((batch, k), NEG_INF, device=device, dtype=dtype)
    scores[:, 0] = 0.0  # one live beam at first, so the K beams do not start as copies
    tokens = torch.full((batch * width, 1), config.bos_id, dtype=torch.long, device=device)
    fin_scores = torch.full((batch, k), NEG_INF, device=device, dtype=dtype)
    fin_tokens = torch.full((batch, k, limit + 1), config.pad_id, dtype=torch.long, device=device)
    fin_lengths = torch.zeros((batch, k), dtype=torch.long, device=device)

    t = 0  # pieces in every open hypothesis
    while sents.numel():
        n = sents.numel()
        top_scores, top_index = model.best_extensions(  # (n, 2K)
            tokens[:, -1:], src_mask, cache, scores[:, :width].reshape(n * width),
            *eos_rules(t, row_max_len, min_len), width, num_candidates)
        beam = top_index // vocab  # (n, 2K) beam (row of its sentence) each candidate extends
        token = top_index % vocab
        is_eos = token == config.eos_id
        alive = top_scores > NEG_INF

        # Finish eos candidates ranked in the top K; merge them with earlier finished ones.
        finish = is_eos & alive
        finish[:, k:] = False
        if bool(finish.any()):
            normalized = top_scores / length_penalty_factor(t + 1.0, alpha)
            new_scores = normalized.masked_fill(~finish, NEG_INF)  # (n, 2K)
            prefix = tokens.view(n, width, t + 1)[:, :, 1:]  # (n, width, t) pieces, no bos
            new_tokens = torch.full((n, num_candidates, limit + 1), config.pad_id,
                                    dtype=torch.long, device=device)
            new_tokens[:, :, :t] = prefix.gather(1, beam[:, :, None].expand(n, -1, t))
            all_scores = torch.cat([fin_scores[sents], new_scores], dim=1)  # (n, 3K)
            all_tokens = torch.cat([fin_tokens[sents], new_tokens], dim=1)
            all_lengths = torch.cat([fin_lengths[sents], torch.full_like(new_scores, t,
                                                                         dtype=torch.long)], 1)
            # Stable: among equal scores, earlier finished hypotheses stay ahead.
            best = all_scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # (n, K)
            fin_scores[sents] = all_scores.gather(1, best)
            fin_tokens[sents] = all_tokens.gather(1, best[:, :, None].expand(-1, -1, limit + 1))
            fin_lengths[sents] = all_lengths.gather(1, best)

        # Continue with the best K non-eos candidates (there are >= K: at most K are eos).
        open_order = (is_eos | ~alive).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
        scores = top_scores.gather(1, open_order).masked_fill(
            is_eos.gather(1, open_order), NEG_INF)  # (n, K)
        beam = beam.gather(1, open_order)
        token = token.gather(1, open_order)
        t += 1

        # Done: K finished and the best open hypothesis cannot beat the worst finished one,
        # even at its most favourable finishing length in [t + 1, cap + 1].
        cap = sent_max_len[sents].to(dtype)
        best_lp = torch.maximum(length_penalty_factor(torch.full_like(cap, t + 1.0), alpha),
                                length_penalty_factor(cap + 1.0, alpha))
        bound = scores.max(dim=1).values / best_lp
        done = fin_scores[sents, k - 1] >= bound  # (n,)

        flat = (torch.arange(n, device=device)[:, None] * width + beam)  # (n, K) rows to keep
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            flat, scores, token = flat[keep], scores[keep], token[keep]
            sents = sents[keep]
            keep_rows = (keep[:, None] * width + torch.arange(width, device=device)).view(-1)
            src_mask = src_mask.index_select(0, keep_rows)
            row_max_len = row_max_len.index_select(0, keep_rows)
            cache.reorder_cross(keep_rows)  # beams share their source: only dropping moves it
        if width < k:  # after the first step: K rows per sentence
            src_mask, row_max_len = _widen(cache, src_mask, row_max_len, k)
            width = k
        flat = flat.view(-1)
        cache.reorder_self(flat)  # one reorder per step: beam reordering and dropping at once
        tokens = torch.cat([tokens.index_select(0, flat), token.view(-1, 1)], dim=1)

    results = []
    for i in range(batch):
        hyps = []
        for j in range(n_best):
            score = float(fin_scores[i, j])
            if math.isinf(score):
                break
            hyps.append(Hypothesis(fin_tokens[i, j, : fin_lengths[i, j]].tolist(), score))
        results.append(hyps)
    return results
