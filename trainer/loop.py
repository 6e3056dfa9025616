"""The training loop: ``train(config, out_dir) -> TrainResult`` (the CLI is a thin layer over it).

One run folder holds ``config.yaml`` (resolved config), ``env.json`` (library versions, machine),
``last.pt`` (everything needed to resume, written atomically every epoch and optionally every N
steps), ``best.pt`` (best on the selection split), ``metrics.jsonl`` (one record per epoch),
``plots/*.png``, ``train.log`` and ``final_metrics.json`` (the test-class report).
"""

from __future__ import annotations

from sdk.errors import IbcError

import contextlib
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.checkpoint import (CheckpointError, check_architecture, library_versions, load_checkpoint,
                               load_model_state, save_checkpoint)
from models.ibc import IBCModel, ModelConfig
from trainer import distributed as D
from trainer.config import Config, dump_yaml
from trainer.data import dataset_items, describe, items_of, training_classes
from trainer.evaluate import default_ks, evaluate_items
from trainer.losses import ibc_loss
from trainer.sampler import PKBatchSampler
from trainer.transforms import BadImageError, TrainDataset, collate, train_transform

log = logging.getLogger("trainer")


class TrainingError(IbcError, RuntimeError):
    """The run stopped on purpose (NaN loss, unreadable image with on_bad_image=stop); the message says why."""


@dataclass
class TrainResult:
    out_dir: str
    last_checkpoint: str
    best_checkpoint: str
    test_metrics: dict = field(default_factory=dict)
    best_selection_metric: float | None = None
    epochs: int = 0
    steps: int = 0
    history: list = field(default_factory=list)
    protocol: str = ""
    train_time_s: float = 0.0
    mpn_batch_size: int | None = None  # nodes the MPN saw in the last step (global batch under DDP)


# --------------------------------------------------------------------------- the model step


class TrainStep(nn.Module):
    """images, labels -> losses. Wrapped by DDP as a whole so gradients are synchronised."""

    def __init__(self, model: IBCModel, loss_cfg, dist_info: D.DistInfo, global_mpn: bool):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.dist = dist_info
        self.global_mpn = global_mpn and dist_info.enabled
        self.last_mpn_batch = 0
        self.backbone_frozen = False  # set by the loop during the fine-tuning warm-up

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.backbone_frozen:  # no graph through the trunk: the warm-up costs a forward pass only
            with torch.no_grad():
                feats = self.model.backbone(images)
            f = self.model.head(feats)
        else:
            f = self.model.embed(images)
        logits = self.model.classifier(f)
        mpn_logits = None
        if self.model.mpn is not None:
            if self.global_mpn:
                f_all = D.all_gather_with_grad(f, self.dist.gather_group)
                _, all_logits = self.model.refine(f_all)
                n = f.shape[0]
                mpn_logits = all_logits[self.dist.rank * n:(self.dist.rank + 1) * n]
                self.last_mpn_batch = f_all.shape[0]
            else:
                _, mpn_logits = self.model.refine(f)
                self.last_mpn_batch = f.shape[0]
        c = self.loss_cfg
        return ibc_loss(logits, labels, mpn_logits, temperature=c.temperature, smoothing=c.label_smoothing,
                        backbone_weight=c.backbone_weight, mpn_weight=c.mpn_weight)


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"runtime.device={name} but CUDA is not available here; use runtime.device=cpu")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def lr_factor(optim, epoch: int, batch: int, n_batches: int) -> float:
    """Learning-rate multiplier at ``batch`` of ``epoch`` (a pure function: resumes need no scheduler object)."""
    t = epoch + batch / max(1, n_batches)
    factor = 1.0
    if optim.warmup_epochs > 0 and t < optim.warmup_epochs:
        factor = min(1.0, (epoch + (batch + 1) / max(1, n_batches)) / optim.warmup_epochs)
    if optim.schedule == "step":
        factor *= optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)
    else:  # cosine over the whole run (after warm-up)
        w = optim.warmup_epochs
        frac = 0.0 if t < w else (t - w) / max(1e-9, optim.epochs - w)
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return factor


