"""Token-bounded batches: length-bucketed, sharded over ranks, resumable mid-epoch.

``TokenBatchSampler`` groups examples of similar length into batches bounded by a token budget,
``BatchLoader`` iterates them and can be checkpointed mid-epoch, ``collate`` builds the batch dict
of docs/CONTRACTS.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from seq2seq_diff.errors import ConfigError
from seq2seq_diff.tokenizer import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)


def _greedy_batches(
    order: np.ndarray, src: np.ndarray, tgt: np.ndarray, max_tokens: int
) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches with ``size * longest <= max_tokens`` per side."""
    batches, start, longest_src, longest_tgt = [], 0, 0, 0
    src_list, tgt_list = src[order].tolist(), tgt[order].tolist()
    for i, (s, t) in enumerate(zip(src_list, tgt_list, strict=True)):
        new_src, new_tgt = max(longest_src, s), max(longest_tgt, t)
        size = i - start + 1
        if size > 1 and (size * new_src > max_tokens or size * new_tgt > max_tokens):
            batches.append(order[start:i])
            start, new_src, new_tgt = i, s, t
        longest_src, longest_tgt = new_src, new_tgt
    if start < len(order):
        batches.append(order[start:])
    return batches


def _by_length(indices: np.ndarray, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Sort by the longer side, then target, then source length; stable, so ties keep order.

    The budget binds on the longer side: on the bundled corpus this key needs ~10% fewer
    batches and pads less than sorting by target then source (fairseq's key).
    """
    s, t = src[indices], tgt[indices]
    return indices[np.lexsort((s, t, np.maximum(s, t)))]


class TokenBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches bounded by a token budget, sharded over ranks, resumable.

    **Budget.** On each side, ``batch_size * longest_length <= max_tokens``: padding counts. An
    example longer than ``max_tokens`` on its own forms a one-example batch (logged);
    :class:`TranslationDataModule` filters such examples out before, so there it never happens.

    **Buckets.** Fairseq-style: the examples are shuffled (by ``seed``), cut into pools of
    ``pool_size``, sorted by length (the longer side first) within each pool and cut greedily
    into batches. The batches are made once, so their number is the same every epoch
    (Lightning counts them once per run); each epoch shuffles their order, deterministically
    for ``(seed, epoch)``. With ``shuffle=False`` the whole set is sorted by length and the
    order never changes.

    **Ranks.** Rank ``r`` of ``R`` takes batches ``r, r + R, ...`` of the epoch's order, so the
    ranks' batches are disjoint. When the number of batches does not divide by ``R``, the list
    is padded by wrapping around to its start (the first few batches are seen twice), so every
    rank gets the same number of batches (Lightning hangs otherwise); ``drop_last=True`` drops
    the remainder instead. On one process every example is in exactly one batch per epoch.

    **Resuming.** :meth:`load_state_dict` with ``{"epoch", "consumed"}`` (batches of the epoch
    already consumed, all ranks together) makes the next iteration yield exactly the rest of
    that epoch. :class:`BatchLoader` records the state as the training loop takes batches.

    Args:
        src_lengths: Source tensor length of each example.
        tgt_lengths: Target tensor length of each example.
        max_tokens: Token budget per batch and side, padding included.
        shuffle: Shuffle pools and batch order (training) or sort once (evaluation).
        seed: Seed of the shuffles.
        num_replicas: Number of ranks (world size).
        rank: This process's rank.
        drop_last: Drop the batches that do not divide among the ranks, instead of repeating.
        pool_size: Examples per sorting pool when shuffling.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pool_size: int = 100_000,
    ):
        src = np.asarray(src_lengths, dtype=np.int64)
        tgt = np.asarray(tgt_lengths, dtype=np.int64)
        if src.shape != tgt.shape or src.ndim != 1:
            raise ConfigError(f"src and tgt lengths differ in shape: {src.shape} vs {tgt.shape}")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.pool_size = pool_size
        self.epoch = 0
        self.resume_offset = 0  # global batches of `epoch` to skip on the next iteration
        self.batches = self._make_batches(src, tgt)
        oversized = sum(
            1 for b in self.batches if len(b) == 1 and max(src[b[0]], tgt[b[0]]) > max_tokens
        )
        if oversized:
            log.warning("%d examples are longer than max_tokens=%d; each forms its own batch",
                        oversized, max_tokens)

    def _make_batches(self, src: np.ndarray, tgt: np.ndarray) -> list[np.ndarray]:
        if not self.shuffle:
            return _greedy_batches(_by_length(np.arange(len(src)), src, tgt), src, tgt,
                                   self.max_tokens)
        shuffled = np.random.default_rng(self.seed).permutation(len(src))
        batches = []
        for start in range(0, len(shuffled), self.pool_size):
            pool = _by_length(shuffled[start : start + self.pool_size], src, tgt)
            batches.extend(_greedy_batches(pool, src, tgt, self.max_tokens))
        return batches

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one epoch over all ranks, before padding or dropping."""
        return len(self.batches)

    def _epoch_total(self) -> int:
        """Global batches an epoch really consumes (padded or dropped to a multiple of ranks)."""
        n, r = len(self.batches), self.num_replicas
        return n // r * r if self.drop_last else n

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's batch order; a pending resume offset only holds for its epoch."""
        if epoch != self.epoch:
            self.resume_offset = 0
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into ``self.batches`` in the order of ``epoch`` (all ranks)."""
        if not self.shuffle:
            return np.arange(len(self.batches))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))

    def rank_batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch``, skipping the first ``start`` global batches."""
        order = self.epoch_order(epoch)
        n, r = len(order), self.num_replicas
        rest = order[start:]
        if self.drop_last:
            rest = rest[: len(rest) // r * r]
        elif n and len(rest) % r:
            # Wrap around to the epoch's first batches: the padding is then the same whether
            # the epoch runs in one go or resumes after `start` (start is a multiple of r).
            pad = order[np.arange(r - len(rest) % r) % n]
            rest = np.concatenate([rest, pad])
        return [self.batches[i].tolist() for i in rest[self.rank :: r]]

    def __len__(self) -> int:
        """This rank's batches in a whole epoch (the same on every rank)."""
        n, r = len(self.batches), self.num_replicas
        return n // r if self.drop_last else math.ceil(n / r)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.resume_offset = self.resume_offset, 0
        yield from self.rank_batches(self.epoch, start)

    def state_dict(self) -> dict[str, int]:
        """Where the next iteration starts: ``epoch`` and global batches ``consumed``."""
        return {"epoch": self.epoch, "consumed": self.resume_offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["epoch"]`` after ``state["consumed"]`` global batches.

        A finished epoch resumes at the start of the next one. ``consumed`` counts all ranks,
        so a run may even resume on another number of ranks.
        """
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming with seed %s, the checkpoint used %s: the epoch order differs",
                        self.seed, state["seed"])
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= self._epoch_total():
            epoch, consumed = epoch + 1, 0
        # Round down to whole steps of all ranks, so ranks stay in lockstep.
        self.epoch, self.resume_offset = epoch, consumed // self.num_replicas * self.num_replicas


def collate(
    examples: list[dict[str, Any]],
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    with_text: bool = False,
) -> dict[str, Any]:
    """Build the batch dict of docs/CONTRACTS.md from examples with ``src_ids``/``tgt_ids``.

    ``src`` = pieces + eos, ``tgt_in`` = bos + pieces, ``tgt_out`` = pieces + eos, each
    right-padded with ``pad_id`` to the longest in the batch. ``with_text`` adds the raw
    ``src_text`` and ``ref_text`` (the target sentences) for BLEU.
    """
    src = [list(ex["src_ids"]) + [eos_id] for ex in examples]
    tgt_in = [[bos_id] + list(ex["tgt_ids"]) for ex in examples]
    tgt_out = [list(ex["tgt_ids"]) + [eos_id] for ex in examples]
    batch: dict[str, Any] = {
        "src": _pad(src, pad_id),
        "tgt_in": _pad(tgt_in, pad_id),
        "tgt_out": _pad(tgt_out, pad_id),
    }
    if with_text:
        batch["src_text"] = [ex["src_text"] for ex in examples]
        batch["ref_text"] = [ex["tgt_text"] for ex in examples]
    return batch


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class BatchLoader:
    """Iterates a dataset in the batches of a :class:`TokenBatchSampler`; checkpointable.

    Not a ``DataLoader`` subclass on purpose: Lightning then leaves it alone under DDP (it
    would otherwise try to swap in a ``DistributedSampler``, which cannot express token
    batches). It has ``state_dict``/``load_state_dict``, so Lightning saves its state in
    checkpoints and restores it before iterating (``_Stateful`` in ``combined_loader.py``). The
    count is of batches handed to the training loop, not of those workers have prefetched.
    ``sampler`` is the batch sampler, where Lightning looks for ``set_epoch`` each epoch.

    Args:
        dataset: Anything indexable by the sampler's indices (a ``datasets.Dataset``).
        batch_sampler: The token batch sampler.
        collate_fn: Examples -> batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches for faster copies to the GPU.
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: TokenBatchSampler,
        collate_fn: Any = collate,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self._loader = DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self._epoch = batch_sampler.epoch
        self._consumed = batch_sampler.resume_offset

    @property
    def sampler(self) -> TokenBatchSampler:
        """The batch sampler: Lightning calls ``dataloader.sampler.set_epoch(epoch)``."""
        return self.batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: this runs at the first next(), after Lightning's set_epoch.
        sampler = self.batch_sampler
        self._epoch, self._consumed = sampler.epoch, sampler.resume_offset
        for batch in self._loader:
            self._consumed += sampler.num_replicas
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and global batches ``consumed`` so far (all ranks in lockstep)."""
        return {"epoch": self._epoch, "consumed": self._consumed, "seed": self.batch_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration yield the rest of the saved epoch."""
        self.batch_sampler.load_state_dict(state)
        self._epoch = self.batch_sampler.epoch
        self._consumed = self.batch_sampler.resume_offset
