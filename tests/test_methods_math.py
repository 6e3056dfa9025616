"""The training methods' core math against loop-written references, the registry, and the config
combinations refused at load time (one line naming the key)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests._trainer_helpers import register_tiny_backbones, tiny_config
from trainer.config import ConfigError
from trainer.methods import Method, get_method, list_methods, register_method
from trainer.methods.divide_conquer import (ClusterPKBatchSampler, margin_loss, margin_pairs, match_cluster_ids,
                                            negative_weights, pairwise_distances, subspace)
from trainer.methods.group_loss import choose_anchors, group_loss, pearson_similarity, replicator_step
from trainer.sampler import epoch_batches

register_tiny_backbones()
NOWHERE = Path("/nonexistent-data")  # configs load without reading data


def test_registry_lists_the_builtin_methods_and_refuses_a_second_owner_of_a_name():
    assert {"ibc", "ce", "group_loss", "divide_conquer", "pml"} <= set(list_methods())
    assert issubclass(get_method("group_loss"), Method)
    with pytest.raises(KeyError, match="known: ce"):
        get_method("nope")

    class Other(Method):
        name = "ibc"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)


# --------------------------------------------------------------------------- Group Loss


def test_pearson_similarity_is_clipped_correlation():
    f = torch.randn(7, 5, dtype=torch.float64)
    want = np.clip(np.corrcoef(f.numpy()), 0, None)
    torch.testing.assert_close(pearson_similarity(f).double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)


def test_one_replicator_step_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(6, 6, generator=g)
    x = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    want = torch.zeros_like(x)
    for i in range(6):
        for c in range(4):
            want[i, c] = x[i, c] * sum(w[i, j] * x[j, c] for j in range(6))
        want[i] /= want[i].sum()
    torch.testing.assert_close(replicator_step(w, x), want)


def test_group_loss_value_matches_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    f, logits = torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    anchors = torch.tensor([True, False] * 4)
    out = group_loss(f, logits, labels, anchors, iterations=2, temperature=3.0)
    # reference: priors, W and two replicator steps written out element by element
    fc = f.double() - f.double().mean(1, keepdim=True)
    w = [[max(0.0, float(fc[i] @ fc[j] / (fc[i].norm() * fc[j].norm()))) for j in range(8)] for i in range(8)]
    x = [[1.0 * (c == int(labels[i])) if anchors[i] else float(torch.softmax(logits[i].double() / 3, 0)[c])
          for c in range(4)] for i in range(8)]
    for _ in range(2):
        x = [[x[i][c] * sum(w[i][j] * x[j][c] for j in range(8)) for c in range(4)] for i in range(8)]
        x = [[v / sum(row) for v in row] for row in x]
    nll = -sum(math.log(x[i][int(labels[i])] + 1e-12) for i in range(8)) / 8
    ce = float(F.cross_entropy(logits.double(), labels))
    assert float(out["loss_nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(nll + ce, rel=1e-5)


def test_anchors_are_per_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    m = choose_anchors(labels, 2, torch.Generator().manual_seed(0))
    assert [int(m[labels == c].sum()) for c in range(3)] == [2, 2, 2]


# --------------------------------------------------------------------------- Divide and Conquer


def test_subspace_split_and_norms():
    f = torch.randn(5, 12)
    chunks = [subspace(f, k, 3) for k in range(3)]
    for k, x in enumerate(chunks):
        assert x.shape == (5, 4)
        torch.testing.assert_close(x.norm(dim=1), torch.ones(5))
        torch.testing.assert_close(x * f[:, 4 * k:4 * k + 4].norm(dim=1, keepdim=True), f[:, 4 * k:4 * k + 4])
    torch.testing.assert_close(subspace(f, None, 3), f / f.norm(dim=1, keepdim=True))


def test_hungarian_keeps_ids_stable_under_a_permutation():
    rng = np.random.default_rng(0)
    prev = rng.integers(0, 5, 200)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(match_cluster_ids(prev, perm[prev], 5), prev)
    moved = perm[prev].copy()
    moved[:20] = rng.integers(0, 5, 20)  # a few points change cluster: the ids still follow the clusters
    out = match_cluster_ids(prev, moved, 5)
    assert (out[20:] == prev[20:]).all()
    np.testing.assert_array_equal(match_cluster_ids(None, moved, 5), moved)


def _reference_weights(x, labels, cutoff, nz):
    n, dim = x.shape
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d = max(cutoff, float(np.sqrt(max(0.0, 2 - 2 * float(x[i] @ x[j])) + 1e-8)))
            if labels[i] != labels[j] and d < nz:
                w[i, j] = d ** (2 - dim) * (1 - d * d / 4) ** (-(dim - 3) / 2)
        if w[i].sum() == 0:
            w[i] = [float(labels[i] != labels[j]) for j in range(n)]
        if w[i].sum() > 0:
            w[i] /= w[i].sum()
    return w


def test_distance_weighted_sampling_weights_match_a_loop():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    got = negative_weights(pairwise_distances(x), labels, 8, 0.5, 1.4)
    np.testing.assert_allclose(got.numpy(), _reference_weights(x.numpy(), labels.numpy(), 0.5, 1.4), rtol=1e-6,
                               atol=1e-12)


def test_margin_loss_with_sampled_negatives_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    w = negative_weights(pairwise_distances(x), labels, 6)
    a, p, n = margin_pairs(labels, w, torch.Generator().manual_seed(0))
    assert len(a) == 9 * 2  # every ordered positive pair
    assert all(labels[i] == labels[j] and i != j for i, j in zip(a.tolist(), p.tolist()))
    assert all(labels[i] != labels[k] and w[i, k] > 0 for i, k in zip(a.tolist(), n.tolist()))
    terms = []
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        terms.append(max(0.0, float((x[i] - x[j]).norm()) - 1.2 + 0.2))
        terms.append(max(0.0, 1.2 - float((x[i] - x[k]).norm()) + 0.2))
    want = sum(terms) / max(1, sum(t > 0 for t in terms))
    assert float(margin_loss(x, a, p, n, 1.2, 0.2)) == pytest.approx(want, rel=1e-6)


def test_cluster_sampler_draws_each_batch_from_one_cluster():
    labels = np.repeat(np.arange(8), 6)
    s = ClusterPKBatchSampler(labels, classes_per_batch=2, images_per_class=3, seed=0)
    clusters = (np.arange(len(labels)) % 2).astype(np.int64)
    s.set_clusters(clusters)
    batches = s.global_batches(0)
    for b, batch in enumerate(batches):
        assert {int(clusters[i]) for i in batch} == {s.cluster_of(0, b)}
    assert set(i for b in batches for i in b) == set(range(len(labels)))
    s.set_clusters(None)
    assert s.cluster_of(0, 0) is None


def test_cluster_sampler_keeps_the_plain_samplers_steps_per_epoch():
    """Classes split unevenly across clusters pad to K in each: the epoch still has the plain count."""
    labels = np.repeat(np.arange(10), 7)
    s = ClusterPKBatchSampler(labels, classes_per_batch=4, images_per_class=4, seed=1)
    plain = len(s.global_batches(0))
    clusters = np.random.default_rng(0).integers(0, 3, len(labels))
    untruncated = sum(len(epoch_batches(labels[clusters == c], 4, 4, 1, c + 1)) for c in range(3))  # epoch 0
    assert untruncated > plain  # what the cluster batches would add without the budget
    s.set_clusters(clusters)
    for epoch in (0, 1):
        batches = s.global_batches(epoch)
        assert len(batches) == len(epoch_batches(labels, 4, 4, 1, epoch)) and len(batches[0]) == 16
        for b, batch in enumerate(batches):
            assert {int(clusters[i]) for i in batch} == {s.cluster_of(epoch, b)}


# --------------------------------------------------------------------------- PML


@pytest.mark.parametrize("loss", ["triplet", "contrastive", "multi_similarity", "proxy_anchor",
                                  "normalized_softmax", "arcface"])
def test_pml_losses_equal_calling_pml_directly(loss):
    from pytorch_metric_learning import losses, miners

    from trainer.methods import MethodContext
    from trainer.methods.pml import LOSSES, MINERS
    from trainer.distributed import DistInfo

    cfg = tiny_config(NOWHERE, **{"method.name": "pml", "method.loss": loss})
    cfg.model.num_classes = 5
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, cfg.model.embed_dim, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    torch.manual_seed(7)
    method = get_method("pml")(cfg.method, None, MethodContext(cfg, DistInfo(), [], torch.device("cpu")))
    got, parts = method.loss(f, labels)
    torch.manual_seed(7)
    cls_name, miner_name, defaults, _, proxies = LOSSES[loss]
    kw = {"num_classes": 5, "embedding_size": cfg.model.embed_dim} if proxies else {}
    ref_loss = getattr(losses, cls_name)(**kw, **defaults)
    if miner_name:
        m_cls, m_args = MINERS[miner_name]
        want = ref_loss(f, labels, getattr(miners, m_cls)(**m_args)(f, labels))
    else:
        want = ref_loss(f, labels)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert parts[f"loss_{loss}"] is got
    assert float(got.detach()) > 0


def test_cosine_classifier_loss_equals_pml_normalized_softmax():
    """``loss.classifier=cosine`` + CE at temperature T is PML's NormalizedSoftmaxLoss with the same weights."""
    from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

    from trainer.losses import classifier_logits, smoothed_cross_entropy

    g = torch.Generator().manual_seed(0)
    f = torch.randn(24, 16, generator=g) * 3
    labels = torch.randint(0, 7, (24,), generator=g)
    head = torch.nn.Linear(16, 7)
    ours = smoothed_cross_entropy(classifier_logits(head, f, "cosine"), labels, 0.0, 0.05)
    pml = NormalizedSoftmaxLoss(num_classes=7, embedding_size=16, temperature=0.05)
    with torch.no_grad():
        pml.W.copy_(head.weight.t())
    assert torch.allclose(ours, pml(f, labels), rtol=1e-5, atol=1e-6)
    # the feature norm and the bias do not move a cosine logit; they do move a linear one
    assert torch.allclose(classifier_logits(head, 5 * f, "cosine"), classifier_logits(head, f, "cosine"), atol=1e-6)
    assert not torch.allclose(classifier_logits(head, 5 * f, "linear"), classifier_logits(head, f, "linear"))


