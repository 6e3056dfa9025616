"""The fine-tuning recipe (lr groups, frozen warm-up, BatchNorm mode, head init) and the zero-shot
baseline row of pretrained runs, on tiny real training runs."""

import json

import pytest
import torch

from tests._trainer_helpers import make_image_folder, register_tiny_backbones, tiny_config
from trainer.config import ConfigError
from trainer.loop import backbone_frozen_at, parameter_groups, train

register_tiny_backbones()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ft") / "imgs", n_classes=6, per_class=6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 'pretrained' tiny trunk: a file the run loads with model.pretrained=PATH."""
    from models.backbones import get_backbone_spec

    torch.manual_seed(123)
    net = get_backbone_spec("tiny_test").builder()
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def _trunk_state(model_state: dict) -> dict:
    return {k[len("backbone.trunk."):]: v for k, v in model_state.items() if k.startswith("backbone.trunk.")}


def test_parameter_groups_cover_every_parameter_once():
    from models.ibc import IBCModel, ModelConfig

    model = IBCModel(ModelConfig(backbone="tiny_test", embed_dim=32, num_classes=4))
    groups = parameter_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert [g["lr_mult"] for g in groups] == [0.1, 1.0]
    # a classifier multiplier moves exactly the classifiers (backbone's and MPN's) into a third group
    groups = parameter_groups(model, 0.1, 10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    clf = {id(p) for m in (model.classifier, model.mpn_classifier) for p in m.parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["backbone", "head", "classifiers"] and groups[2]["lr_mult"] == 10.0
    assert {id(p) for p in groups[2]["params"]} == clf and not clf & {id(p) for p in groups[1]["params"]}


def test_frozen_warmup_boundary():
    from trainer.config import FinetuneConfig

    ft = FinetuneConfig(freeze_backbone_epochs=0.5)
    assert backbone_frozen_at(ft, 0, 0, 10) and backbone_frozen_at(ft, 0, 4, 10)
    assert not backbone_frozen_at(ft, 0, 5, 10) and not backbone_frozen_at(ft, 1, 0, 10)
    assert not backbone_frozen_at(FinetuneConfig(), 0, 0, 10)


def test_frozen_warmup_keeps_the_backbone_then_lr_groups_train_it(folder, weights, tmp_path):
    path, w0 = weights
    # the whole (1-step-per-epoch) run is inside the warm-up: trunk weights and BN statistics unchanged
    cfg = tiny_config(folder, **{"model.pretrained": str(path), "finetune.freeze_backbone_epochs": 5,
                                 "runtime.max_steps": 3, "runtime.baseline": "false"})
    r = train(cfg, str(tmp_path / "frozen"))
    ck = torch.load(r.last_checkpoint, weights_only=True)
    for k, v in _trunk_state(ck["model"]).items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=0, msg=k)
    groups = ck["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 0.0  # the backbone group
    # no gradient ever reached the trunk (no optimiser state for it); the head, MPN and classifiers trained
    with_state = set(ck["optimizer"]["state"])
    assert not with_state & set(groups[0]["params"])
    assert set(groups[1]["params"]) <= with_state

    # no warm-up, backbone at 0.1x: the trunk moves, and its group's lr is a tenth of the head's
    cfg = tiny_config(folder, **{"model.pretrained": str(path), "finetune.backbone_lr_mult": 0.1,
                                 "runtime.max_steps": 3, "runtime.baseline": "false", "optim.schedule": "cosine",
                                 "optim.warmup_epochs": 0})
    r = train(cfg, str(tmp_path / "mult"))
    ck = torch.load(r.last_checkpoint, weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(0.1 * groups[1]["lr"])
    moved = [k for k, v in _trunk_state(ck["model"]).items() if not torch.equal(v, w0[k])]
    assert "0.weight" in moved


def test_bn_frozen_keeps_running_statistics_but_trains_weights(folder, weights, tmp_path):
    path, w0 = weights
    cfg = tiny_config(folder, **{"model.pretrained": str(path), "finetune.bn_mode": "frozen",
                                 "runtime.max_steps": 3, "runtime.baseline": "false"})
    r = train(cfg, str(tmp_path / "bnfrozen"))
    trunk = _trunk_state(torch.load(r.last_checkpoint, weights_only=True)["model"])
    torch.testing.assert_close(trunk["1.running_mean"], w0["1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(trunk["1.running_var"], w0["1.running_var"], rtol=0, atol=0)
    assert not torch.equal(trunk["0.weight"], w0["0.weight"])
    # the default (train) mode updates them
    cfg = tiny_config(folder, **{"model.pretrained": str(path), "runtime.max_steps": 3, "runtime.baseline": "false"})
    trunk = _trunk_state(torch.load(train(cfg, str(tmp_path / "bntrain")).last_checkpoint,
                                    weights_only=True)["model"])
    assert not torch.equal(trunk["1.running_mean"], w0["1.running_mean"])


def test_orthogonal_head_init(folder):
    from models.ibc import IBCModel
    from trainer.loop import init_head

    cfg = tiny_config(folder, **{"finetune.head_init": "orthogonal"})
    model = IBCModel(cfg.model)
    init_head(model, cfg.finetune.head_init)
    w = model.head.fc.weight  # (32, 16): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.head.fc.bias) == 0


def test_pretrained_run_reports_the_starting_point(folder, weights, tmp_path, caplog, monkeypatch):
    """final_metrics.json holds the baseline (untrained trunk, pooled, no head) beside the trained model,
    equal to what `ibc-train --pretrained-baseline` reports on its own."""
    from trainer.baseline import evaluate_baseline

    path, _ = weights
    monkeypatch.setenv("IBC_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="trainer")
    cfg = tiny_config(folder, **{"model.pretrained": str(path), "model.pooling": "avg"})
    train(cfg, str(tmp_path / "run"))
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert "recall@1" in final["baseline"]["test"] and "no training" in final["baseline"]["model"]
    # computed again without the cache, on its own: the same numbers
    alone = evaluate_baseline(tiny_config(folder, **{"model.pretrained": str(path), "model.pooling": "avg"}),
                              out_dir=str(tmp_path / "b"), use_cache=False)
    assert alone == pytest.approx(final["baseline"]["test"])
    assert len(list((tmp_path / "cache" / "baselines").glob("*.json"))) == 1
    # another seed's run reads the cached entry (same weights, pooling, preprocessing and images)
    caplog.clear()
    train(tiny_config(folder, **{"model.pretrained": str(path), "model.pooling": "avg", "runtime.seed": 3}),
          str(tmp_path / "run3"))
    assert any("from the cache" in r.getMessage() for r in caplog.records)
    final3 = json.loads((tmp_path / "run3" / "final_metrics.json").read_text())
    assert final3["baseline"]["test"] == pytest.approx(alone)
    saved = json.loads((tmp_path / "b" / "baseline_metrics.json").read_text())
    assert saved["baseline"]["test"] == pytest.approx(alone)
    assert any("starting point (pretrained, untrained)" in r.getMessage() for r in caplog.records)
    # from scratch there is no starting point to report
    train(tiny_config(folder), str(tmp_path / "scratch"))
    assert "baseline" not in json.loads((tmp_path / "scratch" / "final_metrics.json").read_text())


def test_recipe_config_errors_name_the_key(folder):
    for key, value in (("finetune.bn_mode", "eval"), ("finetune.head_init", "pca"),
                       ("finetune.backbone_lr_mult", -1)):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            tiny_config(folder, **{key: value})