def parameter_groups(model: IBCModel, backbone_lr_mult: float) -> list[dict]:
    """Two optimiser groups: the backbone at ``lr * backbone_lr_mult``, everything new at ``lr``."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": backbone, "lr_mult": backbone_lr_mult, "name": "backbone"},
            {"params": rest, "lr_mult": 1.0, "name": "head"}]


def backbone_frozen_at(ft, epoch: int, batch: int, n_batches: int) -> bool:
    """Whether the fine-tuning warm-up (backbone frozen) still runs at this batch."""
    return epoch + batch / max(1, n_batches) < ft.freeze_backbone_epochs


def set_backbone_mode(backbone: nn.Module, *, frozen: bool, bn_mode: str) -> None:
    """Train mode for the trunk, except BatchNorm when frozen (warm-up) or ``bn_mode='frozen'``."""
    backbone.train(not frozen)
    if not frozen and bn_mode == "frozen":
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def init_head(model: IBCModel, mode: str) -> None:
    if mode == "orthogonal":
        nn.init.orthogonal_(model.head.fc.weight)
        nn.init.zeros_(model.head.fc.bias)


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


def _write_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _save(path: str, payload: dict) -> bool:
    """Atomic save; a failure (disk full, ...) is logged and the previous file stays intact."""
    try:
        save_checkpoint(path, payload)
        return True
    except OSError as e:
        log.error("could not write checkpoint %s (%s); the previous %s is intact", path, e, os.path.basename(path))
        return False


def _fmt_table(rows: list[tuple[str, dict]] | dict, title: str) -> str:
    """A plain-text metrics table: one row per (name, metrics) pair, values in percent."""
    if isinstance(rows, dict):
        rows = [("", rows)]
    first = rows[0][1]
    keys = [k for k in first if k.startswith("recall@")] + [k for k in ("precision@1", "map@r", "r_precision", "nmi")
                                                            if k in first]
    names = [k.replace("recall@", "R@").replace("precision@1", "P@1").replace("map@r", "MAP@R")
             .replace("r_precision", "RP").replace("nmi", "NMI") for k in keys]
    widths = [max(6, len(n)) for n in names]
    label_w = max(len(r[0]) for r in rows)
    head = " " * label_w + (" | " if label_w else "") + " | ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [title, head, "-" * len(head)]
    for label, m in rows:
        vals = " | ".join((f"{100 * m[k]:.2f}" if k in m else "-").rjust(w) for k, w in zip(keys, widths))
        lines.append(label.ljust(label_w) + (" | " if label_w else "") + vals)
    return "\n".join(lines)


# --------------------------------------------------------------------------- train


def train(config: Config | dict, out_dir: str, *, resume: bool = False) -> TrainResult:
    """Train backbone + MPN end to end; evaluate on the test classes at the end (see the module doc)."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    rt, dc, oc = cfg.runtime, cfg.data, cfg.optim
    last = os.path.join(out_dir, "last.pt")
    if resume and not os.path.isfile(last):  # never silently replace a run's history with a new run
        what = "is a directory, not a checkpoint" if os.path.isdir(last) else "does not exist"
        raise TrainingError(f"--resume: {last} {what}; nothing to resume (drop --resume to start a new run)")
    device = resolve_device(rt.device)
    dist_info = D.init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    main = dist_info.is_main
    os.makedirs(out_dir, exist_ok=True)
    file_handler = None
    if main:
        file_handler = logging.FileHandler(os.path.join(out_dir, "train.log"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(file_handler)
    try:
        return _train(cfg, out_dir, resume, device, dist_info)
    finally:
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()


def _train(cfg: Config, out_dir: str, resume: bool, device: torch.device, dist_info: D.DistInfo) -> TrainResult:
    rt, dc, oc = cfg.runtime, cfg.data, cfg.optim
    main = dist_info.is_main
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(rt.seed)

    # ---- data
    if dc.root:
        dc.root = os.path.abspath(os.path.expanduser(dc.root))  # the saved config must work from any folder
    classes = training_classes(dc)
    train_items = items_of(classes)
    cfg.model.num_classes = len(classes)
    protocol = "paper protocol: model selected on the TEST classes (optimistic)" if dc.select_on == "test" else (
        "validation split of the training classes" if dataset_items(dc, "val") else
        "no validation split: the final epoch's model is reported; test classes used only for the report")
    sel_split = "test" if dc.select_on == "test" else ("val" if dc.val_fraction > 0 else None)
    if main:
        log.info("data %s: %s", dc.dataset, describe(dc))
        log.info("protocol: %s", protocol)
    sampler = PKBatchSampler([y for _, y in train_items], cfg.sampler.classes_per_batch, cfg.sampler.images_per_class,
                             seed=rt.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                             random_split=cfg.sampler.random_split, min_k=cfg.sampler.min_images_per_class_split)
    dataset = TrainDataset(train_items, train_transform(cfg.augment, cfg.preprocess.mean, cfg.preprocess.std),
                           dc.on_bad_image)

    # ---- model, optimiser
    model = IBCModel(cfg.model).to(device)
    channels_last = rt.channels_last is True or (rt.channels_last == "auto" and device.type == "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ft = cfg.finetune
    init_head(model, ft.head_init)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.RAdam(parameter_groups(model, ft.backbone_lr_mult), lr=oc.lr, betas=tuple(oc.betas),
                                  weight_decay=oc.weight_decay, decoupled_weight_decay=True)
    adtype = amp_dtype(rt.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=adtype == torch.float16)

    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    epoch, step, best_value, history = 0, 0, None, []
    epoch_stats = {"loss": 0.0, "loss_backbone": 0.0, "loss_mpn": 0.0, "n": 0, "images": 0, "time": 0.0}
    train_time = 0.0

    if resume:
        ckpt = load_checkpoint(last_path)
        check_architecture(ckpt, cfg.model, where=last_path)
        load_model_state(model, ckpt["model"], where=last_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"{last_path}: its optimiser state does not fit this run ({e})") from None
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        try:
            sampler.load_state_dict(ckpt["sampler"])
        except ValueError as e:  # another P x K than the run was started with
            raise TrainingError(f"--resume: {last_path}: {e}; resume with the run's sampler settings") from None
        set_rng_state(ckpt["rng"])
        epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        best_value = ckpt.get("best_value")
        history = list(ckpt.get("history", []))
        epoch_stats = dict(ckpt.get("epoch_stats") or epoch_stats)
        train_time = float(ckpt.get("train_time_s", 0.0))
        if main:
            log.info("resumed %s at epoch %d, step %d (batch %d of the epoch)", last_path, epoch + 1, step,
                     sampler.start_batch)
            # the metrics log is rewritten from the checkpoint's history (drops records after it)
            with open(metrics_path, "w") as f:
                for r in history:
                    f.write(json.dumps(r) + "\n")
    else:
        if main and os.path.exists(metrics_path):
            os.remove(metrics_path)

    env = environment(device, dist_info)
    if main:
        dump_yaml(cfg, os.path.join(out_dir, "config.yaml"))
        with open(os.path.join(out_dir, "env.json"), "w") as f:
            json.dump(env, f, indent=2)

    step_module: nn.Module = TrainStep(model, cfg.loss, dist_info, rt.mpn_global_batch)
    if dist_info.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True,
            find_unused_parameters=cfg.finetune.freeze_backbone_epochs > 0)
    inner_step = step_module.module if dist_info.enabled else step_module
    if rt.compile:
        step_module = torch.compile(step_module)

    loader_gen = torch.Generator().manual_seed(rt.seed)  # keeps DataLoader's seed draw off the global RNG

    def payload(extra_metrics: dict | None = None) -> dict:
        return {
            "model_config": cfg.model.to_dict(),
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "sampler": sampler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,
            "step": step,
            "metrics": extra_metrics or (history[-1] if history else {}),
            "best_value": best_value,
            "history": history,
            "epoch_stats": epoch_stats,
            "train_time_s": train_time,
            "versions": env,
        }

    def evaluate_split(split: str) -> dict:
        items = dataset_items(dc, split)
        gallery = None
        if dc.dataset == "inshop" and split == "test":
            items, gallery = dataset_items(dc, "query"), dataset_items(dc, "gallery")
        return evaluate_items(model, items, cfg.preprocess, gallery=gallery, ks=default_ks(dc.dataset),
                              nmi=False, seed=rt.seed, batch_size=rt.eval_batch_size, num_workers=dc.num_workers,
                              channels_last=channels_last, amp_dtype=adtype, progress=rt.progress,
                              desc=f"eval {split}")

    stop_reason = ""
    max_steps = rt.max_steps
    while epoch < oc.epochs and not (max_steps is not None and step >= max_steps):
        sampler.set_epoch(epoch)
        n_batches = len(sampler)
        if epoch in oc.reload_best_at and sampler.start_batch == 0 and os.path.isfile(best_path):
            best = load_checkpoint(best_path)
            load_model_state(model, best["model"], where=best_path)
            if main:
                log.info("epoch %d: reloaded the best model so far from %s", epoch + 1, best_path)
        model.train()
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=dc.num_workers, collate_fn=collate,
                            generator=loader_gen, persistent_workers=False,
                            pin_memory=device.type == "cuda")
        bar = None
        if rt.progress and main and sys.stderr.isatty():  # a bar in a log file is megabytes of frames
            from tqdm import tqdm

            bar = tqdm(total=n_batches, initial=sampler.start_batch, desc=f"epoch {epoch + 1}/{oc.epochs}",
                       unit="batch", dynamic_ncols=True, leave=True)
        t_last = t_logged = time.perf_counter()
        try:
            for images, labels, _, ok in loader:
                b = sampler.start_batch
                lr = oc.lr * lr_factor(oc, epoch, b, n_batches)
                frozen = backbone_frozen_at(ft, epoch, b, n_batches)
                for g in optimizer.param_groups:
                    g["lr"] = 0.0 if (frozen and g.get("name") == "backbone") else lr * g.get("lr_mult", 1.0)
                inner_step.backbone_frozen = frozen
                set_backbone_mode(model.backbone, frozen=frozen, bn_mode=ft.bn_mode)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=adtype, enabled=adtype is not None):
                    losses = step_module(images, labels)
                loss = losses["loss"]
                finite = torch.isfinite(loss.detach()).all()
                if dist_info.enabled:  # every rank stops together (no rank left waiting in a collective)
                    flag = finite.to(torch.int32).reshape(1)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    finite = bool(flag.item())
                if not finite:
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. The last good "
                        f"checkpoint ({last_path}, if any) is kept. Try a lower optim.lr, optim.grad_clip, or "
                        f"a higher loss.temperature.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if oc.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                sampler.start_batch = b + 1
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                train_time += dt
                n_img = images.shape[0] * dist_info.world_size
                epoch_stats["n"] += 1
                epoch_stats["images"] += n_img
                epoch_stats["time"] += dt
                for k in ("loss", "loss_backbone", "loss_mpn"):
                    if k in losses:
                        epoch_stats[k] += float(losses[k].detach())
                if bar is None and main and now - t_logged > 60:  # no bar: a line a minute instead
                    t_logged = now
                    log.info("epoch %d: batch %d/%d, loss %.4f, %.1f img/s", epoch + 1, b + 1, n_batches,
                             epoch_stats["loss"] / epoch_stats["n"], epoch_stats["images"] / epoch_stats["time"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{epoch_stats['loss'] / epoch_stats['n']:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{epoch_stats['images'] / max(1e-9, epoch_stats['time']):.1f}")
                if rt.checkpoint_every_steps and step % rt.checkpoint_every_steps == 0 and main:
                    _save(last_path, payload())
                if max_steps is not None and step >= max_steps:
                    break
        except BadImageError as e:
            if bar is not None:
                bar.close()
            if main:
                _save(last_path, payload())
            raise TrainingError(f"{e}. Stopped; {last_path} holds the run so far (fix or remove the file, "
                                "then --resume).") from None
        finally:
            if bar is not None:
                bar.close()
        if dataset.bad and main:
            log.warning("epoch %d: %d unreadable training image(s) skipped: %s", epoch + 1, len(dataset.bad),
                        ", ".join(sorted(dataset.bad)[:5]) + (" ..." if len(dataset.bad) > 5 else ""))
        epoch_done = sampler.start_batch >= n_batches
        if not epoch_done:  # max_steps reached mid-epoch
            if main:
                _save(last_path, payload())
            stop_reason = "max_steps"
            break

        # ---- end of epoch: log, validate, checkpoint
        n = max(1, epoch_stats["n"])
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[-1]["lr"],
            "lr_backbone": optimizer.param_groups[0]["lr"],
            "loss": epoch_stats["loss"] / n, "loss_backbone": epoch_stats["loss_backbone"] / n,
            "loss_mpn": (epoch_stats["loss_mpn"] / n) if model.mpn is not None else None,
            "images_per_s": epoch_stats["images"] / max(1e-9, epoch_stats["time"]),
            "epoch_time_s": epoch_stats["time"],
        }
        epoch += 1
        sampler.set_epoch(epoch)
        epoch_stats = {"loss": 0.0, "loss_backbone": 0.0, "loss_mpn": 0.0, "n": 0, "images": 0, "time": 0.0}
        improved = False
        if sel_split and (epoch % rt.eval_every == 0 or epoch == oc.epochs):
            if main:
                t0 = time.perf_counter()
                m = evaluate_split(sel_split)
                record.update({f"{sel_split}/{k}": v for k, v in m.items() if isinstance(v, float)})
                record["eval_time_s"] = time.perf_counter() - t0
                value = m[dc.select_metric]
                improved = best_value is None or value > best_value
                if improved:
                    best_value = value
            improved = D.broadcast_object(improved)
            best_value = D.broadcast_object(best_value)
        history.append(record)
        if main:
            msg = (f"epoch {record['epoch']}: loss {record['loss']:.4f} (backbone {record['loss_backbone']:.4f}"
                   + (f", MPN {record['loss_mpn']:.4f}" if record["loss_mpn"] is not None else "")
                   + f"), {record['images_per_s']:.1f} img/s")
            if sel_split and f"{sel_split}/recall@1" in record:
                msg += (f", {sel_split} R@1 {100 * record[f'{sel_split}/recall@1']:.2f}, MAP@R "
                        f"{100 * record[f'{sel_split}/map@r']:.2f}" + (" (best)" if improved else ""))
            log.info(msg)
            _write_jsonl(metrics_path, record)
            _save(last_path, payload())
            if improved or not sel_split:
                _save(best_path, payload(record))
            try:
                from trainer.plots import plot_metrics

                plot_metrics(history, os.path.join(out_dir, "plots"))
            except Exception as e:  # noqa: BLE001 - a plot must never end a run
                log.warning("could not draw plots: %s", e)
        D.barrier()

    # ---- final report on the test classes (main process)
    test_metrics: dict = {}
    if main:
        if not os.path.isfile(best_path) and os.path.isfile(last_path):
            shutil.copyfile(last_path, best_path)
        report_ckpt = best_path if (sel_split and os.path.isfile(best_path)) else None
        if report_ckpt:
            best = load_checkpoint(report_ckpt)
            load_model_state(model, best["model"], where=report_ckpt)
            chosen = f"best on {sel_split} (epoch {best.get('epoch')})"
        else:
            chosen = f"last (epoch {epoch})"
        t0 = time.perf_counter()
        if rt.test_report:
            items, gallery = _split_items(dc, "test")
            test_metrics = evaluate_items(model, items, cfg.preprocess, gallery=gallery, ks=default_ks(dc.dataset),
                                          nmi=rt.nmi, seed=rt.seed, batch_size=rt.eval_batch_size,
                                          num_workers=dc.num_workers, channels_last=channels_last,
                                          amp_dtype=adtype, progress=rt.progress, desc="eval test")
        baseline = None
        if cfg.model.pretrained and rt.baseline and rt.test_report:
            from trainer.baseline import pretrained_baseline

            baseline = pretrained_baseline(cfg, device=device, channels_last=channels_last, amp_dtype=adtype)
        final = {"test": test_metrics, "model": chosen, "protocol": protocol, "epochs": epoch, "steps": step,
                 "train_time_s": train_time, "eval_time_s": time.perf_counter() - t0,
                 f"best_selection_{dc.select_metric}": best_value, "selection_split": sel_split,
                 "selection_metric": dc.select_metric,
                 "use_mpn": cfg.model.use_mpn, "seed": rt.seed, "stopped": stop_reason or "completed",
                 "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "env": env}
        if baseline is not None:
            final["baseline"] = {"test": baseline, "model": f"{cfg.model.backbone} ImageNet weights, no training "
                                 f"({cfg.model.pooling}-pooled trunk features, no head)"}
        with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
        try:
            from trainer.plots import plot_metrics

            plot_metrics(history, os.path.join(out_dir, "plots"), final=test_metrics)
        except Exception as e:  # noqa: BLE001
            log.warning("could not draw plots: %s", e)
        if test_metrics:
            title = f"Test classes ({dc.dataset}, model: {chosen}; {protocol})"
            rows = [("starting point (pretrained, untrained)", baseline)] if baseline else []
            log.info("\n%s", _fmt_table(rows + [("trained", test_metrics)], title))
        else:
            log.info("test classes not evaluated (runtime.test_report=false); best %s %s: %s", sel_split,
                     dc.select_metric, best_value)
    D.barrier()
    inner = step_module.module if isinstance(step_module, nn.parallel.DistributedDataParallel) else step_module
    inner = getattr(inner, "_orig_mod", inner)
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        inner = inner.module
    return TrainResult(out_dir=out_dir, last_checkpoint=last_path, best_checkpoint=best_path, test_metrics=test_metrics,
                       best_selection_metric=best_value, epochs=epoch, steps=step, history=history, protocol=protocol,
                       train_time_s=train_time, mpn_batch_size=getattr(inner, "last_mpn_batch", None))


# --------------------------------------------------------------------------- evaluation of a saved checkpoint


def _split_items(dc, split: str) -> tuple[list, list | None]:
    """(queries, gallery or None): In-Shop's test split is query vs gallery, the others leave-one-out."""
    if dc.dataset == "inshop" and split == "test":
        return dataset_items(dc, "query"), dataset_items(dc, "gallery")
    return dataset_items(dc, split), None


EVAL_OVERRIDABLE = {"data": None, "preprocess": None,
                    "runtime": ("seed", "progress", "threads", "eval_batch_size", "device", "nmi")}


def _check_eval_overrides(overrides: dict) -> None:
    """Evaluation honours data, preprocess and a few runtime keys; anything else (the model is the
    checkpoint's own) is refused rather than silently ignored."""
    from trainer.config import ConfigError

    for section, value in overrides.items():
        if section not in EVAL_OVERRIDABLE:
            key = f"{section}.{next(iter(value))}" if isinstance(value, dict) and value else section
            raise ConfigError(f"--eval-only evaluates the checkpoint's own model and training is not run: "
                              f"{key} cannot be overridden (only data.*, preprocess.*, "
                              f"runtime.{{{','.join(EVAL_OVERRIDABLE['runtime'])}}})")
        allowed = EVAL_OVERRIDABLE[section]
        for key in (value if isinstance(value, dict) and allowed else ()):
            if key not in allowed:
                raise ConfigError(f"--eval-only: runtime.{key} has no effect on evaluation; "
                                  f"only runtime.{{{','.join(allowed)}}} can be overridden")


def evaluate_checkpoint(path: str, *, data_root: str | None = None, overrides: dict | None = None,
                        split: str = "test", out_dir: str | None = None, batch_size: int = 128,
                        num_workers: int | None = None, device: str = "auto", nmi: bool = True) -> dict:
    """Re-evaluate a checkpoint on ``split`` with the data and preprocessing config it was trained with."""
    from trainer.config import deep_merge

    _check_eval_overrides(overrides or {})
    ckpt = load_checkpoint(path)
    cfg_d = dict(ckpt.get("config") or {})
    if overrides:
        cfg_d = deep_merge(cfg_d, overrides)
        given = overrides.get("runtime") or {}
        batch_size = int(given.get("eval_batch_size", batch_size))
        device = str(given.get("device", device))
        nmi = bool(given.get("nmi", nmi))
        if given.get("threads"):
            torch.set_num_threads(int(given["threads"]))
    if data_root:
        cfg_d = deep_merge(cfg_d, {"data": {"root": data_root}})
    cfg = Config.from_dict(cfg_d)
    mc = ModelConfig.from_dict(ckpt["model_config"])
    mc.pretrained = False
    model = IBCModel(mc)
    load_model_state(model, ckpt["model"], where=path)
    dev = resolve_device(device)
    model.to(dev).eval()
    dc = cfg.data
    items, gallery = dataset_items(dc, split), None
    if dc.dataset == "inshop" and split == "test":
        items, gallery = dataset_items(dc, "query"), dataset_items(dc, "gallery")
    m = evaluate_items(model, items, cfg.preprocess, gallery=gallery, ks=default_ks(dc.dataset), nmi=nmi,
                       seed=cfg.runtime.seed, batch_size=batch_size,
                       num_workers=dc.num_workers if num_workers is None else num_workers,
                       progress=cfg.runtime.progress, desc=f"eval {split}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
            json.dump({split: m, "checkpoint": os.path.abspath(path), "epoch": ckpt.get("epoch")}, f, indent=2)
    log.info("\n%s", _fmt_table(m, f"{split} classes ({dc.dataset}), checkpoint {path} (epoch {ckpt.get('epoch')})"))
    return m


__all__ = ["train", "TrainResult", "TrainingError", "TrainStep", "evaluate_checkpoint", "lr_factor",
           "parameter_groups",
           "CheckpointError"]
