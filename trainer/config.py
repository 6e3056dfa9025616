"""Typed training configuration: dataclasses (the one place for defaults), YAML presets, ``--set`` overrides.

A run's config is ``Config`` below. YAML presets in ``configs/`` only list what differs from these
defaults; ``--set section.key=value`` (the value parsed as YAML) overrides anything after that.
``Config.to_dict()`` is the resolved config saved in the run folder and in every checkpoint; it
holds ``preprocess`` (the evaluation :class:`sdk.preprocess.PreprocessConfig`) and ``data``
(``dataset``, ``root``, ...), which the exporter reads back.
"""

from __future__ import annotations

from sdk.errors import IbcError

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from models.ibc import ModelConfig, MPNConfig
from sdk.datasets import DATASETS
from sdk.preprocess import INTERPOLATIONS, PreprocessConfig
from trainer.methods import MethodConfig, get_method, list_methods

log = logging.getLogger(__name__)


class ConfigError(IbcError, ValueError):
    """A config file or override is malformed (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    dataset: str = "folder"  # one of DATASETS
    root: str = ""
    # "folder" only: how many classes (in sorted order) train; None = the first half
    num_train_classes: int | None = None
    # validation = a held-out share of the TRAINING classes (model selection, lr drops); 0 = none
    val_fraction: float = 0.2
    val_seed: int = 0
    # "val" (default, clean) or "test": the paper's protocol (select on the test classes), labelled as such
    select_on: str = "val"
    select_metric: str = "recall@1"  # what best.pt maximises on the selection split: recall@1 | map@r | r_precision
    min_images_per_class: int = 2  # classes with fewer images are left out of training (with a warning)
    on_bad_image: str = "skip"  # "skip": warn and use another image of the class; "stop": end the run cleanly
    num_workers: int = 2
    max_images_per_class: int | None = None  # cap (seeded) for quick experiments; None = all


@dataclass
class AugmentConfig:
    """Training augmentation (torchvision transforms v2)."""

    size: int = 227  # RandomResizedCrop output
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    erasing: float = 0.5  # RandomErasing probability (0 = off)
    interpolation: str = "bilinear"


@dataclass
class SamplerConfig:
    classes_per_batch: int = 6  # P (global, over all processes)
    images_per_class: int = 9  # K
    # redraw the split of the batch size P*K among its divisors each epoch (the released CUB setting)
    random_split: bool = False
    min_images_per_class_split: int = 2  # smallest K a random split may draw


@dataclass
class LossConfig:
    temperature: float = 0.2
    label_smoothing: float = 0.1
    backbone_weight: float = 1.0
    mpn_weight: float = 1.0
    # backbone classifier (ibc, ce): "linear" (the paper's nn.Linear on f) | "cosine" (normalised softmax:
    # cos(f, w_c) / temperature, bias unused; same parameters, so checkpoints of either kind load)
    classifier: str = "linear"


@dataclass
class OptimConfig:
    lr: float = 1.56e-4
    weight_decay: float = 6.06e-6  # decoupled (RAdam(decoupled_weight_decay=True))
    epochs: int = 70
    schedule: str = "step"  # "step" (the paper) or "cosine"
    milestones: list[int] = field(default_factory=lambda: [30])  # 0-based epochs where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0 (useful from scratch)
    reload_best_at: list[int] = field(default_factory=list)  # epochs at which the best-on-selection model is reloaded
    grad_clip: float | None = None  # max global grad norm; None = off
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class FinetuneConfig:
    """How a pretrained backbone is fine-tuned beside the new head, MPN and classifiers."""

    backbone_lr_mult: float = 1.0  # backbone lr = optim.lr * this; head / MPN / classifiers train at optim.lr
    classifier_lr_mult: float = 1.0  # classifiers (backbone's, MPN's) at optim.lr * this: many classes, few images
    freeze_backbone_epochs: float = 0.0  # warm-up: the backbone is frozen (weights and BatchNorm) this long
    bn_mode: str = "train"  # backbone BatchNorm: "train" (batch statistics, running stats updated) | "frozen"
    head_init: str = "default"  # embedding head: "default" (PyTorch's Linear init) | "orthogonal" (zero bias)


@dataclass
class RuntimeConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; off on CPU) | bf16 | fp16 | off
    channels_last: bool | str = "auto"  # auto (on CUDA) | true | false
    compile: bool = False
    deterministic: bool = False  # deterministic algorithms (CPU runs are then bit-reproducible)
    threads: int | None = None  # torch intra-op threads; None = leave torch's default
    eval_every: int = 1  # epochs between validation passes
    eval_batch_size: int = 128
    checkpoint_every_steps: int = 0  # also write last.pt every N steps (mid-epoch resume); 0 = per epoch only
    max_steps: int | None = None  # stop after this many optimiser steps (tests, smoke runs)
    progress: bool = True  # tqdm bars
    mpn_global_batch: bool = True  # DDP: the MPN sees the whole global batch (all-gather with gradients), as the authors ran it
    nmi: bool = True  # compute NMI in the final test report
    baseline: bool = True  # pretrained backbones: also report the untrained starting point on the test classes
    test_report: bool = True  # false: never touch the test classes (hyper-parameter screening on val)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # evaluation (sdk.preprocess)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # the training method (trainer/methods/): its own config dataclass, picked by ``method.name``
    method: MethodConfig = field(default_factory=lambda: get_method("ibc").config_class())
    name: str = ""

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = with_weight_preprocessing(d)
        method = d.get("method")
        cfg = from_plain(cls, {k: v for k, v in d.items() if k != "method"}, "")
        model = d.get("model") if isinstance(d.get("model"), dict) else {}
        cfg.method = method_config(method, cfg, model.get("use_mpn"))
        validate(cfg)
        return cfg


def method_config(d: Any, cfg: "Config", use_mpn_given: Any) -> MethodConfig:
    """The method section as its method's dataclass; sets ``model.use_mpn`` from the method.

    Why: configs and checkpoints from before the method plugins have no ``method`` section; their
    ``model.use_mpn`` says which of the two methods of that time they trained (ibc / ce).
    """
    if isinstance(d, MethodConfig):
        d = to_plain(d)
    if d is None:
        d = {"name": "ibc" if cfg.model.use_mpn else "ce"}
    if not isinstance(d, dict):
        raise ConfigError(f"method: expected a mapping with a name (one of {', '.join(list_methods())}), got {d!r}")
    name = d.get("name", "ibc")
    try:
        method = get_method(name)
    except KeyError:
        raise ConfigError(f"method.name: unknown training method {name!r}; known: {', '.join(list_methods())}") from None
    if use_mpn_given is False and method.uses_mpn:
        raise ConfigError(f"model.use_mpn=false contradicts method.name={name} (which trains the MPN); "
                          "the MPN-off ablation is method.name=ce")
    mcfg = from_plain(method.config_class, {**d, "name": name}, "method")
    cfg.model.use_mpn = method.uses_mpn
    return mcfg


# --------------------------------------------------------------------------- generic (de)serialisation


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (YAML- and weights_only-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, PreprocessConfig):
            return obj.to_dict()
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert one value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_plain(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        vals = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_plain(cls: type, d: dict, where: str) -> Any:
    """Build dataclass ``cls`` from a (partial) dict; unknown keys are an error naming the key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
                          f"known in {where or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(hints[f.name], d[f.name], f"{where}.{f.name}" if where else f.name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


