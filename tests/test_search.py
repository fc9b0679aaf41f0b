"""Search equivalences: beam 1 == greedy, cached == uncached, batched == alone, scores == log-probs.

Random models are untied with a boosted eos row so hypotheses end at varied lengths; a tiny model
trained for a few seconds on a copy task gives realistic, peaked distributions. float64 where
exact agreement is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BOS, EOS, PAD, VOCAB, random_batch, random_model

from seq2seq_diff.model import ModelConfig, Seq2SeqTransformer
from seq2seq_diff.search import (
    Hypothesis,
    beam_search,
    greedy_search,
    length_penalty_factor,
    max_lengths,
    sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_model() -> Seq2SeqTransformer:
    """A tiny model trained a few seconds to copy its source (vocab 12), as float64."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, d_model=32, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1, ffn_dim=64, dropout=0.0)
    model = Seq2SeqTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        src = random_batch(32, vocab=12, seed=100 + step)
        pieces = src.masked_fill(src == EOS, PAD)
        tgt_in = torch.cat([torch.full((32, 1), BOS), pieces], dim=1)
        tgt_out = torch.cat([src, torch.full((32, 1), PAD)], dim=1)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(),
                                                 ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


# --- references: direct transcriptions without the cache, one sentence at a time -------------

def _constrained(lprobs: torch.Tensor, t: int, cap: int, min_len: int) -> torch.Tensor:
    lprobs = lprobs.clone()
    lprobs[PAD] = lprobs[BOS] = -math.inf
    if t >= cap:
        eos = lprobs[EOS].item()
        lprobs[:] = -math.inf
        lprobs[EOS] = eos
    elif t < min_len:
        lprobs[EOS] = -math.inf
    return lprobs


def _next_log_probs(model, prefixes: list[list[int]], memory, src_mask) -> torch.Tensor:
    """Full-prefix (uncached) decoding: (len(prefixes), V) next-token log-probs."""
    tgt = torch.tensor([[BOS, *p] for p in prefixes])
    n = len(prefixes)
    logits = model.decode(tgt, memory.expand(n, -1, -1), src_mask.expand(n, -1))[:, -1]
    return torch.log_softmax(logits.double(), dim=-1)


@torch.no_grad()
def reference_greedy(model, src_row, max_len_a=1.2, max_len_b=10, min_len=0) -> list[int]:
    src = src_row[src_row != PAD][None]
    mask = torch.ones_like(src, dtype=torch.bool)
    cap = math.floor(max_len_a * src.shape[1] + max_len_b)
    memory = model.encode(src, mask)
    out: list[int] = []
    while True:
        lprobs = _constrained(_next_log_probs(model, [out], memory, mask)[0], len(out), cap,
                              min_len)
        token = int(lprobs.argmax())
        if token == EOS:
            return out
        out.append(token)


@torch.no_grad()
def reference_beam(model, src_row, beam_size, alpha=1.0, max_len_a=1.2, max_len_b=10,
                   min_len=0) -> list[Hypothesis]:
    """Plain-Python beam search over one sentence, recomputing the whole prefix every step."""
    src = src_row[src_row != PAD][None]
    mask = torch.ones_like(src, dtype=torch.bool)
    cap = math.floor(max_len_a * src.shape[1] + max_len_b)
    memory = model.encode(src, mask)
    vocab = model.config.vocab_size
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[Hypothesis] = []
    t = 0
    while live:
        lprobs = _next_log_probs(model, [p for p, _ in live], memory, mask)
        candidates = []  # (score, flat index, beam, token)
        for b, (_, score) in enumerate(live):
            row = _constrained(lprobs[b], t, cap, min_len)
            for v in range(vocab):
                if row[v] > -math.inf:
                    candidates.append((score + row[v].item(), b * vocab + v, b, v))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        next_live = []
        for rank, (score, _, b, v) in enumerate(candidates[: 2 * beam_size]):
            if v == EOS:
                if rank < beam_size:
                    norm = score / length_penalty_factor(t + 1.0, alpha)
                    finished.append(Hypothesis(live[b][0], norm))
            elif len(next_live) < beam_size:
                next_live.append((live[b][0] + [v], score))
        finished = sorted(finished, key=lambda h: -h.score)[:beam_size]
        live, t = next_live, t + 1
        if len(finished) == beam_size and live:
            best_lp = max(length_penalty_factor(t + 1.0, alpha),
                          length_penalty_factor(cap + 1.0, alpha))
            if finished[-1].score >= max(s for _, s in live) / best_lp:
                break
    return finished


