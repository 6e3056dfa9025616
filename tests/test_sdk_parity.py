"""End to end: the Retriever, with a bundle exported from a trained checkpoint, reproduces the trainer's
Recall@1 on the held-out Flowers-102 classes (052-102), within the bundle's parity tolerance.

Slow (embeds 4,696 images) and needs artefacts that tests do not make, so it runs only when told:

    IBC_PARITY_BUNDLE=model.ibc IBC_PARITY_METRICS=run/final_metrics.json python -m pytest tests/test_sdk_parity.py

``final_metrics.json`` is what ``ibc-train`` writes for the checkpoint the bundle was exported from.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sdk import Retriever
from sdk.bundle import load_manifest

BUNDLE = os.environ.get("IBC_PARITY_BUNDLE")
METRICS = os.environ.get("IBC_PARITY_METRICS")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (BUNDLE and METRICS), reason="set IBC_PARITY_BUNDLE and IBC_PARITY_METRICS"),
]


def held_out(shared_data: Path) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label in range(52, 103):
        files = sorted((shared_data / "flowers102" / "images" / f"{label:03d}").glob("*.jpg"))
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_retriever_recall_at_1_matches_the_trainer(shared_data, precision):
    trainer_r1 = json.loads(Path(METRICS).read_text())["test"]["recall@1"]
    manifest = load_manifest(BUNDLE)
    paths, labels = held_out(shared_data)
    r = Retriever.from_bundle(BUNDLE, precision=precision, index="flat")
    report = r.add(paths, ids=list(range(len(paths))), on_error="raise", batch_size=64)
    assert len(report.ids) == len(paths) == 4696
    # Recall@1 through the catalogue: each image queries all others (itself dropped by id)
    ids, stored = r.catalog.vectors()
    assert ids == list(range(len(paths)))
    hits = r.search(stored, k=2)
    top = np.array([next(h.id for h in row if h.id != i) for i, row in enumerate(hits)])
    retriever_r1 = float(np.mean(labels[top] == labels))
    # the same through sdk.metrics (what the trainer calls)
    from sdk.metrics import evaluate

    metrics_r1 = evaluate(stored, labels, ks=(1,), nmi=False)["recall@1"]
    assert abs(retriever_r1 - metrics_r1) < 1e-9
    parity = r.variant.parity
    tolerance = float(parity.get("tolerance", manifest.parity.get("tolerances", {}).get(r.variant.precision, 0.1)))
    diff = abs(retriever_r1 - trainer_r1) * 100  # points, as the gate counts them
    print(f"trainer R@1 {trainer_r1:.4f}; Retriever ({r.variant.name}) R@1 {retriever_r1:.4f}; |diff| {diff:.3f} points; "
          f"tolerance {tolerance} points; exporter measured {parity.get('metrics', {}).get('recall@1')}")
    assert diff <= tolerance + 1e-6
    measured = parity.get("metrics", {}).get("recall@1")
    if measured is not None:  # the same variant, measured by the exporter: the same answer up to a tie or two
        assert abs(retriever_r1 - measured) * 100 <= 0.1
