"""Training augmentation (torchvision transforms v2) and the datasets that apply it.

Training: RandomResizedCrop -> horizontal flip -> float -> Normalize -> RandomErasing, on images
read by ``sdk.preprocess.load_image`` (so odd modes, EXIF and broken files are handled the same
way everywhere). Evaluation never uses these transforms: it goes through ``sdk.preprocess``.

Each training sample is drawn with its own seed (from the sampler), so the augmentation of an
image depends only on (run seed, epoch, batch, position): resumed runs and any number of
data-loader workers produce the same pixels.
"""

from __future__ import annotations

from sdk.errors import IbcError

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from models._torchvision import tv_transforms as T
from sdk.preprocess import ImageError, PreprocessConfig, load_image, preprocess_image

log = logging.getLogger(__name__)

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
           "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS}  # on PIL images


class BadImageError(IbcError, RuntimeError):
    """An unreadable training image with ``on_bad_image='stop'`` (the message names it)."""


def train_transform(aug, mean=None, std=None) -> T.Compose:
    """The v2 pipeline for one PIL image -> normalised float tensor (3, size, size)."""
    from sdk.preprocess import IMAGENET_MEAN, IMAGENET_STD

    # geometric ops on the PIL image (Pillow's resize is the fastest path on CPU), then to a tensor
    ops = [T.RandomResizedCrop(aug.size, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                               interpolation=_INTERP[aug.interpolation], antialias=True)]
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD))]
    if aug.erasing > 0:
        ops.append(T.RandomErasing(p=aug.erasing))
    return T.Compose(ops)


class TrainDataset(Dataset):
    """(path, label) items; ``ds[(index, seed)]`` -> (image tensor, label, index, ok flag).

    A file that cannot be read is logged with its path and replaced by another image of the same
    class (``on_bad_image='skip'``), or raises :class:`BadImageError` (``'stop'``).
    """

    def __init__(self, items: list[tuple[str, int]], transform, on_bad_image: str = "skip", max_tries: int = 5):
        self.items = items
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.max_tries = max_tries
        self.by_class: dict[int, list[int]] = {}
        for i, (_, y) in enumerate(items):
            self.by_class.setdefault(y, []).append(i)
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, index: int, seed: int):
        path, label = self.items[index]
        img = load_image(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.transform(img)
        return x, label

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        label = self.items[index][1]
        rng = np.random.default_rng(seed)
        tried = index
        for attempt in range(self.max_tries):
            try:
                x, _ = self._load(tried, seed)
                return x, label, index, attempt == 0
            except ImageError as e:
                self.bad.add(self.items[tried][0])
                if self.on_bad_image == "stop":
                    raise BadImageError(f"unreadable training image {self.items[tried][0]}: {e.reason} "
                                        "(data.on_bad_image=stop)") from None
                log.warning("skipping unreadable training image %s (%s); using another image of its class",
                            self.items[tried][0], e.reason)
                tried = int(rng.choice(self.by_class[label]))
        raise BadImageError(f"{self.max_tries} images of class {label} in a row are unreadable "
                            f"(last: {self.items[tried][0]}); check the dataset")


class EvalDataset(Dataset):
    """(path, label) items through ``sdk.preprocess.preprocess_image`` (the deployed preprocessing)."""

    def __init__(self, items: list[tuple[str, int]], config: PreprocessConfig):
        if config.layout != "NCHW":
            raise ValueError("the trainer's evaluation expects NCHW preprocessing")
        self.items = items
        self.config = config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            arr = preprocess_image(path, self.config)
            return torch.from_numpy(arr), label, index, True
        except ImageError as e:
            log.warning("evaluation: skipping unreadable image %s (%s)", path, e.reason)
            c = self.config.crop
            return torch.zeros(3, c, c), label, index, False


def collate(batch):
    xs, ys, idx, ok = zip(*batch)
    return (torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long),
            torch.as_tensor(ok, dtype=torch.bool))


__all__ = ["train_transform", "TrainDataset", "EvalDataset", "BadImageError", "collate"]
