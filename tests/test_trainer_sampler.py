"""P×K sampler: every image each epoch, distinct classes, seeded, resumable, disjoint DDP shares."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.sampler import PKBatchSampler, divisor_splits, epoch_batches, rank_share  # noqa: E402


def _labels(sizes):
    return [c for c, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("sizes,p,k", [([10, 7, 5, 12, 3, 9], 3, 4), ([40, 41, 60, 258, 45] * 3, 4, 4),
                                       ([2, 2, 2], 2, 5), ([20] * 8, 8, 2)])
def test_every_image_every_epoch_and_pk_shape(sizes, p, k):
    labels = np.array(_labels(sizes))
    for epoch in range(3):
        batches = epoch_batches(labels, p, k, seed=1, epoch=epoch)
        seen = {i for b in batches for i in b}
        assert seen == set(range(len(labels)))
        for b in batches:
            assert len(b) == p * k
            chunks = [b[j:j + k] for j in range(0, len(b), k)]
            for ch in chunks:  # each chunk: K images of one class
                assert len({labels[i] for i in ch}) == 1
            if len(sizes) >= p:  # distinct classes per batch whenever there are enough classes
                assert len({labels[ch[0]] for ch in chunks}) == p


def test_seeded_and_epoch_dependent():
    labels = _labels([9] * 10)
    a = epoch_batches(labels, 3, 3, seed=5, epoch=0)
    assert a == epoch_batches(labels, 3, 3, seed=5, epoch=0)
    assert a != epoch_batches(labels, 3, 3, seed=5, epoch=1)
    assert a != epoch_batches(labels, 3, 3, seed=6, epoch=0)


def test_ddp_shares_are_disjoint_whole_classes_and_cover_the_global_batch():
    labels = np.array(_labels([8, 9, 10, 11, 12, 7, 6, 9]))
    s0 = PKBatchSampler(labels, 4, 3, seed=0, rank=0, world_size=2)
    s1 = PKBatchSampler(labels, 4, 3, seed=0, rank=1, world_size=2)
    single = PKBatchSampler(labels, 4, 3, seed=0)
    for epoch in (0, 1):
        for s in (s0, s1, single):
            s.set_epoch(epoch)
        assert len(s0) == len(s1) == len(single)
        for b0, b1, g in zip(s0, s1, single):
            i0, i1 = [i for i, _ in b0], [i for i, _ in b1]
            assert len(i0) == len(i1) == 6
            assert set(i0).isdisjoint(i1) or Counter(i0 + i1) == Counter(i for i, _ in g)
            assert Counter(i0 + i1) == Counter(i for i, _ in g)
            assert {labels[i] for i in i0}.isdisjoint({labels[i] for i in i1})  # whole classes per rank
            # the augmentation seeds follow the sample's global position: same on 1 or 2 processes
            assert sorted(b0 + b1) == sorted(g)


def test_classes_per_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="divisible"):
        PKBatchSampler(_labels([5] * 6), 3, 2, rank=0, world_size=2)


def test_state_dict_resumes_mid_epoch():
    labels = _labels([7] * 9)
    s = PKBatchSampler(labels, 3, 3, seed=2)
    s.set_epoch(1)
    full = list(s)
    s2 = PKBatchSampler(labels, 3, 3, seed=2)
    s2.load_state_dict({"epoch": 1, "start_batch": 4, "batch_size": 9})
    assert list(s2) == full[4:]
    s2.set_epoch(2)
    assert s2.start_batch == 0


def test_random_split_draws_divisors_per_epoch():
    assert divisor_splits(54) == [(27, 2), (18, 3), (9, 6), (6, 9), (3, 18), (2, 27)]
    assert divisor_splits(54, world_size=2) == [(18, 3), (6, 9), (2, 27)]
    labels = _labels([30] * 40)
    s = PKBatchSampler(labels, 6, 9, seed=0, random_split=True)
    splits = {s.split_for_epoch(e) for e in range(30)}
    assert len(splits) > 2 and all(p * k == 54 for p, k in splits)
    for e in range(3):
        s.set_epoch(e)
        assert all(len(b) == 54 for b in s)


def test_small_classes_are_padded_with_a_warning(caplog):
    labels = _labels([2, 1, 9, 9])
    with caplog.at_level("WARNING"):
        s = PKBatchSampler(labels, 2, 4)
    assert "fewer than K=4" in caplog.text
    s.set_epoch(0)
    seen = {i for b in s for i, _ in b}
    assert seen == set(range(len(labels)))


def test_rank_share_takes_chunks_round_robin():
    batch = list(range(12))
    assert rank_share(batch, 3, 0, 2) == [0, 1, 2, 6, 7, 8]
    assert rank_share(batch, 3, 1, 2) == [3, 4, 5, 9, 10, 11]
