"""Accuracy control for ONNX Runtime int8: keep the most sensitive nodes float until Recall@1 holds.

Why: ONNX Runtime's static quantization has nothing like NNCF's ``quantize_with_accuracy_control``,
and a fully quantized model can lose more retrieval quality than the gate allows (EfficientNet-Lite's
depthwise convolutions, with few weights per output channel, are the usual suspects). The loop:

1. quantize every node (the plain int8 model) and measure its Recall@1 drop, in points, against the
   fp32 ONNX model on the validation images (labelled, not the test classes, disjoint from the
   calibration images); within ``max_drop``: done, nothing is kept float.
2. rank the nodes the plain model runs in int8 by a measured sensitivity: that node alone quantized
   (``quantize_static(nodes_to_quantize=[node])``, same calibration ranges) and the mean cosine
   distance of its output embeddings to the fp32 ones on ranking images from the calibration set.
3. keep nodes float in that order, one per step, re-quantizing (the calibration is cached, so a
   step costs a quantization and a validation pass) and re-measuring, and stop as soon as the drop
   is within budget, or after ``max_iterations`` steps (then the step with the smallest drop wins).

Each step (nodes kept float, validation Recall@1 and drop) is logged and returned in the summary,
which the exporter writes into the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from export.ort_quantize import OrtInt8Options, OrtQuantizer, quantized_nodes

log = logging.getLogger(__name__)


def cosine_distance(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Mean of 1 - cos(e_i, r_i) over rows: how far quantization moved the embeddings."""
    e = np.asarray(embeddings, np.float64)
    r = np.asarray(reference, np.float64)
    cos = (e * r).sum(1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return float(np.mean(1.0 - cos))


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Recall@1 in [0, 1], every image a query, with the metric the gate uses."""
    from sdk.metrics import evaluate

    return float(evaluate(np.asarray(embeddings, np.float32), labels, ks=(1,), nmi=False)["recall@1"])


@dataclass
class Step:
    """One measurement of the loop: the nodes kept float so far and the validation Recall@1 drop."""

    added: list[str]
    kept_float: list[str]
    recall_at_1: float
    drop: float  # points

    def to_dict(self) -> dict:
        return {"added": list(self.added), "kept_float": len(self.kept_float), "recall@1": round(self.recall_at_1, 6),
                "drop": round(self.drop, 4)}


def keep_float_until_within(rank: Callable[[], list[str]], measure: Callable[[list[str]], tuple[float, float]],
                            max_drop: float, max_iterations: int) -> tuple[list[Step], Step]:
    """Greedy loop: measure the plain model; if its drop exceeds ``max_drop``, keep the nodes of ``rank()``
    (most sensitive first) float one at a time, re-measuring after each, until a drop <= ``max_drop``.

    ``measure(kept_float) -> (recall@1, drop in points)``; ``rank`` is only called when the plain model
    fails. Returns every step and the chosen one: the first within budget, else the one with the
    smallest drop (fewest float nodes on ties).
    """
    def within(step: Step) -> bool:
        return step.drop <= max_drop + 1e-9

    steps = [Step([], [], *measure([]))]
    if within(steps[0]):
        return steps, steps[0]
    kept: list[str] = []
    for node in rank()[:max_iterations]:
        kept = kept + [node]
        steps.append(Step([node], list(kept), *measure(kept)))
        if within(steps[-1]):
            return steps, steps[-1]
    return steps, min(steps, key=lambda s: (s.drop, len(s.kept_float)))


def _session(path: str):
    from sdk.backends import OnnxRuntimeRunner

    from export.onnx_export import INPUT_NAME, OUTPUT_NAME

    return OnnxRuntimeRunner(path, input_name=INPUT_NAME, output_name=OUTPUT_NAME)


def _embed(run, array: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(run(np.ascontiguousarray(array[s:s + batch_size])), np.float32)
                           for s in range(0, len(array), batch_size)])


def rank_nodes(quantizer: OrtQuantizer, candidates: list[str], images: np.ndarray, reference: np.ndarray,
               workdir: str, batch_size: int = 32) -> list[tuple[str, float]]:
    """(node, sensitivity) for each candidate, most sensitive first.

    Sensitivity: the mean cosine distance (:func:`cosine_distance`) of the output embeddings of
    ``images`` to ``reference`` (their fp32 embeddings) when only that node is quantized.
    """
    scores = []
    path = os.path.join(workdir, "ort-rank-one-node.onnx")
    for node in candidates:
        quantizer.quantize(path, only=[node])
        scores.append((node, cosine_distance(_embed(_session(path), images, batch_size), reference)))
    if os.path.exists(path):
        os.unlink(path)
    return sorted(scores, key=lambda t: -t[1])


def quantize_int8_with_accuracy_control(fp32_path: str, out_path: str, calibration, validation,
                                        options: OrtInt8Options | None = None, workdir: str | None = None,
                                        progress: bool = True, batch_size: int = 32) -> dict:
    """Static int8 of ``fp32_path`` into ``out_path``, keeping the most sensitive nodes float until the Recall@1
    drop on ``validation`` (labelled preprocessed images) is within ``options.max_drop``; returns a summary."""
    options = options or OrtInt8Options()
    workdir = workdir or os.path.dirname(os.path.abspath(out_path))
    t0 = time.time()
    quantizer = OrtQuantizer(fp32_path, calibration, options, workdir, progress)
    labels = validation.labels
    val = validation.array
    fp32 = _session(fp32_path)
    ref_r1 = recall_at_1(_embed(fp32, val, batch_size), labels)
    trial = os.path.join(workdir, "ort-accuracy-control-trial.onnx")
    summaries: dict[tuple[str, ...], dict] = {}

    def measure(kept: list[str]) -> tuple[float, float]:
        summaries[tuple(kept)] = quantizer.quantize(trial, keep_float=kept)
        r1 = recall_at_1(_embed(_session(trial), val, batch_size), labels)
        drop = 100.0 * (ref_r1 - r1)
        log.info("onnxruntime int8 accuracy control: %d node(s) kept float%s -> validation Recall@1 %.2f "
                 "(fp32 %.2f), drop %+.2f points (budget %g)", len(kept), f" (+{kept[-1]})" if kept else "",
                 100 * r1, 100 * ref_r1, drop, options.max_drop)
        return r1, drop

    ranking: list[tuple[str, float]] = []
    op_types: dict[str, str] = {}

    def rank() -> list[str]:
        q_model = onnx.load(trial)  # the plain int8 model, just measured
        op_types.update({n.name: n.op_type for n in q_model.graph.node})
        candidates = [n for n in quantized_nodes(q_model) if n not in quantizer.base_exclude]
        n_rank = min(options.ranking_images, len(calibration))
        images = np.ascontiguousarray(calibration.array[:n_rank])
        t_rank = time.time()
        ranking.extend(rank_nodes(quantizer, candidates, images, _embed(fp32, images, batch_size), workdir,
                                  batch_size))
        log.info("onnxruntime int8 accuracy control: ranked %d int8 nodes on %d calibration images in %.0fs; most "
                 "sensitive: %s", len(ranking), n_rank, time.time() - t_rank,
                 ", ".join(f"{n} ({op_types.get(n, '?')}, {s:.2e})" for n, s in ranking[:5]))
        return [n for n, _ in ranking]

    steps, chosen = keep_float_until_within(rank, measure, options.max_drop, options.max_iterations)
    within = chosen.drop <= options.max_drop + 1e-9
    if chosen is steps[-1]:
        shutil.move(trial, out_path)
    else:
        quantizer.quantize(out_path, keep_float=chosen.kept_float)
        os.unlink(trial)
    if not within:
        log.warning("onnxruntime int8 accuracy control: no step within %g points after %d steps; keeping the one "
                    "with the smallest drop (%+.2f, %d node(s) float)", options.max_drop, len(steps) - 1, chosen.drop,
                    len(chosen.kept_float))
    summary = dict(summaries[tuple(chosen.kept_float)])
    summary["calibration_images"] = len(calibration)
    summary["seconds"] = round(time.time() - t0, 1)
    summary["accuracy_control"] = {
        "max_drop": options.max_drop,
        "validation_images": len(validation),
        "reference": "fp32 ONNX on the validation images",
        "reference_recall@1": round(ref_r1, 6),
        "criterion": "mean cosine distance to fp32 of the output embeddings with only that node quantized, on "
                     f"{min(options.ranking_images, len(calibration))} calibration images",
        "ranking": [{"node": n, "op_type": op_types.get(n, "?"), "score": float(f"{s:.4g}")} for n, s in ranking[:20]],
        "ranked_nodes": len(ranking),
        "steps": [s.to_dict() for s in steps],
        "kept_float_nodes": list(chosen.kept_float),
        "drop": round(chosen.drop, 4),
        "within_budget": within,
    }
    log.info("onnxruntime int8 accuracy control: %d node(s) kept float (%s), validation Recall@1 drop %+.2f "
             "points (budget %g), %.0fs", len(chosen.kept_float), ", ".join(chosen.kept_float) or "none",
             chosen.drop, options.max_drop, summary["seconds"])
    return summary


def describe(control: dict) -> str:
    """One line for the manifest notes: the budget, the nodes kept float and the drop after each step."""
    steps = ", ".join(f"{s['kept_float']}: {s['drop']:+.2f}" for s in control["steps"])
    kept = control["kept_float_nodes"]
    return (f"accuracy control: Recall@1 drop <= {control['max_drop']:g} points on {control['validation_images']} "
            f"validation images {'met' if control['within_budget'] else 'NOT met'} with {len(kept)} node(s) kept "
            f"float ({', '.join(kept) or 'none'}); validation drop by number of float nodes: {steps}")