# --------------------------------------------------------------------------- bad input at config load


@pytest.mark.parametrize("sets,key", [
    ({"method.name": "nope"}, "method.name"),
    ({"method.name": "group_loss", "method.anchors_per_class": 3}, "method.anchors_per_class"),
    ({"method.name": "divide_conquer", "method.num_subspaces": 5}, "method.num_subspaces"),
    ({"method.name": "pml", "method.loss": "lifted"}, "method.loss"),
    ({"method.name": "pml", "method.miner": "hardest"}, "method.miner"),
    ({"method.name": "pml", "method.loss_args": "{marginn: 1}"}, "method.loss_args.marginn"),
    ({"method.name": "pml", "method.miner_args": "{eps: 1}"}, "method.miner_args.eps"),
    ({"method.name": "pml", "method.loss": "arcface", "method.miner": "batch_hard"}, "method.miner"),
    ({"method.name": "pml", "method.foo": 1}, "method.foo"),
    ({"method.name": "ibc", "model.use_mpn": "false"}, "model.use_mpn"),
    ({"loss.classifier": "arc"}, "loss.classifier"),
])
def test_bad_combinations_are_refused_at_load_naming_the_key(sets, key):
    with pytest.raises(ConfigError) as e:
        tiny_config(NOWHERE, **sets)  # sampler.images_per_class is 3 in the tiny config, embed_dim 32
    assert key in str(e.value) and "\n" not in str(e.value)


def test_old_configs_pick_the_method_from_use_mpn():
    assert tiny_config(NOWHERE).method.name == "ibc"
    cfg = tiny_config(NOWHERE, **{"model.use_mpn": "false"})
    assert cfg.method.name == "ce" and not cfg.model.use_mpn
    cfg = tiny_config(NOWHERE, **{"method.name": "group_loss"})
    assert not cfg.model.use_mpn and cfg.to_dict()["method"]["anchors_per_class"] == 2
    assert cfg.runtime.mpn_global_batch  # the MPN sees the global batch under DDP by default
