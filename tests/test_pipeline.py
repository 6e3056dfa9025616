"""ibc-run's pipeline: the held-out split, resuming, the data-folder message, and one real run end to end.

The slow test runs every stage on a small slice of real Flowers-102 images (6 classes, 64-px
images, one epoch of a few steps) with one variant made to fail its gate, then checks what a
person would: the run finished, the failure is in the report, numbers in report.json are
recomputed here from the saved embeddings, and every file the page references exists.
"""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import held_out_split, require_data, training_config
from pipeline.errors import DataFolderMissing, PipelineError
from pipeline.options import ExportOptions, RunOptions
from pipeline.state import STAGES, first_to_run, resumable, write_done, write_started


def test_held_out_split_never_puts_a_query_in_the_gallery():
    items = [(f"/d/{c}/{i}.jpg", c) for c in range(5) for i in range(c + 1)]  # class 0 has one image
    gallery, queries = held_out_split(items, queries_per_class=2, seed=3)
    assert not {p for p, _ in gallery} & {p for p, _ in queries}
    assert sorted(gallery + queries) == sorted(items)
    per_class = {c: sum(1 for _, y in queries if y == c) for c in range(5)}
    assert per_class == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2}  # a lone image is never a query; >= 1 gallery image stays
    assert held_out_split(items, 2, 3) == (gallery, queries)  # seeded


def test_missing_data_folder_says_where_to_put_it(tmp_path):
    opts = RunOptions(out=str(tmp_path / "run"), data_root=str(tmp_path / "nowhere" / "flowers102"))
    cfg = training_config(opts)
    with pytest.raises(DataFolderMissing) as e:
        require_data(cfg, opts)
    msg = str(e.value)
    assert "nowhere/flowers102" in msg and "images/<label>" in msg and "--folder" in msg


def test_unknown_preset_names_the_presets(tmp_path):
    with pytest.raises(PipelineError, match="flowers102-cpu"):
        RunOptions(out=str(tmp_path), config="no-such-preset").config_path()


def test_resume_starts_at_the_first_unfinished_or_changed_stage(tmp_path):
    out = str(tmp_path)
    inputs = {s: {"v": 1} for s in STAGES}
    assert first_to_run(out, inputs, None)[0] == 0
    for s in STAGES[:3]:
        write_done(out, s, inputs[s], {}, 0.0)
    assert first_to_run(out, inputs, None)[0] == 3
    assert first_to_run(out, {**inputs, "export": {"v": 2}}, None)[0] == 1  # export's options changed
    assert first_to_run(out, inputs, "train")[0] == 0
    with pytest.raises(PipelineError):
        first_to_run(out, inputs, "deploy")


def test_a_killed_stage_keeps_its_partial_output_only_with_the_same_inputs(tmp_path):
    out = str(tmp_path)
    write_started(out, "train", {"config": {"lr": 1}})
    assert resumable(out, "train", {"config": {"lr": 1}})  # e.g. last.pt of a killed training is reused
    assert not resumable(out, "train", {"config": {"lr": 2}})
    write_done(out, "train", {"config": {"lr": 1}}, {}, 0.0)
    assert not resumable(out, "train", {"config": {"lr": 1}})  # finished: nothing to resume


# ------------------------------------------------------------------------------------------ slow


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)