@torch.no_grad()
def teacher_forced_score(model, src_row, tokens: list[int], alpha: float) -> float:
    src = src_row[src_row != PAD][None]
    mask = torch.ones_like(src, dtype=torch.bool)
    tgt_in = torch.tensor([[BOS, *tokens]])
    tgt_out = torch.tensor([[*tokens, EOS]])
    lprobs = torch.log_softmax(model.decode(tgt_in, model.encode(src, mask), mask).double(), -1)
    total = lprobs.gather(2, tgt_out[:, :, None]).sum().item()
    return total / length_penalty_factor(len(tokens) + 1.0, alpha)


def tokens_of(results: list[list[Hypothesis]], rank: int = 0) -> list[list[int]]:
    return [hyps[rank].tokens for hyps in results]


# --- tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_random_model_outputs_vary_in_length(attention):
    # Guards the other tests: equivalences on constant-length outputs would prove little.
    src = random_batch(12)
    lengths = {len(x) for x in greedy_search(random_model(attention), src, src != PAD)}
    assert len(lengths) >= 3


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_beam_size_one_equals_greedy_random(attention):
    model = random_model(attention)
    src = random_batch(12)
    greedy = greedy_search(model, src, src != PAD)
    assert tokens_of(beam_search(model, src, src != PAD, beam_size=1,
                                 length_penalty=0.0)) == greedy


def test_beam_size_one_equals_greedy_trained(trained_model):
    src = random_batch(16, vocab=12, seed=7)
    greedy = greedy_search(trained_model, src, src != PAD)
    assert tokens_of(beam_search(trained_model, src, src != PAD, beam_size=1,
                                 length_penalty=0.0)) == greedy
    # The model has learnt something: a good share of outputs copy the source exactly.
    copies = sum(g == s[s > EOS].tolist() for g, s in zip(greedy, src, strict=True))
    assert copies >= len(src) // 4


@pytest.mark.parametrize("alpha", [0.6, 1.0, 2.0])
def test_beam_size_one_with_length_penalty_never_worse_than_greedy(trained_model, alpha):
    # Beam 1 finishes greedy's hypothesis at the same step, but with alpha > 0 a longer open one
    # may still win after the penalty, so the search goes on: its score is >= greedy's.
    src = random_batch(16, vocab=12, seed=7)
    greedy = greedy_search(trained_model, src, src != PAD)
    beam = beam_search(trained_model, src, src != PAD, beam_size=1, length_penalty=alpha)
    for row, g, (hyp,) in zip(src, greedy, beam, strict=True):
        greedy_score = teacher_forced_score(trained_model, row, g, alpha)
        assert hyp.score >= greedy_score - 1e-9
        assert hyp.tokens == g or hyp.score > greedy_score
    if alpha == 2.0:  # the going-on branch is exercised
        assert tokens_of(beam) != greedy


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_greedy_cached_equals_uncached(attention):
    model = random_model(attention)
    src = random_batch(8)
    cached = greedy_search(model, src, src != PAD, min_len=2)
    assert cached == [reference_greedy(model, row, min_len=2) for row in src]


@pytest.mark.parametrize(("attention", "alpha", "min_len"),
                         [("diff", 1.0, 0), ("standard", 1.0, 0), ("diff", 0.0, 3),
                          ("standard", 2.0, 1)])
