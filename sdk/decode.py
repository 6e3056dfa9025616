"""Decoding for indexing: the exact preprocessing, or a cheaper path that gives (nearly) the same tensors.

Why: on a small CPU, indexing a folder spends as much time decoding and resizing JPEGs as
running the model. Two savings, both opt-in where they change anything:

* ``crop_first`` (default on): resize only the part of the image the centre crop keeps (Pillow's
  ``resize(box=...)``), not the whole picture, then normalise. Pillow computes each output pixel
  from the same source pixels and weights as resize-then-crop, so the tensors are the exact
  path's up to float rounding of the filter positions (measured: bench/RESULTS.md).
* ``draft`` (default off): let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (``Image.draft``)
  when that still leaves at least ``config.resize`` pixels on the short side. Only images at
  least twice that size gain (phone photos, not 256-px data sets); the DCT-domain downscale
  differs slightly from Pillow's resize, so it is off unless asked for.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from sdk.preprocess import (_INTERPOLATIONS, ImageError, PreprocessConfig, center_crop_box, load_image, normalize,
                            preprocess_image, resize_and_crop, resized_size)


def _open_drafted(source: Any, short_side: int) -> Any:
    """A PIL image decoded at a reduced JPEG scale when the short side stays >= ``short_side``; else ``source``."""
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return source
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source))
        if img.format != "JPEG":
            img.close()
            return source
        w, h = img.size
        scale = short_side / min(w, h)
        img.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
        return img
    except (OSError, ValueError, SyntaxError):
        return source  # load_image names the problem


def crop_first(img: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize-then-centre-crop computed on the kept region only (same result as :func:`resize_and_crop`)."""
    w, h = resized_size(*img.size, config.resize)
    if w < config.crop or h < config.crop or (w, h) == img.size:
        return resize_and_crop(img, config)
    left, top, right, bottom = center_crop_box(w, h, config.crop)
    sx, sy = img.size[0] / w, img.size[1] / h
    return img.resize((config.crop, config.crop), _INTERPOLATIONS[config.interpolation],
                      box=(left * sx, top * sy, right * sx, bottom * sy))


def fast_preprocess(source: Any, config: PreprocessConfig, *, draft: bool = False, crop: bool = True) -> np.ndarray:
    """:func:`sdk.preprocess.preprocess_image`, cheaper: crop-first resize and, with ``draft``, JPEG draft decoding."""
    if not crop and not draft:
        return preprocess_image(source, config)
    src = _open_drafted(source, config.resize) if draft else source
    try:
        img = load_image(src, config.max_pixels)
    except ImageError as e:
        raise ImageError(source, e.reason) from None
    img = crop_first(img, config) if crop else resize_and_crop(img, config)
    return normalize(img, config)


__all__ = ["fast_preprocess", "crop_first"]
