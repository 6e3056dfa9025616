"""P classes x K images per batch, every training image once (or more) per epoch (DESIGN §2).

An epoch is a pure function of (labels, P, K, seed, epoch): each class's images are shuffled,
padded to a multiple of K by repeating random images of that class, cut into chunks of K; the
chunks are shuffled and grouped P at a time into global batches whose classes are distinct where
possible; the last batch is filled up with random extra chunks so every batch has exactly P*K
images. Under DDP, rank r takes chunks r, r+W, ... of each global batch (whole classes per rank,
disjoint shares, the same number of batches on every rank).

Each yielded element is ``(index, sample_seed)``: the seed drives that image's augmentation, so
a resumed run (or another number of data-loader workers) sees exactly the same pixels.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


def divisor_splits(batch_size: int, min_k: int = 2, world_size: int = 1) -> list[tuple[int, int]]:
    """All (P, K) with P*K = batch_size, K >= min_k, P >= 2 and P divisible by world_size."""
    out = []
    for k in range(max(1, min_k), batch_size + 1):
        if batch_size % k == 0:
            p = batch_size // k
            if p >= 2 and p % world_size == 0:
                out.append((p, k))
    return out


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])


def epoch_batches(labels: Sequence[int], p: int, k: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches (lists of dataset indices, P*K each) of one epoch."""
    labels = np.asarray(labels)
    rng = _rng(seed, epoch, 0)
    classes = np.unique(labels)
    if len(classes) < 1:
        raise ValueError("no training samples")
    chunks: list[tuple[int, np.ndarray]] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = rng.permutation(idx)
        pad = (-len(idx)) % k
        if pad:
            idx = np.concatenate([idx, rng.choice(idx, size=pad, replace=len(idx) < pad)])
        for j in range(0, len(idx), k):
            chunks.append((int(c), idx[j:j + k]))
    order = rng.permutation(len(chunks))
    pending = [chunks[i] for i in order]
    batches: list[list[np.ndarray]] = []
    # greedy grouping with distinct classes per batch; a chunk whose class is already in the batch waits
    while pending:
        batch, seen, rest = [], set(), []
        for ch in pending:
            if len(batch) < p and ch[0] not in seen:
                batch.append(ch)
                seen.add(ch[0])
            else:
                rest.append(ch)
        if len(batch) < p and len(classes) >= p:
            # last, short batch: fill with random chunks of classes not in it yet
            others = [c for c in classes if int(c) not in seen]
            for c in rng.choice(others, size=p - len(batch), replace=False):
                idx = np.flatnonzero(labels == c)
                batch.append((int(c), rng.choice(idx, size=k, replace=len(idx) < k)))
                seen.add(int(c))
        while len(batch) < p:  # fewer classes than P: allow repeats
            c = int(rng.choice(classes))
            idx = np.flatnonzero(labels == c)
            batch.append((c, rng.choice(idx, size=k, replace=len(idx) < k)))
        batches.append([ch[1] for ch in batch])
        pending = rest
    return [[int(i) for ch in b for i in ch] for b in batches]


def rank_share(batch: list[int], k: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of a global batch: its chunks (classes) r, r+W, ..."""
    chunks = [batch[j:j + k] for j in range(0, len(batch), k)]
    return [i for ch in chunks[rank::world_size] for i in ch]


class PKBatchSampler:
    """Batch sampler for ``DataLoader(batch_sampler=...)``: this rank's (index, seed) lists.

    ``set_epoch(e)`` selects the epoch; ``state_dict()``/``load_state_dict()`` hold (epoch, batches
    already consumed), so a resumed run continues mid-epoch with the same batches.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, random_split: bool = False, min_k: int = 2):
        self.labels = np.asarray(labels)
        self.batch_size = classes_per_batch * images_per_class
        self.p, self.k = classes_per_batch, images_per_class
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.random_split = random_split
        self.min_k = min_k
        if classes_per_batch % world_size:
            raise ValueError(f"classes_per_batch={classes_per_batch} must be divisible by the number of "
                             f"processes ({world_size}) so each gets whole classes")
        if random_split and not divisor_splits(self.batch_size, min_k, world_size):
            raise ValueError(f"batch size {self.batch_size} has no (P, K) split with K >= {min_k}")
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch already consumed (resume)
        self._cache: tuple[int, list[list[int]]] | None = None
        counts = np.bincount(self.labels - self.labels.min()) if len(self.labels) else np.array([])
        small = int((counts[counts > 0] < images_per_class).sum()) if len(counts) else 0
        if small:
            log.warning("%d training class(es) have fewer than K=%d images; their images are repeated to fill "
                        "a class slot", small, images_per_class)

    def split_for_epoch(self, epoch: int) -> tuple[int, int]:
        """(P, K) for ``epoch``: the configured one, or a seeded draw among the divisors of P*K."""
        if not self.random_split:
            return self.p, self.k
        options = divisor_splits(self.batch_size, self.min_k, self.world_size)
        return options[int(_rng(self.seed, epoch, 1).integers(len(options)))]

    def global_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            p, k = self.split_for_epoch(epoch)
            self._cache = (epoch, epoch_batches(self.labels, p, k, self.seed, epoch))
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        batches = self.global_batches(epoch)
        _, k = self.split_for_epoch(epoch)
        for b in range(self.start_batch, len(batches)):
            seeds = _rng(self.seed, epoch, 2 + b).integers(2**31 - 1, size=len(batches[b]))
            pairs = list(zip(batches[b], seeds.tolist()))  # seeds follow the global position: rank-independent
            share = rank_share(pairs, k, self.rank, self.world_size)
            yield [(int(i), int(s)) for i, s in share]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed,
                "batch_size": self.batch_size, "random_split": self.random_split}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(f"sampler state is for batch size {state['batch_size']}, this run uses {self.batch_size}")
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["start_batch"])


__all__ = ["PKBatchSampler", "epoch_batches", "rank_share", "divisor_splits"]