def test_beam_cached_equals_uncached_reference(attention, alpha, min_len):
    model = random_model(attention)
    src = random_batch(6)
    got = beam_search(model, src, src != PAD, beam_size=4, length_penalty=alpha,
                      min_len=min_len, n_best=4)
    for row, hyps in zip(src, got, strict=True):
        want = reference_beam(model, row, 4, alpha, min_len=min_len)
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in want], abs=1e-9)


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_beam_with_caches_kept_in_place_equals_uncached_reference(monkeypatch, attention):
    """Every beam step on caches kept in place (``DecoderCache.keep_in_place``, as the ahead-of-
    time compiled beam step runs them, here eagerly): reorders gather only the lineage, and the
    hypotheses are the reference's; sentences finish at different steps (rows dropped)."""
    model = random_model(attention)
    src = random_batch(6)
    extensions = model.best_extensions
    kept = []

    def in_place(tgt_in, src_mask, cache, *args):
        kept.append(cache.keep_in_place(1) is not None)
        return extensions(tgt_in, src_mask, cache, *args)

    monkeypatch.setattr(model, "best_extensions", in_place)
    got = beam_search(model, src, src != PAD, beam_size=4, length_penalty=1.0, min_len=1,
                      n_best=4)
    assert kept[0] is False and all(kept[1:]) and len(kept) > 3  # (step 1: an empty cache)
    for row, hyps in zip(src, got, strict=True):
        want = reference_beam(model, row, 4, 1.0, min_len=1)
        assert [h.tokens for h in hyps] == [h.tokens for h in want]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in want], abs=1e-9)


def step_rows(monkeypatch, model) -> list[int]:
    """The rows of each decoding step ``model`` runs from now on, appended as they run."""
    rows = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda tgt_in, *a, **kw: (
        rows.append(tgt_in.shape[0]), decode(tgt_in, *a, **kw))[1])
    return rows


def test_beam_first_step_runs_once_per_sentence(monkeypatch):
    """Step 1 has one live beam per sentence: it decodes B rows, the later steps B·K."""
    model = random_model("diff")
    src = random_batch(5)
    rows = step_rows(monkeypatch, model)
    beam_search(model, src, src != PAD, beam_size=4, min_len=3, max_len_a=0.0, max_len_b=4)
    assert rows[0] == 5 and rows[1] == 5 * 4


def test_beam_with_fewer_candidates_than_two_beams_per_row():
    """A vocabulary under 2K pieces: the first step runs on all K rows, results unchanged."""
    model = random_model("standard", vocab=7)
    src = random_batch(4, vocab=7)
    got = beam_search(model, src, src != PAD, beam_size=4, n_best=4)
    for row, hyps in zip(src, got, strict=True):
        want = reference_beam(model, row, 4, 1.0)
        assert [h.tokens for h in hyps] == [h.tokens for h in want]


def test_beam_cached_equals_uncached_trained(trained_model):
    src = random_batch(6, vocab=12, seed=3)
    got = beam_search(trained_model, src, src != PAD, beam_size=3, n_best=3)
    for row, hyps in zip(src, got, strict=True):
        want = reference_beam(trained_model, row, 3)
        assert [h.tokens for h in hyps] == [h.tokens for h in want]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_nbest_sorted_and_scores_are_penalised_log_probs(alpha):
    model = random_model("diff")
    src = random_batch(6)
    results = beam_search(model, src, src != PAD, beam_size=5, length_penalty=alpha, n_best=5)
    for row, hyps in zip(src, results, strict=True):
        assert len(hyps) == 5 and all(isinstance(h, Hypothesis) for h in hyps)
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5  # distinct hypotheses
        for h in hyps:
            assert h.score == pytest.approx(teacher_forced_score(model, row, h.tokens, alpha),
                                            abs=1e-9)


def test_length_penalty_favours_longer_hypotheses():
    mean_lengths, best = [], []
    src = random_batch(16, seed=5)
    for alpha in (0.0, 1.0, 2.0, 3.0):
        results = beam_search(random_model("diff"), src, src != PAD, beam_size=5,
                              length_penalty=alpha)
        best.append(tokens_of(results))
        mean_lengths.append(sum(map(len, best[-1])) / len(src))
    assert mean_lengths == sorted(mean_lengths)
    assert mean_lengths[0] < mean_lengths[-1]
    assert best[0] != best[3]  # alpha changes the choice ...
    # ... and alpha 0 ranks by plain summed log-probability: the best has the highest sum.
    model = random_model("diff")
    for row, hyps in zip(src, beam_search(model, src, src != PAD, 5, 0.0, n_best=5),
                         strict=True):
        sums = [teacher_forced_score(model, row, h.tokens, 0.0) for h in hyps]
        assert sums[0] == max(sums)


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_batched_equals_one_by_one(attention):
    model = random_model(attention)
    src = random_batch(8, seed=11)
    greedy = greedy_search(model, src, src != PAD)
    beam = beam_search(model, src, src != PAD, beam_size=4, n_best=2)
    for i, row in enumerate(src):
        alone = row[row != PAD][None]
        assert greedy_search(model, alone, alone != PAD) == [greedy[i]]
        (hyps,) = beam_search(model, alone, alone != PAD, beam_size=4, n_best=2)
        assert [h.tokens for h in hyps] == [h.tokens for h in beam[i]]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in beam[i]], abs=1e-9)


