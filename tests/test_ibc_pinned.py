"""IBC's training numbers pinned: a few deterministic CPU steps of the tiny model give these losses.

Why: the loop was refactored into method plugins (trainer/methods/); IBC and its CE-only ablation
must train exactly as before. The values were recorded with the pre-plugin loop (commit ccbd7f8).
"""

import pytest
import torch

from tests._trainer_helpers import make_image_folder, register_tiny_backbones, tiny_config
from trainer.loop import train

register_tiny_backbones()

# per-epoch means over 4 steps each: (loss, loss_backbone, loss_mpn)
PINNED = {
    "mpn": [(3.5354793071746826, 2.158815175294876, 1.3766640722751617),
            (3.218622386455536, 1.855892151594162, 1.3627302646636963)],
    "ce": [(2.1586883664131165, 2.1586883664131165, None),
           (1.8556953072547913, 1.8556953072547913, None)],
}
# after the 8 steps: sum of the head's weights, sum of |classifier weights|
PINNED_WEIGHTS = {"mpn": (0.7996151613078837, 10.63139240903547), "ce": (0.7995701415857184, 10.631403131759726)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("pin") / "f", n_classes=8, per_class=6)


@pytest.mark.parametrize("variant", ["mpn", "ce"])
def test_ibc_losses_and_weights_are_unchanged(folder, tmp_path, variant):
    extra = {} if variant == "mpn" else {"model.use_mpn": "false"}
    cfg = tiny_config(folder, **{"runtime.deterministic": "true", "optim.epochs": 2, **extra})
    r = train(cfg, str(tmp_path / variant))
    got = [(h["loss"], h["loss_backbone"], h.get("loss_mpn")) for h in r.history]
    for g, want in zip(got, PINNED[variant], strict=True):
        assert g[:2] == pytest.approx(want[:2], rel=1e-6, abs=1e-7)
        assert (g[2] is None) == (want[2] is None)
        if want[2] is not None:
            assert g[2] == pytest.approx(want[2], rel=1e-6, abs=1e-7)
    state = torch.load(r.last_checkpoint, weights_only=True)["model"]
    head, cls = PINNED_WEIGHTS[variant]
    assert float(state["head.fc.weight"].double().sum()) == pytest.approx(head, rel=1e-5, abs=1e-6)
    assert float(state["classifier.weight"].double().abs().sum()) == pytest.approx(cls, rel=1e-6)
