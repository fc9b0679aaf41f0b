"""Choosing next tokens from a decoding step's scores, as tensor functions a graph can trace.

The constraints every search applies (``constrain``), greedy search's argmax (``best_tokens``)
and beam search's choice of extensions (``best_extensions``: the log-probabilities of the next
tokens added to their hypotheses' scores, constrained, the best per sentence ranked). They take
tensors only, with no branch on values while traced, so ``seq2seq_diff.exported`` compiles beam
search's choice into the same graph as the decoder step that feeds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def eos_rules(t: int, row_max_len: Tensor, min_len: int) -> tuple[Tensor, Tensor]:
    """Which rows (rows,) may not end now (``t`` < ``min_len``) and which must end (at their
    piece cap ``row_max_len``, which wins over ``min_len``), after ``t`` pieces."""
    only_eos = row_max_len <= t
    ban_eos = ~only_eos if t < min_len else torch.zeros_like(only_eos)
    return ban_eos, only_eos


def constrain(scores: Tensor, ban_eos: Tensor, only_eos: Tensor, config) -> Tensor:
    """Ban pad and bos; ban eos on ``ban_eos`` rows; on ``only_eos`` rows ban every token but eos
    (in place; see ``eos_rules``).

    A forced eos keeps the model's own score, so beam scores stay true sums of log-probs.

    Args:
        scores: (rows, V) logits, log-probabilities or beam candidate scores, modified in place.
        ban_eos, only_eos: (rows,) bool.
        config: the model's ``ModelConfig`` (special ids).
    """
    scores[:, config.pad_id] = NEG_INF
    scores[:, config.bos_id] = NEG_INF
    scores[:, config.eos_id].masked_fill_(ban_eos, NEG_INF)
    # (eagerly, a pass over every score only when a row is at its cap; a graph fuses it)
    if torch.compiler.is_compiling() or bool(only_eos.any()):
        not_eos = torch.arange(scores.shape[1], device=scores.device) != config.eos_id
        scores.masked_fill_(only_eos[:, None] & not_eos[None, :], NEG_INF)
    return scores


def extension_scores(logits: Tensor, scores: Tensor) -> Tensor:
    """``scores`` (rows,) plus ``log_softmax(logits)`` (rows, V), at least float32 (overwriting
    ``logits`` if they are float32 or wider)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # In place, over the logits just written: a fresh (rows, V) buffer per op is cold memory,
    # and each cost 1.4-2.2 ms a step instead of 0.1-0.6 (beam 5, 32 sentences, vocabulary 8k).
    # Row-wise log_softmax reads a row before writing it.
    return torch.log_softmax(logits, dim=-1, out=logits).add_(scores[:, None])


def beam_candidates(k: int, config) -> int:
    """Extensions beam search ranks per sentence and step: 2K (K may all end), or all."""
    return min(2 * k, k * config.vocab_size)


def banned(columns: Tensor, ban_eos: Tensor, only_eos: Tensor, config) -> Tensor:
    """``constrain``'s rules as a mask: True where token ``columns`` is banned, for rules
    ``ban_eos`` and ``only_eos`` that broadcast against ``columns``."""
    eos = columns == config.eos_id
    return ((columns == config.pad_id) | (columns == config.bos_id) | (eos & ban_eos)
            | (~eos & only_eos))