def test_min_len_respected():
    model = random_model("diff")
    src = random_batch(12)
    assert min(map(len, greedy_search(model, src, src != PAD))) < 4  # the constraint bites
    for out in (greedy_search(model, src, src != PAD, min_len=4),
                tokens_of(beam_search(model, src, src != PAD, beam_size=3, min_len=4)),
                sample(model, src, src != PAD, min_len=4,
                       generator=torch.Generator().manual_seed(0))):
        assert min(map(len, out)) >= 4


def test_max_len_respected_and_formula():
    model = random_model("diff")
    src = random_batch(12)
    mask = src != PAD
    caps = max_lengths(mask, 0.5, 2)
    assert caps.tolist() == [math.floor(0.5 * n + 2) for n in mask.sum(1).tolist()]
    for out in (greedy_search(model, src, mask, 0.5, 2),
                tokens_of(beam_search(model, src, mask, 3, 1.0, 0.5, 2)),
                tokens_of(beam_search(model, src, mask, 3, 3.0, 0.5, 2)),
                sample(model, src, mask, max_len_a=0.5, max_len_b=2)):
        assert all(len(o) <= c for o, c in zip(out, caps.tolist(), strict=True))
    # The cap wins over min_len; a zero cap gives empty outputs.
    assert greedy_search(model, src, mask, 0.0, 0, min_len=5) == [[]] * len(src)
    assert tokens_of(beam_search(model, src, mask, 3, 1.0, 0.0, 0)) == [[]] * len(src)


def test_greedy_ends_rows_at_their_cap_without_a_step(monkeypatch):
    """A row at its cap could only get a forced eos: greedy search ends it without decoding
    another step. Caps of 4 and min_len 4: exactly 4 steps, 4 pieces, as the uncapped search
    with min_len 4 gives for its first 4 pieces."""
    model = random_model("diff")
    src = random_batch(6)
    steps = step_rows(monkeypatch, model)
    out = greedy_search(model, src, src != PAD, max_len_a=0.0, max_len_b=4, min_len=4)
    assert steps == [6] * 4 and all(len(o) == 4 for o in out)
    longer = greedy_search(model, src, src != PAD, max_len_a=0.0, max_len_b=50, min_len=4)
    assert out == [o[:4] for o in longer]


def test_deterministic_across_runs():
    src = random_batch(8)
    runs = [beam_search(random_model("diff"), src, src != PAD, beam_size=5, n_best=5)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_sample_reproducible_and_restricted():
    model = random_model("diff")
    src = random_batch(8)
    mask = src != PAD

    def draw(seed, **kw):
        return sample(model, src, mask, generator=torch.Generator().manual_seed(seed), **kw)

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(3, top_k=1) == greedy_search(model, src, mask)
    assert draw(4, top_p=1e-9) == greedy_search(model, src, mask)
    assert draw(5, temperature=1e-4) == greedy_search(model, src, mask)
    with pytest.raises(ValueError):
        draw(0, temperature=0.0)


def test_restores_training_mode_and_ignores_dropout():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1, ffn_dim=64, dropout=0.5)
    model = Seq2SeqTransformer(cfg).train()
    src = random_batch(4)
    first = beam_search(model, src, src != PAD, beam_size=3)
    assert model.training
    assert beam_search(model, src, src != PAD, beam_size=3) == first
    assert greedy_search(model.eval(), src, src != PAD) == greedy_search(model, src, src != PAD)


def test_empty_batch_and_bad_arguments():
    model = random_model("diff")
    src = torch.zeros(0, 5, dtype=torch.long)
    assert greedy_search(model, src, src != PAD) == []
    assert beam_search(model, src, src != PAD) == []
    one = random_batch(1)
    with pytest.raises(ValueError):
        beam_search(model, one, one != PAD, beam_size=2, n_best=3)
    with pytest.raises(ValueError):
        beam_search(model, one, one != PAD, beam_size=0)