WEIGHT_PREPROCESS_KEYS = ("resize", "crop", "interpolation", "mean", "std")


def weight_preprocessing(d: dict) -> dict | None:
    """The preprocessing the configured backbone's pretrained weights expect (None: no weights asked for)."""
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if not model.get("pretrained"):
        return None
    from models.backbones import get_backbone_spec

    try:
        return dict(get_backbone_spec(model.get("backbone", ModelConfig.backbone)).preprocess)
    except ValueError as e:
        raise ConfigError(f"model.backbone: {e}") from None


def with_weight_preprocessing(d: dict) -> dict:
    """Fill ``preprocess`` keys the config does not set from the pretrained weights' own settings.

    Why: mean / std, input size and interpolation belong to the weights (an EfficientNet-Lite
    checkpoint expects mean = std = 0.5, bicubic); the config overrides them only where it says so.
    """
    weights = weight_preprocessing(d)
    if weights is None:
        return d
    pp = d.get("preprocess") if isinstance(d.get("preprocess"), dict) else {}
    return {**d, "preprocess": {**{k: weights[k] for k in WEIGHT_PREPROCESS_KEYS}, **pp}}


def _warn_preprocessing_overrides(d: dict) -> None:
    weights = weight_preprocessing(d)
    pp = d.get("preprocess") if isinstance(d.get("preprocess"), dict) else {}
    if weights is None:
        return
    for k in ("mean", "std", "interpolation"):
        if k in pp and _plain(pp[k]) != _plain(weights[k]):
            log.warning("preprocess.%s=%s overrides what the pretrained %s weights expect (%s); the config wins",
                        k, pp[k], d["model"].get("backbone", ModelConfig.backbone), weights[k])


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``"optim.lr=1e-3"`` -> ``{"optim": {"lr": 0.001}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set: bad key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return d


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), **top: Any) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides <- keyword sections (e.g. ``data={"root": ...}``)."""
    d: dict = load_yaml(path) if path else {}
    for o in overrides:
        d = deep_merge(d, parse_override(o))
    for k, v in top.items():
        d = deep_merge(d, {k: v})
    _warn_preprocessing_overrides(d)
    return Config.from_dict(d)


def validate(cfg: Config) -> None:
    """Cross-field checks with messages a person can act on."""
    d, s, o, r = cfg.data, cfg.sampler, cfg.optim, cfg.runtime
    if d.dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}")
    if d.select_on not in ("val", "test"):
        raise ConfigError(f"data.select_on must be 'val' or 'test', got {d.select_on!r}")
    if d.select_metric not in ("recall@1", "map@r", "r_precision"):
        raise ConfigError(f"data.select_metric must be recall@1, map@r or r_precision, got {d.select_metric!r}")
    if d.on_bad_image not in ("skip", "stop"):
        raise ConfigError(f"data.on_bad_image must be 'skip' or 'stop', got {d.on_bad_image!r}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if s.classes_per_batch < 1 or s.images_per_class < 1:
        raise ConfigError("sampler.classes_per_batch and sampler.images_per_class must be >= 1")
    if o.schedule not in ("step", "cosine"):
        raise ConfigError(f"optim.schedule must be 'step' or 'cosine', got {o.schedule!r}")
    if o.epochs < 1 or o.lr <= 0:
        raise ConfigError("optim.epochs must be >= 1 and optim.lr > 0")
    if r.amp not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"runtime.amp must be auto, bf16, fp16 or off, got {r.amp!r}")
    if r.channels_last in ("true", "false"):  # a quoted YAML value: keep the field's type a bool
        r.channels_last = r.channels_last == "true"
    if not isinstance(r.channels_last, bool) and r.channels_last != "auto":
        raise ConfigError(f"runtime.channels_last must be auto, true or false, got {r.channels_last!r}")
    if cfg.augment.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"augment.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                          f"got {cfg.augment.interpolation!r}")
    if cfg.loss.temperature <= 0:
        raise ConfigError("loss.temperature must be > 0")
    if cfg.loss.classifier not in ("linear", "cosine"):
        raise ConfigError(f"loss.classifier must be 'linear' or 'cosine', got {cfg.loss.classifier!r}")
    if not 0 <= cfg.loss.label_smoothing < 1:
        raise ConfigError("loss.label_smoothing must be in [0, 1)")
    ft = cfg.finetune
    if ft.backbone_lr_mult < 0 or ft.freeze_backbone_epochs < 0:
        raise ConfigError("finetune.backbone_lr_mult and finetune.freeze_backbone_epochs must be >= 0")
    if ft.classifier_lr_mult <= 0:
        raise ConfigError("finetune.classifier_lr_mult must be > 0")
    if ft.bn_mode not in ("train", "frozen"):
        raise ConfigError(f"finetune.bn_mode must be 'train' or 'frozen', got {ft.bn_mode!r}")
    if ft.head_init not in ("default", "orthogonal"):
        raise ConfigError(f"finetune.head_init must be 'default' or 'orthogonal', got {ft.head_init!r}")
    get_method(cfg.method.name).check_config(cfg.method, cfg)
    if cfg.model.use_mpn and cfg.model.embed_dim % cfg.model.mpn.num_heads:
        raise ConfigError(f"model.embed_dim {cfg.model.embed_dim} must be divisible by model.mpn.num_heads "
                          f"{cfg.model.mpn.num_heads}")


def dump_yaml(cfg: Config | dict, path: str) -> None:
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)


__all__ = [
    "Config", "DataConfig", "AugmentConfig", "SamplerConfig", "LossConfig", "OptimConfig", "FinetuneConfig",
    "RuntimeConfig", "weight_preprocessing",
    "ModelConfig", "MPNConfig", "PreprocessConfig", "ConfigError", "load_config", "parse_override", "dump_yaml",
    "to_plain", "DATASETS",
]
