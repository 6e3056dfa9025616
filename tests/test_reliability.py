"""The attacks of issue 14, each reproduced: odd files through ``ibc-retrieve index`` on a folder
that mixes good and bad ones, resume faults through ``ibc-train``, manifest tampering, and the
code-review findings (export Ks, config validation, eval-only overrides, the error root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdk.cli import main as retrieve
from sdk_helpers import make_bundle, write_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("rel") / "bundle", openvino=False)


def _index(bundle, images, out, *extra):
    res = CliRunner().invoke(retrieve, ["index", str(bundle), str(images), "--out", str(out), *extra])
    assert "Traceback" not in res.output, res.output
    return res


def _entries(catalog) -> dict:
    rows = [json.loads(line) for line in (Path(catalog) / "entries.jsonl").read_text(encoding="utf-8").splitlines()]
    return {uid: meta for _, uid, meta in rows}


# ------------------------------------------------------------------------------ 1. pixel budget
def test_a_1x100000_strip_is_skipped_by_name_and_the_rest_indexed(bundle, tmp_path):
    imgs = tmp_path / "photos"
    write_images(imgs / "a", 3)
    strip = imgs / "a" / "strip.png"
    Image.new("L", (1, 100_000), 128).save(strip, optimize=True)
    assert strip.stat().st_size < 2000  # a few hundred bytes that would resize to 36 x 3.6 M pixels
    res = _index(bundle, imgs, tmp_path / "cat")
    assert res.exit_code == 0, res.output
    assert "indexed 3 images (1 skipped)" in res.output
    line = next(x for x in res.output.splitlines() if x.startswith("skipped"))
    assert "strip.png" in line and "resized to" in line and "over the limit" in line


def test_the_budget_bounds_the_resized_size_not_only_the_decoded_one(tmp_path):
    from sdk.preprocess import ImageError, PreprocessConfig, preprocess_image

    cfg = PreprocessConfig(resize=146, crop=128, max_pixels=10_000_000)
    with pytest.raises(ImageError, match=r"1x100000 would be resized to 146x14600000"):
        preprocess_image(np.full((100_000, 1, 3), 7, np.uint8), cfg)
    # a 1 x 50 strip resizes to 146 x 7300 = 1.07 M pixels: within the budget, still served
    assert preprocess_image(np.full((50, 1, 3), 7, np.uint8), cfg).shape == (3, 128, 128)


# ------------------------------------------------------------------------------ 2. non-UTF-8 names
@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_a_latin1_file_name_is_indexed_under_an_escaped_id(bundle, tmp_path):
    imgs = tmp_path / "photos"
    paths = write_images(imgs / "b", 2)
    latin1 = os.path.join(os.fsencode(imgs / "b"), b"caf\xe9.png")
    synth = Image.open(paths[0]).copy()
    synth.save(os.fsdecode(latin1), format="PNG")
    res = _index(bundle, imgs, tmp_path / "cat")
    assert res.exit_code == 0, res.output
    assert "indexed 3 images (0 skipped)" in res.output
    entries = _entries(tmp_path / "cat")
    assert "b/caf\\xe9.png" in entries and entries["b/caf\\xe9.png"]["label"] == "b"
    res = CliRunner().invoke(retrieve, ["query", str(tmp_path / "cat"), os.fsdecode(latin1), "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["hits"][0]["id"] in ("b/caf\\xe9.png", "b/img_000.png")  # the same pixels


# ------------------------------------------------------------------------------ 3. symlinks
def test_symlink_loops_are_named_and_symlinked_class_folders_followed(bundle, tmp_path):
    from sdk.preprocess import ImageError, load_image

    imgs = tmp_path / "photos"
    write_images(imgs / "c", 2)
    elsewhere = tmp_path / "elsewhere" / "d"
    write_images(elsewhere, 2, start=10)
    (imgs / "linked").symlink_to(elsewhere, target_is_directory=True)  # a class folder kept elsewhere
    (imgs / "c" / "loop.jpg").symlink_to(imgs / "c" / "loop.jpg")  # a file that points at itself
    (imgs / "c" / "up").symlink_to(imgs, target_is_directory=True)  # a folder loop back to the top
    with pytest.raises(ImageError, match="symbolic link loop"):
        load_image(imgs / "c" / "loop.jpg")
    res = _index(bundle, imgs, tmp_path / "cat")
    assert res.exit_code == 0, res.output
    assert "indexed 4 images (1 skipped)" in res.output
    assert any("loop.jpg: symbolic link loop" in x for x in res.output.splitlines())
    entries = _entries(tmp_path / "cat")
    assert sorted(entries) == ["c/img_000.png", "c/img_001.png", "linked/img_010.png", "linked/img_011.png"]
    assert entries["linked/img_010.png"]["label"] == "linked"


# ------------------------------------------------------------------------------ dataset layouts
def test_index_reads_a_standard_dataset_layout(bundle, tmp_path):
    root = tmp_path / "omni"
    for split, alphabet in (("images_background", "Latin"), ("images_evaluation", "Greek")):
        write_images(root / split / alphabet / "character01", 2, start=len(alphabet))
    res = _index(bundle, root, tmp_path / "cat", "--dataset", "omniglot", "--split", "test")
    assert res.exit_code == 0, res.output
    entries = _entries(tmp_path / "cat")
    assert sorted(m["label"] for m in entries.values()) == ["Greek/character01"] * 2
    res = _index(bundle, root, tmp_path / "cat2", "--dataset", "sop")
    assert res.exit_code == 1 and "Ebay_train.txt" in res.output  # a missing index file is named


def test_export_reads_a_checkpoints_dataset_without_the_trainer(tmp_path):
    for c in ("c1", "c2", "c3", "c4"):
        write_images(tmp_path / "data" / c, 2)
    code = ("import sys, export.api, export.images; "
            f"s = export.images.checkpoint_set({{'dataset': 'folder', 'root': {str(tmp_path / 'data')!r}, "
            "'val_fraction': 0}, 'test', 'parity'); assert len(s) == 4, len(s); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ 8. CLI edges
def test_a_folder_of_only_bad_images_fails_and_writes_nothing(bundle, tmp_path):
    imgs = tmp_path / "bad"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (imgs / "b.png").write_bytes(b"")
    res = _index(bundle, imgs, tmp_path / "cat")
    assert res.exit_code == 1 and "none of the 2 images" in res.output
    assert not (tmp_path / "cat").exists()


def test_info_on_a_catalogue_verifies_its_hashes(bundle, tmp_path):
    imgs = tmp_path / "photos"
    write_images(imgs / "e", 3)
    assert _index(bundle, imgs, tmp_path / "cat").exit_code == 0
    with open(tmp_path / "cat" / "entries.jsonl", "r+b") as f:
        f.seek(3)
        f.write(b"9")
    res = CliRunner().invoke(retrieve, ["info", str(tmp_path / "cat")])
    assert res.exit_code == 1 and "entries.jsonl" in res.output and "SHA-256" in res.output


# ------------------------------------------------------------------------------ 7. manifest dim
@pytest.mark.parametrize("dim", ["abc", float("nan"), 16.7, True, 0, -3, None])
def test_manifest_embedding_dim_must_be_a_positive_integer(bundle, tmp_path, dim):
    import shutil

    from sdk.bundle import BundleError, read_manifest

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["embedding_dim"] = dim
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest.json: embedding_dim must be a positive integer"):
        read_manifest(str(b))


def test_a_manifest_dim_the_model_does_not_output_is_refused_at_from_bundle(bundle, tmp_path):
    import shutil

    from sdk import Retriever
    from sdk.bundle import BundleError

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["embedding_dim"] = 8  # the ONNX outputs 16
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"model_fp32.onnx: the model outputs 16-d embeddings but the manifest says "
                                          r"embedding_dim 8"):
        Retriever.from_bundle(b)
    res = CliRunner().invoke(retrieve, ["info", str(b)])
    assert res.exit_code == 1 and "outputs 16-d" in res.output


# ------------------------------------------------------------------------------ code review
def test_export_gates_at_the_datasets_own_ks():
    from export.api import gate_ks
    from trainer.evaluate import default_ks

    assert gate_ks({"data": {"dataset": "sop"}}) == (1, 10, 100, 1000) == default_ks("sop")
    assert gate_ks({"data": {"dataset": "inshop"}}) == (1, 10, 20, 30, 40, 50)
    assert gate_ks({"data": {"dataset": "cub"}}) == (1, 2, 4, 8) == gate_ks({})


def test_augment_interpolation_is_checked_at_load_and_lanczos_trains(tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.transforms import train_transform

    cfg = load_config(None, ["augment.interpolation=lanczos", "augment.size=16"])
    x = train_transform(cfg.augment)(Image.new("RGB", (40, 30), (9, 90, 200)))
    assert tuple(x.shape) == (3, 16, 16)
    with pytest.raises(ConfigError, match="augment.interpolation must be one of nearest, bilinear, bicubic, lanczos"):
        load_config(None, ["augment.interpolation=cubic"])


@pytest.mark.parametrize("given, kept", [(True, True), (False, False), ("true", True), ("auto", "auto")])
def test_validate_keeps_channels_last_a_bool(given, kept):
    from trainer.config import Config

    cfg = Config.from_dict({"runtime": {"channels_last": given}})
    assert cfg.runtime.channels_last == kept and type(cfg.runtime.channels_last) is type(kept)
    assert Config.from_dict(cfg.to_dict()).runtime.channels_last == kept  # a saved config reads back the same


def test_eval_only_refuses_overrides_it_cannot_honour(tmp_path):
    from trainer.config import ConfigError
    from trainer.loop import evaluate_checkpoint

    for overrides, key in (({"model": {"backbone": "resnet50"}}, "model.backbone"),
                           ({"optim": {"lr": 1.0}}, "optim.lr"),
                           ({"runtime": {"amp": "bf16"}}, "runtime.amp")):
        with pytest.raises(ConfigError, match=key):
            evaluate_checkpoint(str(tmp_path / "never-read.pt"), overrides=overrides)


def test_backend_facts_are_defined_once():
    import export.api as api
    import export.openvino_export as ovx
    import export.runners as runners
    import export.tensorrt_export as trx
    import sdk.backends as backends
    from sdk.bundle import PRECISIONS

    assert api.BACKEND_ALIASES is backends.BACKEND_ALIASES and api.PRECISION_ORDER is PRECISIONS
    for p in ("fp32", "fp16", "bf16", "int8"):
        assert ovx.runtime_hints(p) == backends.runtime_hints("openvino", p)
    assert backends.runtime_hints("openvino", "int8", float_precision="bf16") == {"INFERENCE_PRECISION_HINT": "bf16"}
    # one TensorRT runner and one availability check: the exporter's parity gate uses the SDK's
    assert not hasattr(trx, "TensorRTRunner") and not hasattr(trx, "runtime_hints")
    assert runners.TensorRTRunner is backends.TensorRTRunner
    assert trx.tensorrt_status()[0] == backends.runtime_status("tensorrt")[0]
    assert not hasattr(backends, "THROUGHPUT_KEYS")