def best_extensions(logits: Tensor, scores: Tensor, ban_eos: Tensor, only_eos: Tensor,
                    width: int, count: int, config, block: int = 64) -> tuple[Tensor, Tensor]:
    """Beam search's choice in one step: the ``count`` best extensions of each sentence's
    ``width`` hypotheses (rows ``width`` at a time), by the hypothesis' score (``scores``) plus
    the token's log-probability (``logits``: (rows, V)), under ``constrain``'s rules.

    Returns their scores (n, count), best first (ties: the lower index first), and their indices
    hypothesis · V + token, within the sentence's rows (deterministic: no randomness).

    Computed two ways, each the faster where it runs (the same extensions; ties at the last
    place may trade one equal candidate for another, as in ``topk``): eagerly, every score is
    written (the log-softmax in place) and ``top_candidates`` searches them; in a compiled graph
    the scores are never written: one pass over the logits finds each row's log-sum-exp and the
    maxima of blocks of ``block`` logits, and only the best blocks are scored
    (``_extensions_by_blocks``).
    """
    vocab = logits.shape[1]
    if torch.compiler.is_compiling() and (vocab // block) * width > count:
        top_scores, top_index = _extensions_by_blocks(logits, scores, ban_eos, only_eos, width,
                                                      count, config, block)
    else:
        cand = constrain(extension_scores(logits, scores), ban_eos, only_eos, config)
        top_scores, top_index = top_candidates(cand.view(-1, width * vocab), count, block)
    return rank_stably(top_scores, top_index)


def _extensions_by_blocks(logits: Tensor, scores: Tensor, ban_eos: Tensor, only_eos: Tensor,
                          width: int, count: int, config, block: int) -> tuple[Tensor, Tensor]:
    """``best_extensions`` without writing a score per token (unranked).

    A candidate scores ``logit + offset``, with ``offset`` its row's score minus the row's
    log-sum-exp: increasing in the logit, so a block's best candidate is its largest allowed
    logit. Blocks are ranked by that (blocks holding a banned token by their allowed ones; a row
    that must end keeps only eos's block); the ``count`` best blocks of each sentence hold its
    ``count`` best candidates (``top_candidates``), and only they, with the last partial block,
    are scored and searched.
    """
    rows, vocab = logits.shape
    whole = vocab // block
    device = logits.device
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    offset = scores - torch.logsumexp(wide, dim=1)  # (rows,)
    body = logits[:, : whole * block].view(rows, whole, block)
    maxima = body.amax(dim=2).to(offset.dtype)  # (rows, whole)
    within = torch.arange(block, device=device)
    for b in sorted({c // block for c in (config.pad_id, config.bos_id, config.eos_id)}):
        if b < whole:  # (the last partial block is searched whole, below)
            allowed = body[:, b].to(offset.dtype).masked_fill(
                banned(b * block + within, ban_eos[:, None], only_eos[:, None], config), NEG_INF)
            maxima[:, b] = allowed.amax(dim=1)
    others = torch.arange(whole, device=device) != config.eos_id // block
    maxima.masked_fill_(only_eos[:, None] & others, NEG_INF)
    n = rows // width
    best = (maxima + offset[:, None]).view(n, width * whole).topk(count, dim=1).indices
    beam = (best // whole).repeat_interleave(block, dim=1)  # (n, count · block)
    columns = ((best % whole)[:, :, None] * block + within).flatten(1)
    if whole * block < vocab:  # every row's last partial block
        tail = torch.arange(whole * block, vocab, device=device)
        beam = torch.cat([beam, torch.arange(width, device=device).repeat_interleave(
            vocab - whole * block).expand(n, -1)], dim=1)
        columns = torch.cat([columns, tail.repeat(width).expand(n, -1)], dim=1)
    index = beam * vocab + columns  # (n, C) candidates, each hypothesis · V + token

    def of_beams(x: Tensor) -> Tensor:  # (gathers: no broadcasting, which would trace n = 1)
        return x.view(n, width).gather(1, beam)

    values = logits.view(n, width * vocab).gather(1, index).to(offset.dtype) + of_beams(offset)
    values = values.masked_fill(banned(columns, of_beams(ban_eos), of_beams(only_eos), config),
                                NEG_INF)
    top, j = values.topk(count, dim=1)
    return top, index.gather(1, j)


def best_tokens(scores: Tensor, block: int = 64) -> Tensor:
    """``scores.argmax(dim=1)`` for (n, M) scores, exactly (the first of equal maxima, as a NaN
    if there is one), about 9× faster on a CPU.

    ``argmax`` walks a row one element at a time (0.31 ms for 32 × 8,000 scores, a greedy step's
    vocabulary). Here one vectorised ``amax`` finds each block of ``block`` columns' maximum, the
    first block holding the row's maximum is found among those, and ``argmax`` runs over that
    block alone (0.03 ms). A last partial block is compared on its own: it wins only with a
    strictly larger score (or the first NaN), as the later columns it holds must.
    """
    n, m = scores.shape
    whole = m // block
    if whole < 2:
        return scores.argmax(dim=1)
    body = scores[:, : whole * block].unflatten(1, (whole, block))  # (n, M/block, block)
    maxima = body.amax(dim=2)  # (n, M/block)
    first = maxima.argmax(dim=1)  # (n,) the first block holding the body's maximum
    inside = body.gather(1, first[:, None, None].expand(-1, 1, block)).squeeze(1).argmax(dim=1)
    index = first * block + inside
    if whole * block < m:
        best = maxima.gather(1, first[:, None]).squeeze(1)
        tail, at = scores[:, whole * block:].max(dim=1)
        later = (tail > best) | (tail.isnan() & ~best.isnan())
        index = torch.where(later, whole * block + at, index)
    return index


def top_candidates(scores: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores`` (n, M) and their column indices, as
    ``scores.topk(k, dim=1)`` finds them (in no particular order), 2.5× faster on a CPU.

    ``topk`` over beam search's K·V candidates per sentence costs 1.8 ms a step at 32
    sentences, beam 5 and V = 8,000: it walks every element with its index. Here the row is cut
    into blocks of ``block`` columns; one vectorised ``amax`` finds each block's largest entry,
    and ``topk`` then runs only over the ``k`` blocks with the largest maxima (and a last
    partial block). Those hold the k largest entries: a block outside them has a maximum no
    larger than the k chosen blocks' maxima, each of which is a distinct entry at least as large
    (ties can trade one equal entry for another, as in ``topk``).
    """
    n, m = scores.shape
    whole = m // block
    if whole <= k:
        return scores.topk(k, dim=1)
    body = scores[:, : whole * block].unflatten(1, (whole, block))  # (n, M/block, block)
    blocks = body.amax(dim=2).topk(k, dim=1).indices  # (n, k)
    offsets = torch.arange(block, device=scores.device)
    values = body.gather(1, blocks[:, :, None].expand(-1, -1, block)).flatten(1)  # (n, k·block)
    index = (blocks[:, :, None] * block + offsets).flatten(1)
    if whole * block < m:  # the last partial block is always a candidate
        values = torch.cat([values, scores[:, whole * block:]], dim=1)
        tail = torch.arange(whole * block, m, device=scores.device)
        index = torch.cat([index, tail.expand(n, -1)], dim=1)
    top, j = values.topk(k, dim=1)
    return top, index.gather(1, j)


def rank_stably(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Order candidates (n, C) by score descending, ties by ascending ``index``: deterministic."""
    by_index = index.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), index.gather(1, by_score)
