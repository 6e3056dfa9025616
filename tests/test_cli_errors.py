"""One error root: every CLI, in a subprocess, over a table of bad inputs.

Each case asserts the documented exit code (ibc-retrieve 1, ibc-export 1, ibc-train 2), that the
error is one line on stderr (the last one) naming the file or key at fault, and that no
"Traceback" appears anywhere. Progress lines (ibc-retrieve's "model: ...", "skipped ...";
logging at INFO/WARNING) may precede the error line; they are not errors.

The resume cases are the attack of issue 14 item 4: ``--resume`` with ``last.pt`` missing or a
directory used to start a new run over the old one (exit 0), another batch size was a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from _trainer_helpers import make_image_folder, register_tiny_backbones, tiny_config, tiny_overrides
from sdk_helpers import make_bundle, write_images

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "_trainer_helpers.py"
ENTRY = {"ibc-retrieve": ["-m", "sdk.cli"], "ibc-export": ["-m", "export.cli"], "ibc-train": ["-m", "trainer.cli"],
         "ibc-run": ["-m", "pipeline.cli"],
         "ibc-train (tiny backbones)": [str(HELPER), "record"]}
EXIT = {"ibc-retrieve": 1, "ibc-export": 1, "ibc-train": 2, "ibc-train (tiny backbones)": 2, "ibc-run": 1}
PREFIX = {"ibc-retrieve": r"^Error: ", "ibc-export": r"^ibc-export: ", "ibc-train": r"^\d\d:\d\d:\d\d ERROR ",
          "ibc-run": r"^ibc-run: ",
          "ibc-train (tiny backbones)": r"^\d\d:\d\d:\d\d ERROR "}
PROGRESS = re.compile(r"^(model: |skipped |\d\d:\d\d:\d\d (INFO|WARNING) |(INFO|WARNING) [\w.]+: )")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Real inputs: a bundle, images, a catalogue, a finished tiny training run and tampered copies."""
    from sdk.cli import main as retrieve
    from trainer.loop import train

    base = tmp_path_factory.mktemp("cli-errors")
    bundle = make_bundle(base / "bundle", openvino=False)
    photos = base / "photos"
    write_images(photos / "a", 4)
    cat = base / "catalog"
    assert CliRunner().invoke(retrieve, ["index", str(bundle), str(photos), "--out", str(cat)]).exit_code == 0

    bad_only = base / "bad-only"
    bad_only.mkdir()
    (bad_only / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (bad_only / "y.png").write_bytes(b"")
    no_manifest = base / "no-manifest"
    shutil.copytree(bundle, no_manifest)
    (no_manifest / "manifest.json").unlink()
    tampered = base / "tampered"
    shutil.copytree(bundle, tampered)
    with open(tampered / "onnx" / "model_fp32.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    bad_dim = base / "bad-dim"
    shutil.copytree(bundle, bad_dim)
    m = json.loads((bad_dim / "manifest.json").read_text())
    m["embedding_dim"] = "abc"
    (bad_dim / "manifest.json").write_text(json.dumps(m))
    bad_cat = base / "bad-catalog"
    shutil.copytree(cat, bad_cat)
    with open(bad_cat / "entries.jsonl", "r+b") as f:
        f.seek(3)
        f.write(b"7")
    empty = base / "empty"
    empty.mkdir()

    register_tiny_backbones()
    data = make_image_folder(base / "data")
    run = base / "run"
    train(tiny_config(data, **{"optim.epochs": 1}), str(run))
    truncated = base / "truncated.pt"
    truncated.write_bytes((run / "last.pt").read_bytes()[:4096])
    foreign = base / "foreign.pt"
    foreign.write_text("not a checkpoint\n")
    no_last = base / "no-last"
    no_last.mkdir()
    shutil.copy(run / "config.yaml", no_last / "config.yaml")
    (no_last / "metrics.jsonl").write_text('{"epoch": 1, "kept": true}\n')
    dir_last = base / "dir-last"
    dir_last.mkdir()
    shutil.copy(run / "config.yaml", dir_last / "config.yaml")
    (dir_last / "last.pt").mkdir()
    other_batch = base / "other-batch"
    shutil.copytree(run, other_batch)
    return {k: str(v) for k, v in locals().items() if isinstance(v, Path)}


CASES = [
    # (case, cli, args with {placeholders}, must appear in the error line)
    ("bundle without manifest", "ibc-retrieve", "index {no_manifest} {photos} --out {base}/o1", ["no-manifest",
                                                                                                   "manifest.json"]),
    ("tampered model file", "ibc-retrieve", "index {tampered} {photos} --out {base}/o2", ["model_fp32.onnx",
                                                                                          "SHA-256"]),
    ("manifest embedding_dim 'abc'", "ibc-retrieve", "index {bad_dim} {photos} --out {base}/o3",
     ["manifest.json", "embedding_dim"]),
    ("folder of only bad images", "ibc-retrieve", "index {bundle} {bad_only} --out {base}/o4",
     ["none of the 2 images", "bad-only"]),
    ("tampered catalogue, info", "ibc-retrieve", "info {bad_cat}", ["entries.jsonl", "SHA-256"]),
    ("not a catalogue, info", "ibc-retrieve", "info {empty}", ["empty", "catalog.json"]),
    ("missing query image", "ibc-retrieve", "query {cat} {base}/nope.jpg", ["nope.jpg", "no such file"]),
    ("k = 0", "ibc-retrieve", "query {cat} {photos}/a/img_000.png -k 0", ["k must be a positive integer"]),
    ("hnsw dims > dim", "ibc-retrieve", "index {bundle} {photos} --out {base}/o5 --index hnsw --hnsw-dims 64",
     ["dimension 16"]),
    ("existing --out", "ibc-retrieve", "index {bundle} {photos} --out {cat}", ["catalog", "already exists"]),

    ("missing checkpoint", "ibc-export", "{base}/missing.pt --out {base}/e1", ["missing.pt"]),
    ("truncated checkpoint", "ibc-export", "{truncated} --out {base}/e2", ["truncated.pt"]),
    ("text file as checkpoint", "ibc-export", "{foreign} --out {base}/e3", ["foreign.pt"]),
    ("TensorRT absent", "ibc-export", "{run}/last.pt --out {base}/e4 --backend tensorrt", ["tensorrt"]),
    ("unknown backend", "ibc-export", "{run}/last.pt --out {base}/e5 --backend onnx,fpga", ["'fpga'"]),
    ("bad tolerance", "ibc-export", "{run}/last.pt --out {base}/e6 --tolerance int8=lots", ["lots"]),
    ("existing --out", "ibc-export", "{run}/last.pt --out {cat}", ["catalog", "already exists"]),

    ("missing config file", "ibc-train", "--config {base}/nope.yaml --out {base}/t1", ["nope.yaml"]),
    ("unknown config key", "ibc-train", "--out {base}/t2 --set optim.lrr=1", ["optim.lrr"]),
    ("missing data root", "ibc-train", "--out {base}/t3 --data-root {base}/no-data", ["no-data"]),
    ("--resume, no run folder", "ibc-train", "--out {base}/t4 --resume", ["config.yaml"]),
    ("--resume, last.pt missing", "ibc-train (tiny backbones)", "--out {no_last} --resume",
     ["no-last/last.pt", "does not exist"]),
    ("--resume, last.pt a directory", "ibc-train (tiny backbones)", "--out {dir_last} --resume",
     ["dir-last/last.pt", "is a directory"]),
    ("--resume, other batch size", "ibc-train (tiny backbones)",
     "--out {other_batch} --resume --set sampler.images_per_class=2", ["other-batch/last.pt", "batch size"]),
    ("--eval-only --set model.backbone", "ibc-train", "--eval-only {run}/last.pt --set model.backbone=resnet50",
     ["model.backbone"]),
    ("--eval-only missing checkpoint", "ibc-train", "--eval-only {base}/gone.pt", ["gone.pt"]),
    ("pretrained weights absent", "ibc-train",
     "--out {base}/t5 " + " ".join(f"--set {o}" for o in tiny_overrides(Path("{data}"), **{
         "model.backbone": "resnet18", "model.pretrained": "{base}/no-weights.pth"})), ["no-weights.pth"]),

    ("missing data folder", "ibc-run", "--out {base}/r1 --data-root {base}/no-flowers", ["no-flowers"]),
    ("unknown preset", "ibc-run", "--out {base}/r2 --config no-such-preset", ["no-such-preset"]),
    ("unknown config key", "ibc-run", "--out {base}/r3 --folder {data} --set optim.lrr=1", ["optim.lrr"]),

    # usage errors: click's exit code 2, but one line too
    ("no such bundle folder", "ibc-retrieve", "index {base}/gone.ibc {photos} --out {base}/o6",
     ["gone.ibc", "does not exist"], 2),
    ("calib size 0", "ibc-export", "{run}/last.pt --out {base}/e7 --calib-size 0", ["--calib-size"], 2),
    ("unknown option", "ibc-train", "--out {base}/t6 --epochs 3", ["--epochs"], 2),
]
USAGE_PREFIX = r"^Error: "


@pytest.mark.parametrize("case, cli, args, names, rc", [c if len(c) == 5 else (*c, None) for c in CASES],
                         ids=[f"{c[1].split()[0]}: {c[0]}" for c in CASES])
def test_bad_input_gives_one_line_and_the_documented_exit_code(w, case, cli, args, names, rc):
    argv = [a.format(**w) for a in args.split()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, *ENTRY[cli], *argv], cwd=w["base"], env=env, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == (rc or EXIT[cli]), out
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(USAGE_PREFIX if rc == 2 else PREFIX[cli], x)]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
    assert all(PROGRESS.match(x) for x in lines[:-1]), res.stderr  # nothing else: no second error line
    for name in names:
        assert name.format(**w) in errors[0], errors[0]
    if case == "--resume, last.pt missing":  # the old run's history is left alone
        assert Path(w["no_last"], "metrics.jsonl").read_text() == '{"epoch": 1, "kept": true}\n'
        assert not Path(w["no_last"], "final_metrics.json").exists()
