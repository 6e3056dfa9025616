"""ibc-retrieve (index / query / info), the PNG grid helper, and the SDK's torch-free import."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdk.cli import main
from sdk_helpers import make_bundle, write_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    bundle = make_bundle(base / "bundle", openvino=False)
    imgs = base / "photos"
    write_images(imgs / "roses", 6, start=0)
    write_images(imgs / "tulips", 6, start=6, ext="jpg")
    (imgs / "tulips" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (imgs / "readme.txt").write_text("not an image, ignored")
    return base, bundle, imgs


def test_index_then_query(setup):
    base, bundle, imgs = setup
    out = base / "catalog"
    runner = CliRunner()
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "indexed 12 images (1 skipped)" in res.output and "broken.jpg" in res.output
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(base / "strict"), "--on-error", "raise"])
    assert res.exit_code == 1 and "broken.jpg" in res.output and "Traceback" not in res.output
    assert not (base / "strict").exists()

    q = imgs / "tulips" / "img_007.jpg"
    res = runner.invoke(main, ["query", str(out), str(q), "-k", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == str(q) and "tulips/img_007.jpg  [tulips]" in lines[1] and len(lines) == 4

    res = runner.invoke(main, ["query", str(out), str(q), str(imgs / "roses" / "img_001.png"), "-k", "2", "--json"])
    data = json.loads(res.output)
    assert [d["hits"][0]["id"] for d in data] == ["tulips/img_007.jpg", "roses/img_001.png"]
    assert data[1]["hits"][0]["metadata"]["label"] == "roses" and abs(data[1]["hits"][0]["score"] - 1) < 1e-5

    grid = base / "grid.png"
    res = runner.invoke(main, ["query", str(out), str(q), "-k", "4", "--grid", str(grid)])
    assert res.exit_code == 0, res.output
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 50

    res = runner.invoke(main, ["query", str(out), str(base / "nope.jpg")])
    assert res.exit_code == 1 and "nope.jpg" in res.output and "no such file" in res.output
    res = runner.invoke(main, ["query", str(out), str(q), "-k", "0"])
    assert res.exit_code == 1 and "k must be a positive integer" in res.output
    other = make_bundle(base / "other", seed=9, openvino=False)
    res = runner.invoke(main, ["query", str(out), str(q), "--bundle", str(other)])
    assert res.exit_code == 1 and "not comparable" in res.output

    res = runner.invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "12 entries" in res.output
    res = runner.invoke(main, ["info", str(bundle)])
    assert res.exit_code == 0 and "onnxruntime-fp32" in res.output and "passed" in res.output


def test_index_with_a_projected_hnsw(setup):
    base, bundle, imgs = setup
    runner = CliRunner()
    out = base / "catalog-hnsw"
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(out), "--index", "hnsw", "--hnsw-dims", "4"])
    assert res.exit_code == 0, res.output
    q = imgs / "tulips" / "img_007.jpg"
    res = runner.invoke(main, ["query", str(out), str(q), "-k", "1", "--json"])
    assert json.loads(res.output)[0]["hits"][0]["id"] == "tulips/img_007.jpg"
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(base / "c2"), "--index", "hnsw",
                               "--hnsw-dims", "14"])  # more dims than 12 images can teach a projection
    assert res.exit_code == 1 and "needs at least 14 vectors" in res.output and "Traceback" not in res.output
    assert not (base / "c2").exists()
    res = runner.invoke(main, ["index", str(bundle), str(imgs), "--out", str(base / "c3"), "--index", "hnsw",
                               "--hnsw-dims", "64"])
    assert res.exit_code == 1 and "more than the vectors' dimension 16" in res.output and "Traceback" not in res.output


def test_grid_helper_draws_labels_and_missing_images(tmp_path):
    from sdk.catalog import Hit
    from sdk.viz import save_grid

    img = write_images(tmp_path, 2)
    hits = [[Hit("a", 0.99, {"path": str(img[0]), "label": 1}), Hit("b", 0.5, {"path": str(tmp_path / "gone.png")})],
            [Hit("c", 0.7, None)]]
    out = save_grid(tmp_path / "g" / "grid.png", [img[0], np.asarray(Image.open(img[1]))], hits, query_labels=[1, 2])
    with Image.open(out) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="2 queries but 1 hit lists"):
        save_grid(tmp_path / "x.png", img, hits[:1])


def test_sdk_never_imports_torch_or_training_code(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    write_images(tmp_path / "imgs", 3)
    code = textwrap.dedent(f"""
        import sys
        from sdk import Retriever
        import sdk.backends, sdk.catalog, sdk.cli, sdk.viz, sdk.preprocess, sdk.bundle
        r = Retriever.from_bundle({str(bundle)!r})
        r.add([{str(tmp_path / 'imgs' / 'img_000.png')!r}, {str(tmp_path / 'imgs' / 'img_001.png')!r}])
        r.search({str(tmp_path / 'imgs' / 'img_002.png')!r}, k=1)
        r.save({str(tmp_path / 'cat')!r})
        Retriever.load({str(tmp_path / 'cat')!r})
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'models', 'trainer', 'export'))
        print('BAD', bad)
        sys.exit(1 if bad else 0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BAD []" in res.stdout
