"""sdk.decode: the cheaper decode paths stay within what README and bench/RESULTS.md promise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdk.decode import fast_preprocess
from sdk.preprocess import ImageError, PreprocessConfig, preprocess_image

ONE_LEVEL = 1 / 255 / min(PreprocessConfig().std) + 1e-6  # one grey level after normalisation


@pytest.mark.parametrize("resize,crop", [(146, 128), (256, 227), (72, 64)])
def test_crop_first_is_within_one_grey_level_of_the_exact_path(flowers_images, resize, crop):
    cfg = PreprocessConfig(resize=resize, crop=crop)
    for f in flowers_images:
        exact, fast = preprocess_image(f, cfg), fast_preprocess(f, cfg)
        assert fast.shape == exact.shape and fast.dtype == np.float32
        diff = np.abs(fast - exact)
        assert diff.max() <= ONE_LEVEL
        assert (diff > 1e-6).mean() < 0.05  # nearly every value is the exact one


def test_draft_decodes_large_jpegs_smaller_and_leaves_small_ones_alone(tmp_path, flowers_images):
    cfg = PreprocessConfig(resize=146, crop=128)
    # a 256-px Flowers image is less than twice the resize size: draft changes nothing
    f = flowers_images[0]
    np.testing.assert_array_equal(fast_preprocess(f, cfg, draft=True), fast_preprocess(f, cfg))
    # a 4x larger JPEG is decoded at reduced scale: close to, not equal to, the exact tensor
    big = tmp_path / "big.jpg"
    with Image.open(f) as im:
        im.convert("RGB").resize((im.size[0] * 4, im.size[1] * 4), Image.Resampling.BICUBIC).save(big, quality=92)
    exact, drafted = preprocess_image(big, cfg), fast_preprocess(big, cfg, draft=True)
    assert drafted.shape == exact.shape
    assert 0 < np.abs(drafted - exact).mean() < 0.1


def test_errors_name_the_source(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for draft in (False, True):
        with pytest.raises(ImageError, match="broken.jpg"):
            fast_preprocess(bad, PreprocessConfig(), draft=draft)


def test_retriever_decode_modes_on_a_real_bundle(tmp_path, flowers_images):
    from sdk_helpers import make_bundle

    from sdk.retriever import Retriever

    bundle = make_bundle(tmp_path / "b.ibc", openvino=False)
    with pytest.raises(ValueError, match="decode must be one of"):
        Retriever.from_bundle(bundle, decode="turbo")
    with Retriever.from_bundle(bundle) as exact, Retriever.from_bundle(bundle, decode="fast") as fast:
        a, b = exact.embed(flowers_images), fast.embed(flowers_images)
    assert np.sum(a * b, axis=1).min() > 0.999  # the tiny model's embeddings barely move
