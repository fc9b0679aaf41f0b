"""Choosing next tokens (seq2seq_diff.selection): the blocked argmax and top-k against torch's,
and beam search's extensions by blocks of logits (graphs) against every score searched (eager)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from seq2seq_diff.selection import (
    _extensions_by_blocks,
    banned,
    best_extensions,
    best_tokens,
    constrain,
    rank_stably,
    top_candidates,
)

NEG_INF = float("-inf")
SPECIALS = SimpleNamespace(pad_id=0, bos_id=2, eos_id=3)


def test_top_candidates_finds_the_values_topk_finds():
    """Blocked top-k against ``topk``: random rows with ties, -inf runs and partial blocks."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, m = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 3000, (1,),
                                                                              generator=g))
        k = min(int(torch.randint(1, 12, (1,), generator=g)), m)
        x = torch.randn(n, m, generator=g)
        if trial % 3 == 0:
            x = x.round()  # many ties
        if trial % 5 == 0:
            x[:, torch.randperm(m, generator=g)[: m // 2]] = float("-inf")
        values, index = top_candidates(x, k, block=int(torch.randint(1, 100, (1,), generator=g)))
        assert torch.equal(values.sort(dim=1, descending=True).values, x.topk(k, dim=1).values)
        assert torch.equal(x.gather(1, index), values)
        assert all(len(set(row)) == k for row in index.tolist())


def test_best_tokens_is_argmax():
    """Blocked argmax against ``argmax``: ties (the first wins), -inf rows, NaN, +inf, partial
    blocks."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        n, m = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 3000, (1,),
                                                                              generator=g))
        x = torch.randn(n, m, generator=g)
        if trial % 3 == 0:
            x = x.round()  # many ties
        if trial % 5 == 0:
            x[:, torch.randperm(m, generator=g)[: m // 2]] = float("-inf")
        if trial % 7 == 0:
            x[0] = float("-inf")
        if trial % 11 == 0:
            x[:, torch.randperm(m, generator=g)[:2]] = float("nan")
        if trial % 13 == 0:
            x[:, torch.randperm(m, generator=g)[:3]] = float("inf")
        block = int(torch.randint(1, 100, (1,), generator=g))
        assert torch.equal(best_tokens(x, block), x.argmax(dim=1)), (trial, n, m, block)


def rules(rows: int, g: torch.Generator, p: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``ban_eos`` and ``only_eos`` rows (never both)."""
    only = torch.rand(rows, generator=g) < p
    return (torch.rand(rows, generator=g) < 0.5) & ~only, only


def test_banned_is_what_constrain_bans():
    g = torch.Generator().manual_seed(0)
    for config in (SPECIALS, SimpleNamespace(pad_id=7, bos_id=1, eos_id=99)):
        scores = torch.randn(9, 100, generator=g)
        ban, only = rules(9, g)
        want = constrain(scores.clone(), ban, only, config)
        got = scores.masked_fill(banned(torch.arange(100), ban[:, None], only[:, None], config),
                                 NEG_INF)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, config", [
    (1000, SPECIALS),  # specials in the first block, a partial last block
    (1024, SimpleNamespace(pad_id=1023, bos_id=64, eos_id=700)),  # whole blocks, specials apart
    (1010, SimpleNamespace(pad_id=0, bos_id=1, eos_id=1005)),  # eos in the partial last block
])
@pytest.mark.parametrize("width", [1, 5])
def test_extensions_by_blocks_are_the_best_of_every_score(dtype, vocab, config, width):
    """What a graph computes (best blocks of logits) against what eager search does (every
    candidate scored and searched): the same extensions, in the same order, the same scores."""
    g = torch.Generator().manual_seed(vocab + width)
    for trial in range(20):
        n = int(torch.randint(1, 7, (1,), generator=g))
        logits = (3 * torch.randn(n * width, vocab, generator=g)).to(dtype)
        scores = -10 * torch.rand(n * width, generator=g)
        if trial % 4 == 0:
            scores[::2] = NEG_INF  # dead hypotheses (the first step's copies)
        ban, only = rules(n * width, g, p=1.0 if trial == 1 else 0.3)
        count = 2 * width
        # (eagerly, float32 logits are overwritten with the scores: a copy)
        want = best_extensions(logits.clone(), scores, ban, only, width, count, config)
        got = rank_stably(*_extensions_by_blocks(logits, scores, ban, only, width, count,
                                                 config, 64))
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=0)
        # the same candidates, but where bf16's ties reach the last place (as in ``topk``)
        sure = (want[0] > want[0][:, -1:] + 1e-4) & (want[0] > NEG_INF)
        assert torch.equal(got[1][sure], want[1][sure]), trial
        if dtype == torch.float32:  # (no ties)
            alive = want[0] > NEG_INF
            assert torch.equal(got[1][alive], want[1][alive]), trial


class Extensions(nn.Module):
    """Beam 5's choice, its scores given a sentence a row (n, 5): a graph's sizes are then
    multiples of the number of sentences, as in ``seq2seq_diff.exported``'s beam graphs."""

    def forward(self, logits, scores, ban_eos, only_eos):
        return best_extensions(logits, scores.view(-1), ban_eos, only_eos, 5, 10, SPECIALS)


def test_a_traced_choice_scores_only_the_best_blocks():
    """Exported (as ``seq2seq_diff.exported`` does), the choice takes the blocks' way, with no
    log-softmax over every token, and gives eager's extensions for any number of sentences."""
    g = torch.Generator().manual_seed(1)
    sentences = torch.export.Dim("sentences", min=1, max=1 << 12)

    def inputs(n: int):
        return (torch.randn(5 * n, 1000, generator=g), -torch.rand(n, 5, generator=g),
                *rules(5 * n, g))

    rows = {0: 5 * sentences}
    program = torch.export.export(Extensions(), inputs(3),
                                  dynamic_shapes=(rows, {0: sentences}, rows, rows))
    ops = {str(node.target) for node in program.graph.nodes}
    assert not any("softmax" in op for op in ops), ops
    assert any("logsumexp" in op for op in ops), ops
    for n in (1, 4, 9):
        args = inputs(n)
        got = program.module()(*args)
        want = Extensions()(args[0].clone(), *args[1:])
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=0)
