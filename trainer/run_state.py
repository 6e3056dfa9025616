"""Checkpoint state and resume: everything a run needs to continue exactly where it stopped.

``last.pt`` holds the model (``IBCModel`` keys only: the exporter reads it unchanged), the
optimiser, grad scaler, sampler position, every RNG, the run's counters and metrics history, and
the method's own parameters and state under ``"method"`` (proxies, D&C's cluster assignment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from models.checkpoint import (CheckpointError, check_architecture, library_versions, load_checkpoint,
                               load_model_state, save_checkpoint)
from trainer import distributed as D

log = logging.getLogger("trainer")


@dataclass
class RunState:
    """The loop's counters: what a resumed run must get back exactly."""

    parts: tuple[str, ...] = ()
    epoch: int = 0
    step: int = 0
    best_value: float | None = None
    history: list = field(default_factory=list)
    epoch_stats: dict = field(default_factory=dict)
    train_time: float = 0.0

    def __post_init__(self):
        if not self.epoch_stats:
            self.reset_epoch_stats()

    def reset_epoch_stats(self) -> None:
        # a part stays None until the method reports it (IBC's loss_mpn in the MPN-off ablation never is)
        self.epoch_stats = {"loss": 0.0, **{k: None for k in self.parts}, "n": 0, "images": 0, "time": 0.0}

    def add_step(self, losses: dict, images: int, seconds: float) -> None:
        s = self.epoch_stats
        s["n"] += 1
        s["images"] += images
        s["time"] += seconds
        self.train_time += seconds
        self.step += 1
        for k in ("loss", *self.parts):
            if losses.get(k) is not None:
                s[k] = (s.get(k) or 0.0) + float(losses[k].detach())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def environment(device: torch.device, dist_info: D.DistInfo) -> dict:
    env = {k: str(v) for k, v in library_versions().items()}  # plain str: TorchVersion is not weights_only-safe
    from importlib import metadata

    for dist_name in ("scikit-learn", "faiss-cpu", "Pillow", "tqdm", "click", "PyYAML", "pytorch-metric-learning"):
        try:
            env[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    env["platform"] = platform.platform()
    env["processor"] = platform.processor() or platform.machine()
    env["cpu_count"] = int(os.cpu_count() or 0)
    env["torch_threads"] = int(torch.get_num_threads())
    env["device"] = str(device)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["world_size"] = dist_info.world_size
    return env


def checkpoint_payload(cfg, model, method, engine, sampler, state: RunState, env: dict,
                       extra_metrics: dict | None = None) -> dict:
    optimizer, scaler = engine.optimizer, engine.scaler
    return {
        "model_config": cfg.model.to_dict(),
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "method": {"name": method.name, "state": method.state_dict(), "extra": method.extra_state()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
        "epoch": state.epoch,
        "step": state.step,
        "metrics": extra_metrics or (state.history[-1] if state.history else {}),
        "best_value": state.best_value,
        "history": state.history,
        "epoch_stats": state.epoch_stats,
        "train_time_s": state.train_time,
        "versions": env,
    }


def save(path: str, payload: dict) -> bool:
    """Atomic save; a failure (disk full, ...) is logged and the previous file stays intact."""
    try:
        save_checkpoint(path, payload)
        return True
    except OSError as e:
        log.error("could not write checkpoint %s (%s); the previous %s is intact", path, e, os.path.basename(path))
        return False


def restore(path: str, cfg, model, method, engine, sampler, parts: tuple[str, ...]) -> RunState:
    """Load ``path`` into the run's objects; returns its counters. Refuses another model or method."""
    ckpt = load_checkpoint(path)
    check_architecture(ckpt, cfg.model, where=path)
    saved = ckpt.get("method") or {"name": (ckpt.get("config") or {}).get("method", {}).get("name")
                                   or ("ibc" if ckpt["model_config"].get("use_mpn", True) else "ce")}
    if saved.get("name") != method.name:
        raise CheckpointError(f"{path}: trained with method {saved.get('name')!r}, this run is {method.name!r}")
    load_model_state(model, ckpt["model"], where=path)
    if saved.get("state"):
        load_model_state(method, saved["state"], where=f"{path} (method state)")
    method.load_extra_state(saved.get("extra") or {})
    try:
        engine.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit this run ({e})") from None
    if ckpt.get("scaler"):
        engine.scaler.load_state_dict(ckpt["scaler"])
    try:
        sampler.load_state_dict(ckpt["sampler"])
    except ValueError as e:  # another P x K than the run was started with
        from trainer.engine import TrainingError

        raise TrainingError(f"--resume: {path}: {e}; resume with the run's sampler settings") from None
    set_rng_state(ckpt["rng"])
    state = RunState(parts=parts, epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), best_value=ckpt.get("best_value"),
                     history=list(ckpt.get("history", [])), epoch_stats=dict(ckpt.get("epoch_stats") or {}),
                     train_time=float(ckpt.get("train_time_s", 0.0)))
    return state


__all__ = ["RunState", "seed_everything", "rng_state", "set_rng_state", "environment", "checkpoint_payload",
           "save", "restore"]
