"""sdk.preprocess: agreement with torchvision, and every odd or broken image a user may give."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdk.preprocess import (
    ImageError,
    PreprocessConfig,
    load_image,
    preprocess_batch,
    preprocess_image,
)


@pytest.mark.parametrize("resize,crop", [(256, 227), (256, 224), (72, 64), (100, 128)])
def test_matches_torchvision_resize_centercrop_normalize(flowers_images, resize, crop):
    """Tolerance: exact (max abs diff 0) — same PIL resize, same crop rounding, float32 maths."""
    from models._torchvision import torchvision  # noqa: F401 - the project's only torchvision entry
    import torchvision.transforms as T

    cfg = PreprocessConfig(resize=resize, crop=crop)
    ref = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    for f in flowers_images:
        ours = preprocess_image(f, cfg)
        theirs = ref(Image.open(f).convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, crop, crop)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_batch_and_layouts(flowers_images):
    cfg = PreprocessConfig(resize=64, crop=56)
    batch = preprocess_batch(flowers_images[:3], cfg)
    assert batch.shape == (3, 3, 56, 56)
    nhwc = preprocess_image(flowers_images[0], PreprocessConfig(resize=64, crop=56, layout="NHWC"))
    np.testing.assert_array_equal(nhwc, batch[0].transpose(1, 2, 0))
    bgr = preprocess_image(flowers_images[0], PreprocessConfig(resize=64, crop=56, color="BGR"))
    np.testing.assert_array_equal(bgr, batch[0][::-1])
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], cfg)


def test_sources_paths_bytes_pil_arrays_agree(flowers_images):
    f = flowers_images[0]
    cfg = PreprocessConfig(resize=64, crop=56)
    by_path = preprocess_image(f, cfg)
    np.testing.assert_array_equal(preprocess_image(str(f), cfg), by_path)
    np.testing.assert_array_equal(preprocess_image(f.read_bytes(), cfg), by_path)
    np.testing.assert_array_equal(preprocess_image(Image.open(f), cfg), by_path)
    np.testing.assert_array_equal(preprocess_image(np.asarray(Image.open(f).convert("RGB")), cfg), by_path)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_odd_modes_become_rgb():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 30, 10)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    got = np.asarray(load_image(buf.getvalue()))
    assert got.shape == (20, 30, 3) and abs(int(got[5, 2, 0]) - 200) < 12

    # alpha composited on white: a fully transparent pixel is white, an opaque one keeps its colour
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(_png(Image.fromarray(rgba, "RGBA"))))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.info["transparency"] = 0
    assert load_image(_png(pal)).mode == "RGB"

    gray = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    assert tuple(np.asarray(load_image(_png(gray)))[0, 0]) == (77, 77, 77)
    one_bit = gray.convert("1")
    assert load_image(_png(one_bit)).mode == "RGB"
    la = Image.fromarray(np.full((8, 8, 2), 255, np.uint8), "LA")
    assert load_image(_png(la)).mode == "RGB"


def test_16bit_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], np.uint16).repeat(3, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # wide image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(path).size == (10, 20)


def test_broken_images_raise_one_clear_error(tmp_path, flowers_images):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(flowers_images[0].read_bytes()[:2000])
    cases = {
        empty: "0 bytes",
        junk: "not a recognised image",
        truncated: "truncated",
        tmp_path / "missing.jpg": "no such file",
        tmp_path: "directory",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageError, match=reason) as info:
            preprocess_image(path)
        assert str(path) in str(info.value)  # names the file
    with pytest.raises(ImageError, match="empty data"):
        load_image(b"")
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(path, max_pixels=1_000_000)
    assert "bomb.png" in str(info.value)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(resize=144, crop=128, interpolation="bicubic")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(interpolation="magic")
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"resize": 1, "bogus": 2})


def test_sdk_imports_without_torch():
    code = "import sdk, sdk.metrics, sdk.preprocess, sdk.bundle, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
