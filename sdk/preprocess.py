"""Image loading and evaluation preprocessing with numpy + Pillow only.

Why here: the trainer's evaluation, the exporter's calibration/parity and the SDK on the device
must feed the network identical tensors, so this is the single implementation they all call
(the bundle manifest carries the :class:`PreprocessConfig`). It reproduces torchvision's
``Resize(short) -> CenterCrop(crop) -> ToTensor -> Normalize`` on PIL images.

Odd inputs are normalised to 8-bit RGB: EXIF orientation applied; CMYK, palette, grayscale,
1-bit converted; alpha composited on white; 16-bit and 32-bit integer / float images rescaled to
8 bits. Anything unreadable (missing, 0-byte, truncated, not an image, decompression bomb)
raises one exception type, :class:`ImageError`, naming the file.
"""

from __future__ import annotations

from sdk.errors import IbcError

import errno
import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
INTERPOLATIONS = tuple(_INTERPOLATIONS)  # what evaluation and training augmentation both accept
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb threshold

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]


class ImageError(IbcError, ValueError):
    """An image could not be read or converted; ``source`` names it."""

    def __init__(self, source: Any, reason: str):
        self.source = describe_source(source)
        self.reason = reason
        super().__init__(f"cannot use image {self.source}: {reason}")


def describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size}>"
    return f"<{type(source).__name__}>"


@dataclass
class PreprocessConfig:
    """Evaluation preprocessing; serialised into the bundle manifest."""

    resize: int = 256  # shorter side after resizing
    crop: int = 227  # square centre crop
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color: str = "RGB"
    layout: str = "NCHW"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.color not in ("RGB", "BGR"):
            raise ValueError(f"color must be RGB or BGR, got {self.color!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.resize <= 0 or self.crop <= 0:
            raise ValueError("resize and crop must be positive")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**d)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer and float single-channel images to 8-bit 'L'."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        # 16-bit data (PNG 16-bit opens as 'I' or 'I;16'): full range is 0..65535
        arr8 = np.clip(arr.astype(np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
    elif img.mode == "I":
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
    else:  # 'F': floats, assume 0..1 if they fit there, else min-max
        a = arr.astype(np.float64)
        lo, hi = (0.0, 1.0) if a.min(initial=0) >= 0 and a.max(initial=0) <= 1 else (a.min(), a.max())
        arr8 = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_image(arr: np.ndarray, source: Any) -> Image.Image:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) == 0:
        raise ImageError(source, f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageError(source, f"arrays must be uint8 (0..255), got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB" if arr.shape[2] == 3 else "RGBA")


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, bytes, PIL image or HWC uint8 array as an 8-bit RGB PIL image.

    EXIF orientation is applied. Every failure is an :class:`ImageError` naming the source.
    """
    if isinstance(source, np.ndarray):
        return to_rgb(_array_to_image(source, source))
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageError(source, "empty data (0 bytes)")
            img = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise ImageError(source, _why_missing(path))
            if os.path.isdir(path):
                raise ImageError(source, "is a directory, not an image file")
            if os.path.getsize(path) == 0:
                raise ImageError(source, "empty file (0 bytes)")
            img = Image.open(path)
        else:
            raise ImageError(source, "expected a path, bytes, a PIL image or an HxWxC uint8 array")
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(source, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
        if img.size[0] == 0 or img.size[1] == 0:
            raise ImageError(source, "image has zero width or height")
        return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(source, "not a recognised image format (corrupt or not an image)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(source, f"too large, refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(source, f"unreadable or truncated image data ({e})") from None


def _why_missing(path: str) -> str:
    """Why ``os.path.exists`` said no: a symlink loop and a dangling link are not 'no such file'."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if os.path.islink(path):
            return f"dangling symbolic link (to {os.readlink(path)!r})"
        if e.errno == errno.EACCES:
            return "permission denied"
    return "no such file"


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``short``, as torchvision computes it."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a centred square crop, torchvision's rounding."""
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def resize_and_crop(img: Image.Image, config: PreprocessConfig, source: Any = None) -> Image.Image:
    """Shorter side to ``config.resize``, then centre crop (zero padding if the image is smaller).

    A resize that would exceed ``config.max_pixels`` is an :class:`ImageError` naming ``source``.
    """
    w, h = resized_size(*img.size, config.resize)
    # the budget bounds what resizing allocates too: a 1x100000 strip is 100k pixels decoded but
    # 146 x 14.6M after its short side is resized to 146 (the padded canvas is bounded the same way)
    need = max(w, config.crop) * max(h, config.crop)
    if need > config.max_pixels:
        raise ImageError(source if source is not None else img,
                         f"{img.size[0]}x{img.size[1]} would be resized to {w}x{h} = {w * h} pixels, over the limit "
                         f"of {config.max_pixels} (aspect ratio too extreme)")
    if (w, h) != img.size:
        img = img.resize((w, h), _INTERPOLATIONS[config.interpolation])
    if w < config.crop or h < config.crop:
        canvas = Image.new("RGB", (max(w, config.crop), max(h, config.crop)))
        canvas.paste(img, ((canvas.size[0] - w) // 2, (canvas.size[1] - h) // 2))
        img, (w, h) = canvas, canvas.size
    return img.crop(center_crop_box(w, h, config.crop))


def normalize(img: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """8-bit RGB image -> float32 (3, H, W) (or (H, W, 3) for NHWC) normalised array."""
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    if config.color == "BGR":
        arr = arr[:, :, ::-1]
    if config.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_image(source: ImageSource, config: PreprocessConfig | None = None) -> np.ndarray:
    """One image (any supported source) -> the network's float32 input for it, without batch axis."""
    config = config or PreprocessConfig()
    return normalize(resize_and_crop(load_image(source, config.max_pixels), config, source), config)


def preprocess_batch(sources: Sequence[ImageSource], config: PreprocessConfig | None = None) -> np.ndarray:
    """Several images -> (N, 3, crop, crop) float32 (NCHW) batch."""
    config = config or PreprocessConfig()
    if len(sources) == 0:
        raise ValueError("no images given")
    return np.stack([preprocess_image(s, config) for s in sources])


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "PreprocessConfig", "load_image", "to_rgb", "resized_size",
    "center_crop_box", "resize_and_crop", "normalize", "preprocess_image", "preprocess_batch", "describe_source",
]