def _slice(shared_data: Path, root: Path, classes=("001", "002", "003", "052", "053", "054"), per_class=16) -> Path:
    """A small real image folder (symlinks): the first 3 classes train, the last 3 are held out."""
    for c in classes:
        files = sorted((shared_data / "flowers102" / "images" / c).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            pytest.skip("flowers102 images missing")
        (root / c).mkdir(parents=True)
        for f in files:
            (root / c / f.name).symlink_to(f)
    return root


def _recall_at_1(q, ql, g=None, gl=None) -> float:
    """Brute-force Recall@1 (leave-one-out when no gallery): the independent reference."""
    if g is None:
        s = q @ q.T
        np.fill_diagonal(s, -np.inf)
        return float(np.mean(ql[np.argmax(s, axis=1)] == ql))
    return float(np.mean(gl[np.argmax(q @ g.T, axis=1)] == ql))


@pytest.mark.slow
def test_pipeline_end_to_end_on_real_images_with_a_failing_variant(shared_data, tmp_path):
    from export.openvino_export import OvInt8Options
    from export.ort_quantize import OrtInt8Options
    from pipeline.runner import run_pipeline

    data = _slice(shared_data, tmp_path / "flowers6")
    out = tmp_path / "run"
    # onnxruntime-int8 is made to fail: every node kept float, so it is no int8 model (the gate refuses it),
    # under a zero int8 tolerance; the other variants go on through the pipeline
    export = ExportOptions(backends="onnx,openvino", precisions="fp32,int8", tolerance="int8=0", calib_size=16,
                           extra={"ort_int8": OrtInt8Options(keep_float=("*",), accuracy_control=False),
                                  "ov_int8": OvInt8Options(accuracy_control=False)})
    opts = RunOptions(out=str(out), config="flowers102-cpu", folder=str(data), export=export, grid_queries=3,
                      tsne_points=200,
                      overrides=["optim.epochs=1", "augment.size=64", "preprocess.resize=72", "preprocess.crop=64",
                                 "sampler.classes_per_batch=3", "sampler.images_per_class=4", "data.num_workers=0",
                                 "runtime.eval_batch_size=32", "model.embed_dim=64"])
    result = run_pipeline(opts)

    assert result.ran == list(STAGES)
    assert "onnxruntime-int8" in result.variants_failed
    assert "onnxruntime-fp32" in result.variants_passed
    report_dir = out / "report"
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["name"]: r for r in report["metrics"]["rows"]}
    assert rows["onnxruntime-int8"]["status"] == "FAIL" and not rows["onnxruntime-int8"]["in_bundle"]
    assert rows["onnxruntime-fp32"]["status"] == "pass"
    assert report["status"]["variants_failed"] == result.variants_failed
    manifest = json.loads((out / "export" / "bundle.ibc" / "manifest.json").read_text())
    assert "onnxruntime-int8" not in [v["name"] for v in manifest["variants"]]  # the bundle ships the passing ones

    # numbers come from the run: recompute them from the saved embeddings, independently
    emb_dir = out / "export" / "embeddings"
    labels = np.asarray(json.loads((emb_dir / "parity.json").read_text())["labels"])
    for name in ("pytorch-fp32 (trained, reference)", "onnxruntime-fp32", "onnxruntime-int8"):
        file = "pytorch-fp32" if name.startswith("pytorch") else name
        r1 = _recall_at_1(np.load(emb_dir / f"{file}.npy"), labels)
        assert rows[name]["metrics"]["recall@1"] == pytest.approx(r1, abs=1e-9)
    q, ql = np.load(out / "query" / "query_embeddings.npy"), np.load(out / "query" / "query_labels.npy")
    g, gl = np.load(out / "catalogue" / "gallery_embeddings.npy"), np.load(out / "catalogue" / "gallery_labels.npy")
    assert report["queries"]["metrics"]["recall@1"] == pytest.approx(_recall_at_1(q, ql, g, gl), abs=1e-9)

    # queries are never in the catalogue, so no query finds itself
    split = json.loads((out / "catalogue" / "split.json").read_text())
    assert not {p for p, _ in split["queries"]} & {p for p, _ in split["gallery"]}
    hits = json.loads((out / "query" / "hits.json").read_text())
    assert all(h["path"] != rec["query"] for rec in hits for h in rec["hits"])
    assert len(report["queries"]["grid"]) == 3 and all(len(g["hits"]) == 5 for g in report["queries"]["grid"])

    # every file the page references exists, and nothing is fetched from elsewhere
    parser = _Refs()
    parser.feed((report_dir / "index.html").read_text())
    assert len(parser.refs) >= 3 + 3 * 6  # curves, map, throughput, the grid's thumbnails
    for ref in parser.refs:
        assert "://" not in ref and not ref.startswith("/"), ref
        assert (report_dir / ref).is_file(), ref
    assert "onnxruntime-int8" in (report_dir / "index.html").read_text()

    # the log file holds lines, not progress-bar frames
    log_text = (out / "run.log").read_text()
    assert "\r" not in log_text and "export: onnxruntime-int8 FAIL" in log_text
    assert "\r" not in (out / "train" / "train.log").read_text()  # runtime.progress is on, stderr is no terminal

    # a rerun resumes: nothing left to do; --from report redoes the report only
    again = run_pipeline(opts)
    assert again.ran == [] and again.reused == list(STAGES)
    opts.from_stage = "report"
    assert run_pipeline(opts).ran == ["report"]


@pytest.mark.parametrize("method,sets", [("ibc", {}), ("group_loss", {}), ("pml", {"loss": "proxy_anchor"})])
def test_report_loss_curve_draws_the_parts_the_method_reports(tmp_path, method, sets):
    """The report's loss plot follows the method's own loss parts, not IBC's two cross-entropies."""
    from pipeline.figures import loss_curve
    from trainer.methods import get_method

    cls = get_method(method)
    parts = cls.loss_parts(cls.config_class(name=method, **sets))
    history = [{"epoch": e, "loss": 3.0 - e, **{k: (1.0 + i) / (e + 1) for i, k in enumerate(parts)}}
               for e in range(3)]
    series = loss_curve(history, str(tmp_path / "loss.png"), parts)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert set(series) == {"loss", *parts} and parts
    if method == "pml":
        assert set(parts) == {"loss_proxy_anchor"}
    assert [v for _, v in series["loss"]] == [3.0, 2.0, 1.0]


def test_cli_missing_data_is_one_line_and_exit_1(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["--out", str(tmp_path / "run"), "--data-root", str(tmp_path / "nope")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("ibc-run: data folder") and "Traceback" not in res.output
    assert not (tmp_path / "run" / "train").exists()  # nothing ran


def test_zero_shot_row_appears_when_the_trainer_recorded_a_baseline():
    from pipeline.report_stage import baseline_metrics

    assert baseline_metrics({"test": {"recall@1": 0.5}}) is None  # no baseline: no row
    assert baseline_metrics({"baseline": {"test": {"recall@1": 0.31, "nmi": 0.4}}}) == {"recall@1": 0.31, "nmi": 0.4}
    assert baseline_metrics({"baseline": {"recall@1": 0.31, "epoch": 0, "note": "x"}}) == {"recall@1": 0.31,
                                                                                          "epoch": 0.0}
