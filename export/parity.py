"""The parity gate: each variant's retrieval quality beside the PyTorch fp32 reference.

Why retrieval metrics and not just output error: what a user of the bundle loses is ranking
quality, so the gate is on the Recall@1 drop (in points) on held-out classes, measured with the
same :func:`sdk.metrics.evaluate` the trainer and the SDK use. Cosine to the reference embeddings
(mean and 1st percentile) is reported beside it, to show how far the numbers moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from export.onnx_export import compare_embeddings
from sdk.metrics import evaluate

DEFAULT_TOLERANCES = {"fp32": 0.1, "fp16": 0.1, "bf16": 0.5, "int8": 0.5}  # Recall@1 points
MAX_NORM_DEVIATION = 0.02  # the bundle promises L2-normalised outputs; bf16 arithmetic stays well within this
_EPS = 1e-9


def parse_tolerance(spec, base: dict | None = None) -> dict[str, float]:
    """``0.5`` (int8 tolerance), ``"int8=0.5,fp16=0.1"`` or a dict -> {precision: points}."""
    out = dict(base or DEFAULT_TOLERANCES)
    if spec is None or spec == "":
        return out
    if isinstance(spec, (int, float)):
        out["int8"] = float(spec)
        return out
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                k, v = part.split("=", 1)
                items.append((k.strip(), v))
            else:
                items.append(("int8", part))
    for k, v in items:
        if k not in DEFAULT_TOLERANCES:
            raise ValueError(f"tolerance for unknown precision {k!r}; known: {sorted(DEFAULT_TOLERANCES)}")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"tolerance {k}={v!r} is not a number") from None
        if out[k] < 0:
            raise ValueError(f"tolerance {k}={v} is negative")
    return out


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, ks) -> dict:
    m = evaluate(embeddings, labels, ks=tuple(ks), nmi=False)
    return {k: v for k, v in m.items() if k.startswith("recall@") or k in ("map@r", "precision@1", "r_precision")}


@dataclass
class VariantParity:
    """How one variant fared (all metrics as fractions in [0, 1]; drops in points)."""

    name: str
    precision: str
    metrics: dict
    recall1_drop: float  # points; positive = worse than the reference
    drops: dict  # points per metric
    cosine_mean: float
    cosine_p1: float
    max_abs_diff: float
    norm_max_deviation: float  # max | ||e|| - 1 | over the set
    tolerance: float
    passed: bool
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        m = self.metrics
        return (f"{self.name}: R@1 {100 * m['recall@1']:.2f} (drop {self.recall1_drop:+.2f} points, tolerance "
                f"{self.tolerance:g}), MAP@R {100 * m['map@r']:.2f}, cosine mean {self.cosine_mean:.4f} / "
                f"p1 {self.cosine_p1:.4f}")


def compare(name: str, precision: str, embeddings: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            reference_metrics: dict, ks, tolerance: float) -> VariantParity:
    """Metrics of ``embeddings``, their drop from the reference, and the pass/fail verdict."""
    if not np.isfinite(embeddings).all():
        bad = int((~np.isfinite(embeddings).all(1)).sum())
        return VariantParity(name, precision, {}, float("inf"), {}, float("nan"), float("nan"), float("inf"),
                             float("inf"), tolerance, False, f"{bad} embeddings contain NaN or inf")
    metrics = retrieval_metrics(embeddings, labels, ks)
    drops = {k: round(100 * (reference_metrics[k] - metrics[k]), 4) for k in metrics if k in reference_metrics}
    stats = compare_embeddings(embeddings, reference)
    drop = 100 * (reference_metrics["recall@1"] - metrics["recall@1"])
    norm_dev = float(np.abs(np.linalg.norm(np.asarray(embeddings, np.float64), axis=1) - 1.0).max())
    reasons = []
    if drop > tolerance + _EPS:
        reasons.append(f"Recall@1 drop {drop:.2f} points exceeds the tolerance {tolerance:g}")
    if norm_dev > MAX_NORM_DEVIATION:
        reasons.append(f"outputs are not L2-normalised (max | ||e|| - 1 | = {norm_dev:.3g})")
    return VariantParity(name, precision, metrics, round(drop, 4), drops, stats["cosine_mean"], stats["cosine_p1"],
                         stats["max_abs_diff"], norm_dev, tolerance, not reasons, "; ".join(reasons))
