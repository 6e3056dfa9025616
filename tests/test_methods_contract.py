"""The contract every registered training method keeps, on real images (a tiny Flowers-102 slice):
it trains from the CLI, resumes after SIGKILL to the same weights as an uninterrupted run
(deterministic CPU), and its checkpoint exports with ``ibc-export`` (onnxruntime fp32) and searches
with ``sdk.Retriever``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _trainer_helpers import register_tiny_backbones, tiny_overrides  # noqa: E402
from export_helpers import link_classes  # noqa: E402

from models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.methods import list_methods  # noqa: E402

register_tiny_backbones()
HELPER = str(ROOT / "tests" / "_trainer_helpers.py")
# per method: a setting that makes the short run exercise what is special about it
EXTRA = {"divide_conquer": {"method.num_subspaces": 2, "method.recluster_every": 1, "method.final_epochs": 1},
         "pml": {"method.loss": "proxy_anchor"}, "group_loss": {"method.anchors_per_class": 1}}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """4 training classes and 2 test classes of real flowers, 6 images each (symlinks)."""
    return link_classes(tmp_path_factory.mktemp("flowers") / "img", ["001", "002", "003", "004", "052", "060"], 6)


def _sets(root: Path, method: str) -> list[str]:
    extra = {"method.name": method, "optim.epochs": 3, "runtime.deterministic": "true",
             "runtime.checkpoint_every_steps": 1, "optim.schedule": "cosine", **EXTRA.get(method, {})}
    return tiny_overrides(root, **extra)


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_method_trains_resumes_exactly_exports_and_searches(method, flowers, tmp_path):
    sets = _sets(flowers, method)
    ref = train(load_config(None, sets), str(tmp_path / "ref"))  # uninterrupted, in this process
    assert ref.method == method and ref.epochs == 3
    assert all(r["loss"] == r["loss"] for r in ref.history)

    # the same run from the CLI, killed mid-run, then resumed from the CLI
    out = tmp_path / "killed"
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, HELPER, str(tmp_path / "k"), "--out", str(out), *args], cwd=ROOT,
                            env=_env(IBC_TEST_STEP_SLEEP="0.4"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "last.pt").is_file():
            try:
                step = load_checkpoint(str(out / "last.pt"))["step"]
            except CheckpointError:
                step = 0
            if step >= 5:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.05)
    assert killed_at is not None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    assert load_checkpoint(str(out / "last.pt"))["step"] < ref.steps
    r = subprocess.run([sys.executable, HELPER, str(tmp_path / "r"), "--out", str(out), "--resume"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(ref.last_checkpoint), load_checkpoint(str(out / "last.pt"))
    assert a["step"] == b["step"] == ref.steps
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["method"]["state"].items():
        assert torch.equal(v, b["method"]["state"][k]), k
    assert json.loads((out / "final_metrics.json").read_text())["method"] == method

    # export (the ibc-export CLI, onnxruntime fp32) and search with the SDK
    from click.testing import CliRunner

    from export.cli import main as export_main
    from sdk import Retriever

    bundle = tmp_path / "model.ibc"
    res = CliRunner().invoke(export_main, [ref.best_checkpoint, "--out", str(bundle), "--backend", "onnx",
                                           "--precision", "fp32", "-q"])
    assert res.exit_code == 0, res.output
    images = sorted(str(p) for p in (flowers / "052").glob("*.jpg")) + sorted(
        str(p) for p in (flowers / "060").glob("*.jpg"))
    retriever = Retriever.from_bundle(bundle, backend="onnxruntime", threads=1)
    retriever.add(images, ids=list(range(len(images))))
    hits = retriever.search(images[:3], k=3)
    assert [h[0].id for h in hits] == [0, 1, 2]  # each image finds itself first
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
