"""sdk.Retriever on a tiny real bundle: runtime/variant choice, embeddings vs a numpy reference,
image input forms, bad images (all-or-nothing or skip), catalogue round trip and model checks."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sdk.backends
from sdk import Retriever
from sdk.backends import BackendError, plan
from sdk.bundle import BundleError, load_manifest
from sdk.catalog import CatalogFormatError, CatalogMismatchError, DuplicateIdError, UnknownIdError, VectorError
from sdk.preprocess import ImageError
from sdk_helpers import make_bundle, reference_for_images, synthetic_image, write_images

HAS_OPENVINO = __import__("importlib").util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", openvino=HAS_OPENVINO)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 24)


def test_from_bundle_picks_and_reports(bundle):
    r = Retriever.from_bundle(bundle)
    info = r.info()
    expected = "openvino" if HAS_OPENVINO else "onnxruntime"  # no TensorRT/GPU here
    assert info["backend"] == expected and info["precision"] == "fp32" and info["parity"]["passed"]
    assert info["manifest_digest"] == load_manifest(bundle).digest() and info["embedding_dim"] == 16
    if HAS_OPENVINO:  # the fp32 variant is not silently run in bf16
        assert info["runner"]["config"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert info["runner"]["inference_precision"] == "f32"
    r2 = Retriever.from_bundle(bundle, backend="onnxruntime", threads=1)
    assert r2.info()["backend"] == "onnxruntime" and r2.info()["runner"]["threads"] == 1
    with pytest.raises(BundleError, match="no onnxruntime int8 variant"):
        Retriever.from_bundle(bundle, backend="onnxruntime", precision="int8")
    with pytest.raises(BackendError, match="backend must be"):
        Retriever.from_bundle(bundle, backend="cuda")


def test_variant_choice_follows_parity_gate_and_speed(tmp_path):
    passed = load_manifest(make_bundle(tmp_path / "p", openvino=False, int8_passed=True))
    cands, _ = plan(passed, "onnxruntime")
    assert [c.variant.name for c in cands] == ["onnxruntime-int8", "onnxruntime-fp32"]
    failed = load_manifest(make_bundle(tmp_path / "f", openvino=False, int8_passed=False))
    cands, notes = plan(failed, "auto")
    assert [c.variant.name for c in cands] == ["onnxruntime-fp32"]
    assert any("int8" in n and "parity gate" in n for n in notes)
    r = Retriever.from_bundle(tmp_path / "f")
    assert r.variant.name == "onnxruntime-fp32" and any("int8" in n for n in r.info()["passed_over"])
    # a throughput measured by the exporter beats the static order
    measured = load_manifest(make_bundle(tmp_path / "m", openvino=False, int8_passed=True,
                                         parity_extra={"images_per_s": 1e6}))
    assert plan(measured, "onnxruntime")[0][0].variant.name == "onnxruntime-fp32"


def _u8s8(host_exact: bool, scheme: str = "u8s8") -> dict:
    return {"quantization": {"options": {"scheme": scheme}, "host_int8_dot_exact": host_exact}}


@pytest.mark.parametrize("exact_here", [True, False])
def test_u8s8_int8_gated_on_a_vnni_cpu_is_passed_over_where_u8s8_saturates(tmp_path, monkeypatch, caplog, exact_here):
    monkeypatch.setattr(sdk.backends, "int8_dot_exact", lambda: exact_here)
    gated_exact = load_manifest(make_bundle(tmp_path / "u", openvino=False, int8_passed=True, int8_build=_u8s8(True)))
    cands, notes = plan(gated_exact, "onnxruntime")
    names = [c.variant.name for c in cands]
    if exact_here:
        assert names == ["onnxruntime-int8", "onnxruntime-fp32"] and not notes
    else:
        assert names == ["onnxruntime-fp32"]
        assert any(n.startswith("onnxruntime-int8: skipped") and "saturates on this one" in n for n in notes)
        with caplog.at_level("WARNING", logger="sdk.backends"):  # asked for by precision: used, with a warning
            assert plan(gated_exact, "onnxruntime", "int8")[0][0].variant.name == "onnxruntime-int8"
        assert "saturates" in caplog.text
    # measured under saturation (a U8S8 gated on such a CPU), or S8S8: the gate's numbers hold anywhere
    for i, build in enumerate([_u8s8(False), _u8s8(True, "s8s8")]):
        m = load_manifest(make_bundle(tmp_path / f"k{i}", openvino=False, int8_passed=True, int8_build=build))
        assert [c.variant.name for c in plan(m, "onnxruntime")[0]] == ["onnxruntime-int8", "onnxruntime-fp32"]


def test_tampered_bundle_and_unknown_schema_are_refused(tmp_path):
    b = make_bundle(tmp_path / "b", openvino=False)
    model = b / "onnx" / "model_fp32.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="model_fp32.onnx.*SHA-256"):
        Retriever.from_bundle(b)
    b2 = make_bundle(tmp_path / "b2", openvino=False)
    data = json.loads((b2 / "manifest.json").read_text())
    data["schema_version"] = 2
    (b2 / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="unknown bundle schema version 2"):
        Retriever.from_bundle(b2)


def test_embed_matches_reference_on_every_backend_and_input_form(bundle, images):
    ref = reference_for_images(images[:5])
    backends = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])
    for backend in backends:
        r = Retriever.from_bundle(bundle, backend=backend)
        e = r.embed(images[:5], batch_size=2)
        assert e.dtype == np.float32 and e.shape == (5, 16)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(e, ref, atol=1e-5)
    r = Retriever.from_bundle(bundle, decode_workers=0)
    pil = Image.open(images[0])
    forms = [str(images[0]), images[0], images[0].read_bytes(), pil, np.asarray(pil.convert("RGB"))]
    embs = np.stack([r.embed(f)[0] for f in forms])
    np.testing.assert_allclose(embs, np.repeat(ref[:1], len(forms), 0), atol=1e-5)
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[:3]])  # N x H x W x 3 uint8
    np.testing.assert_allclose(r.embed(batch), ref[:3], atol=1e-5)
    assert r.embed([]).shape == (0, 16)
    with pytest.raises(VectorError, match="takes images"):
        r.embed(np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        r.embed(images[:2], batch_size=0)


def test_add_and_search_by_image_and_vector(bundle, images):
    r = Retriever.from_bundle(bundle)
    rep = r.add(images[:20], ids=[p.stem for p in images[:20]], metadata=[{"i": i} for i in range(20)])
    assert rep.ids == [p.stem for p in images[:20]] and rep.skipped == [] and len(r) == 20
    hits = r.search(images[:4], k=3)
    assert [row[0].id for row in hits] == [p.stem for p in images[:4]]
    assert all(abs(row[0].score - 1) < 1e-5 for row in hits) and hits[2][0].metadata == {"i": 2}
    vecs = r.embed(images[:4])
    assert r.search(vecs, k=3) == hits  # vectors and images give the same answer
    q = r.embed(images[20:24])
    db = r.embed(images[:20])
    true = np.argsort(-(q @ db.T), axis=1)[:, :5]
    _, raw = r.search_raw(images[20:24], k=5)
    assert raw.tolist() == [[images[j].stem for j in row] for row in true]
    r.add(vecs[:1] * 3, ids=["vec"])  # a vector entry in an image catalogue
    assert r.search(images[0], k=2)[0][1].id in ("vec", images[0].stem)
    with pytest.raises(DuplicateIdError, match="img_000"):
        r.add(images[:1], ids=["img_000"])
    with pytest.raises(UnknownIdError, match="nope"):
        r.remove(["nope"])
    assert r.remove(["img_000", "vec"]) == 2
    assert r.search(images[0], k=1)[0][0].id != "img_000"


def test_bad_images_all_or_nothing_or_skip(bundle, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:40])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    items = [images[0], broken, images[1], empty, b"\x89PNG garbage", text, tmp_path / "missing.jpg", images[2]]
    r = Retriever.from_bundle(bundle)
    with pytest.raises(ImageError, match=r"broken\.jpg.*item 1 of 8; nothing was added"):
        r.add(items, ids=[f"x{i}" for i in range(len(items))])
    assert len(r) == 0
    rep = r.add(items, ids=[f"x{i}" for i in range(len(items))], metadata=[{"i": i} for i in range(len(items))],
                on_error="skip")
    assert rep.ids == ["x0", "x2", "x7"] and len(r) == 3
    assert [s[0] for s in rep.skipped] == [1, 3, 4, 5, 6]
    assert "broken.jpg" in rep.skipped[0][1] and "empty" in rep.skipped[1][2]
    assert r.search(images[2], k=1)[0][0].metadata == {"i": 7}  # metadata stays aligned with ids
    with pytest.raises(ImageError, match="missing.jpg.*no such file"):
        r.search([images[0], tmp_path / "missing.jpg"])
    with pytest.raises(VectorError, match="dtype int32"):
        r.add(np.ones((2, 16), np.int32))
    with pytest.raises(VectorError, match="dimension 8"):
        r.search(np.ones((1, 8), np.float32))


def test_save_load_and_model_mismatch(bundle, images, tmp_path):
    r = Retriever.from_bundle(bundle, index="hnsw", hnsw_m=8)
    r.add(images[:12], ids=list(range(100, 112)))
    before = r.search(images[12:16], k=4)
    out = tmp_path / "cat"
    assert r.save(out) == str(out)
    back = Retriever.load(out)  # finds its bundle from the record
    assert back.search(images[12:16], k=4) == before and back.catalog.kind == "hnsw"
    assert back.add(images[12:13]).ids == [112]
    # the bundle moved: pass it explicitly
    moved = tmp_path / "moved_bundle"
    shutil.copytree(bundle, moved)
    assert len(Retriever.load(out, bundle=moved)) == 12
    shutil.rmtree(moved)
    header = json.loads((out / "catalog.json").read_text())
    header["model"]["bundle"] = str(moved)
    from sdk.catalog.persistence import header_digest

    header["header_sha256"] = header_digest(header)  # a consistent catalogue whose bundle has gone
    (out / "catalog.json").write_text(json.dumps(header))
    with pytest.raises(BundleError, match="not there any more; pass bundle="):
        Retriever.load(out)
    # another model (other weights, same shapes) is refused with a clear message
    other = make_bundle(tmp_path / "other", seed=5, openvino=False)
    with pytest.raises(CatalogMismatchError, match="built with model .* not comparable"):
        Retriever.load(out, bundle=other)
    wider = make_bundle(tmp_path / "wider", dim=24, openvino=False)
    with pytest.raises(CatalogMismatchError, match="dim 16.*dim 24"):
        Retriever.load(out, bundle=wider)
    # a partial write: catalogue folder without its header
    os.remove(out / "catalog.json")
    with pytest.raises(CatalogFormatError, match="partial write"):
        Retriever.load(out, bundle=bundle)


def test_input_forms_are_told_apart():
    from sdk.retriever import split_input

    assert split_input(np.zeros((2, 16), np.float32))[0] == "vectors"
    assert split_input([[0.1] * 16, [0.2] * 16])[0] == "vectors"
    assert split_input(np.zeros((5, 7, 3), np.uint8))[0] == "images"
    kind, items = split_input(np.zeros((4, 5, 7, 3), np.uint8))
    assert kind == "images" and len(items) == 4
    assert split_input("a.jpg") == ("images", ["a.jpg"])
    assert split_input(io.BytesIO(b"x").getvalue())[0] == "images"
    assert split_input([synthetic_image(0)])[0] == "images"
    with pytest.raises(VectorError, match="int64"):
        split_input(np.zeros((2, 16), np.int64))


def test_odd_but_valid_images_are_embedded(bundle, tmp_path):
    base = synthetic_image(3)
    files = {
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.gif": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "sixteen.png": Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)),
        "tiny.png": base.resize((3, 2)),
    }
    paths = []
    for name, img in files.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    r = Retriever.from_bundle(bundle)
    e = r.embed(paths)
    assert e.shape == (len(paths), 16) and np.isfinite(e).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # 16-bit and 8-bit grayscale of the same picture give the same embedding
    np.testing.assert_allclose(e[0], e[4], atol=1e-4)
    np.testing.assert_allclose(r.embed(np.asarray(base.convert("L")))[0], e[0], atol=1e-5)  # HxW uint8 array
