"""Token batches respect the budget, cover each example once, shard over ranks and resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_diff.batching import BatchLoader, TokenBatchSampler, collate


def _lengths(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 60, size=n)
    return src, np.clip(src + rng.integers(-5, 10, size=n), 2, None)


def _within_budget(batches, src, tgt, max_tokens) -> bool:
    return all(
        len(b) * src[b].max() <= max_tokens and len(b) * tgt[b].max() <= max_tokens for b in batches
    )


def test_batches_within_budget_and_cover_each_example_once():
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=300, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert _within_budget(batches, src, tgt, 300)
        assert sorted(i for b in batches for i in b) == list(range(len(src)))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=80),
    max_tokens=st.integers(40, 200),
    replicas=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_sampler_properties(lengths, max_tokens, replicas, seed):
    src, tgt = (np.array(x) for x in zip(*lengths, strict=True))
    ranks = [
        TokenBatchSampler(src, tgt, max_tokens, seed=seed, num_replicas=replicas, rank=r,
                            pool_size=16)
        for r in range(replicas)
    ]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert all(_within_budget(b, src, tgt, max_tokens) for b in per_rank)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(len(src)))  # nothing lost
    extra = sum(seen.values()) - len(src)
    assert extra <= (replicas - 1) * max(map(len, ranks[0].batches))  # only wrap-around repeats


def test_two_ranks_disjoint_with_equal_counts():
    src, tgt = _lengths(301)
    for drop_last in (False, True):
        samplers = [
            TokenBatchSampler(src, tgt, 250, seed=3, num_replicas=2, rank=r, drop_last=drop_last)
            for r in (0, 1)
        ]
        for s in samplers:
            s.set_epoch(2)
        rank0, rank1 = (list(s) for s in samplers)
        assert len(rank0) == len(rank1) == len(samplers[0])
        n = samplers[0].batches_per_epoch
        ids0 = {tuple(b) for b in rank0}
        ids1 = {tuple(b) for b in rank1}
        if drop_last or n % 2 == 0:
            assert not ids0 & ids1
        else:  # the odd batch count is evened out by repeating the epoch's first batch
            assert len(ids0 & ids1) <= 1
        covered = {i for b in rank0 + rank1 for i in b}
        assert drop_last or covered == set(range(len(src)))


def test_order_depends_on_seed_and_epoch_only():
    src, tgt = _lengths()

    def order(seed, epoch):
        sampler = TokenBatchSampler(src, tgt, 300, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    fixed = TokenBatchSampler(src, tgt, 300, shuffle=False)
    assert list(fixed) == (fixed.set_epoch(5) or list(fixed))
    flat = [i for b in fixed for i in b]
    longer = np.maximum(src, tgt)
    assert list(longer[flat]) == sorted(longer)  # evaluation batches are length-sorted


def test_oversized_example_gets_its_own_batch():
    src, tgt = np.array([5, 500, 5, 5]), np.array([5, 5, 600, 5])
    batches = list(TokenBatchSampler(src, tgt, max_tokens=100, shuffle=False))
    assert [1] in batches and [2] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, src, tgt):
        self.rows = [{"src_ids": [5] * (s - 1), "tgt_ids": [6] * (t - 1), "i": i}
                     for i, (s, t) in enumerate(zip(src.tolist(), tgt.tolist(), strict=True))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _ids(batch):
    return batch["i"]


def _collate_ids(examples):
    return {"i": [ex["i"] for ex in examples], **collate(examples)}


@pytest.mark.parametrize("replicas,workers", [(1, 0), (2, 0), (1, 2)])
def test_resume_mid_epoch_equals_tail(replicas, workers):
    src, tgt = _lengths(400)
    dataset = _Examples(src, tgt)

    def loaders():
        return [
            BatchLoader(dataset, TokenBatchSampler(src, tgt, 300, seed=7, num_replicas=replicas,
                                                       rank=r), _collate_ids, num_workers=workers)
            for r in range(replicas)
        ]

    full = loaders()
    for loader in full:
        loader.sampler.set_epoch(1)
    whole = [[_ids(b) for b in loader] for loader in full]

    first = loaders()
    states = []
    for loader in first:
        loader.sampler.set_epoch(1)
        iterator = iter(loader)
        head = [_ids(next(iterator)) for _ in range(5)]  # workers prefetch more than this
        assert head == whole[first.index(loader)][:5]
        states.append(loader.state_dict())
    assert states[0] == {"epoch": 1, "consumed": 5 * replicas, "seed": 7}

    resumed = loaders()
    for loader, tail in zip(resumed, whole, strict=True):
        loader.load_state_dict(states[0])  # Lightning restores rank 0's state on every rank
        loader.sampler.set_epoch(1)
        assert len(loader) == len(tail)  # Lightning wants the whole epoch's length
        assert [_ids(b) for b in loader] == tail[5:]
        loader.sampler.set_epoch(2)
        assert len([_ids(b) for b in loader]) == len(tail)  # the next epoch is whole again


def test_resume_after_a_finished_epoch_starts_the_next():
    src, tgt = _lengths(100)
    sampler = TokenBatchSampler(src, tgt, 300, seed=1)
    loader = BatchLoader(_Examples(src, tgt), sampler, _collate_ids)
    done = [_ids(b) for b in loader]
    state = loader.state_dict()
    fresh = BatchLoader(_Examples(src, tgt), TokenBatchSampler(src, tgt, 300, seed=1),
                          _collate_ids)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(1)
    after = [_ids(b) for b in fresh]
    sampler.set_epoch(1)
    assert after == [b for b in sampler] and after != done


def test_collate_follows_the_contract():
    examples = [
        {"src_ids": [7, 8, 9], "tgt_ids": [10, 11], "src_text": "a b c", "tgt_text": "x y"},
        {"src_ids": [7], "tgt_ids": [12, 13, 14, 15], "src_text": "a", "tgt_text": "z"},
    ]
    batch = collate(examples, with_text=True)
    assert batch["src"].tolist() == [[7, 8, 9, 3], [7, 3, 0, 0]]
    assert batch["tgt_in"].tolist() == [[2, 10, 11, 0, 0], [2, 12, 13, 14, 15]]
    assert batch["tgt_out"].tolist() == [[10, 11, 3, 0, 0], [12, 13, 14, 15, 3]]
    assert batch["src"].dtype == torch.long
    assert batch["src_text"] == ["a b c", "a"] and batch["ref_text"] == ["x y", "z"]
    assert set(collate(examples)) == {"src", "tgt_in", "tgt_out"}
