"""The training loop: ``train(config, out_dir) -> TrainResult`` (the CLI is a thin layer over it).

One run folder holds ``config.yaml`` (resolved config), ``env.json`` (library versions, machine),
``last.pt`` (everything needed to resume, written atomically every epoch and optionally every N
steps), ``best.pt`` (best on the selection split), ``metrics.jsonl`` (one record per epoch),
``plots/*.png``, ``train.log`` and ``final_metrics.json`` (the test-class report).

The method (``method.name``, trainer/methods/) decides the loss; this module only orders the
pieces: the step engine (trainer/engine.py), checkpoint state and resume (trainer/run_state.py),
and the records, plots and reports keyed by the parts the method reports (trainer/report.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from models.checkpoint import CheckpointError, load_checkpoint, load_model_state
from models.ibc import IBCModel, ModelConfig
from trainer import distributed as D
from trainer.config import Config, dump_yaml
from trainer.data import dataset_items, describe, items_of, training_classes
from trainer.engine import (StepEngine, TrainingError, TrainStep, amp_dtype, backbone_frozen_at, init_head,
                            lr_factor, method_parameter_group, parameter_groups, resolve_device, set_backbone_mode,
                            use_channels_last)
from trainer.evaluate import default_ks, evaluate_items
from trainer.methods import MethodContext, get_method
from trainer.report import (draw_plots, epoch_line, epoch_record, final_report, fmt_table, protocol_of,
                            rewrite_jsonl, write_jsonl)
from trainer.run_state import (RunState, checkpoint_payload, environment, restore, rng_state, save, seed_everything,
                               set_rng_state)
from trainer.transforms import BadImageError, TrainDataset, collate, train_transform

log = logging.getLogger("trainer")
_save = save


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
    method: str = ""


# --------------------------------------------------------------------------- train


def train(config: Config | dict, out_dir: str, *, resume: bool = False) -> TrainResult:
    """Train the configured method end to end; evaluate on the test classes at the end (see the module doc)."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    rt = cfg.runtime
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
        return _Run(cfg, out_dir, device, dist_info).train(resume)
    finally:
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()


def _set_determinism(rt, device: torch.device) -> None:
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class _Run:
    """One training run: builds the parts (data, model, method, engine), then runs epochs and the report."""

    def __init__(self, cfg: Config, out_dir: str, device: torch.device, dist_info: D.DistInfo):
        self.cfg, self.out_dir, self.device, self.dist = cfg, out_dir, device, dist_info
        self.main = dist_info.is_main
        self.last_path, self.best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # ---- set-up
    def _build(self) -> None:
        cfg, rt, dc, oc, ft = self.cfg, self.cfg.runtime, self.cfg.data, self.cfg.optim, self.cfg.finetune
        device, dist_info = self.device, self.dist
        _set_determinism(rt, device)
        seed_everything(rt.seed)
        if dc.root:
            dc.root = os.path.abspath(os.path.expanduser(dc.root))  # the saved config must work from any folder
        classes = training_classes(dc)
        self.train_items = items_of(classes)
        cfg.model.num_classes = len(classes)
        self.protocol, self.sel_split = protocol_of(dc, bool(dataset_items(dc, "val")) if dc.select_on != "test"
                                                    else False)
        if self.main:
            log.info("data %s: %s", dc.dataset, describe(dc))
            log.info("protocol: %s", self.protocol)
        self.dataset = TrainDataset(self.train_items,
                                    train_transform(cfg.augment, cfg.preprocess.mean, cfg.preprocess.std),
                                    dc.on_bad_image)

        self.model = model = IBCModel(cfg.model).to(device)
        self.channels_last = use_channels_last(rt.channels_last, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        init_head(model, ft.head_init)
        self.adtype = amp_dtype(rt.amp, device)
        method_cls = get_method(cfg.method.name)
        if not method_cls.uses_classifier:  # frozen: no unused trainable parameter under DDP
            model.classifier.requires_grad_(False)
        ctx = MethodContext(cfg, dist_info, self.train_items, device, self.channels_last, self.adtype)
        self.method = method = method_cls(cfg.method, model, ctx).to(device)
        self.parts = method_cls.loss_parts(cfg.method)  # the one source: also what the report reads
        self.sampler = method.make_sampler(
            [y for _, y in self.train_items], classes_per_batch=cfg.sampler.classes_per_batch,
            images_per_class=cfg.sampler.images_per_class, seed=rt.seed, rank=dist_info.rank,
            world_size=dist_info.world_size, random_split=cfg.sampler.random_split,
            min_k=cfg.sampler.min_images_per_class_split)
        groups = parameter_groups(model, ft.backbone_lr_mult, ft.classifier_lr_mult) + method_parameter_group(method)
        optimizer = torch.optim.RAdam(groups, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                                      decoupled_weight_decay=True)
        self.engine = StepEngine(TrainStep(model, method), optimizer, device=device, dist_info=dist_info,
                                 amp=self.adtype, channels_last=self.channels_last, grad_clip=oc.grad_clip,
                                 compile=rt.compile, find_unused_parameters=ft.freeze_backbone_epochs > 0)
        self.engine.nan_advice = (f"The last good checkpoint ({self.last_path}, if any) is kept. "
                                  + StepEngine.nan_advice)

    def _resume_or_start(self, resume: bool) -> None:
        if resume:
            self.state = restore(self.last_path, self.cfg, self.model, self.method, self.engine, self.sampler,
                                 tuple(self.parts))
            if self.main:
                log.info("resumed %s at epoch %d, step %d (batch %d of the epoch)", self.last_path,
                         self.state.epoch + 1, self.state.step, self.sampler.start_batch)
                rewrite_jsonl(self.metrics_path, self.state.history)
        else:
            self.state = RunState(parts=tuple(self.parts))
            if self.main and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
        self.env = environment(self.device, self.dist)
        if self.main:
            dump_yaml(self.cfg, os.path.join(self.out_dir, "config.yaml"))
            with open(os.path.join(self.out_dir, "env.json"), "w") as f:
                json.dump(self.env, f, indent=2)

    def payload(self, extra_metrics: dict | None = None) -> dict:
        return checkpoint_payload(self.cfg, self.model, self.method, self.engine, self.sampler, self.state,
                                  self.env, extra_metrics)

    def evaluate_split(self, split: str, *, nmi: bool = False, seed: int | None = None) -> dict:
        cfg, rt = self.cfg, self.cfg.runtime
        items, gallery = split_items(cfg.data, split)
        return evaluate_items(self.model, items, cfg.preprocess, gallery=gallery, ks=default_ks(cfg.data.dataset),
                              nmi=nmi, seed=rt.seed if seed is None else seed, batch_size=rt.eval_batch_size,
                              num_workers=cfg.data.num_workers, channels_last=self.channels_last,
                              amp_dtype=self.adtype, progress=rt.progress, desc=f"eval {split}")

    # ---- the run
    def train(self, resume: bool) -> TrainResult:
        self._build()
        self._resume_or_start(resume)
        stop_reason = self._epochs()
        test_metrics = self._final(stop_reason)
        D.barrier()
        st = self.state
        return TrainResult(out_dir=self.out_dir, last_checkpoint=self.last_path, best_checkpoint=self.best_path,
                           test_metrics=test_metrics, best_selection_metric=st.best_value, epochs=st.epoch,
                           steps=st.step, history=st.history, protocol=self.protocol, train_time_s=st.train_time,
                           mpn_batch_size=self.engine.inner.last_mpn_batch, method=self.method.name)

    def _epochs(self) -> str:
        """Train until the epochs or ``runtime.max_steps`` run out; returns why it stopped ('' = completed)."""
        cfg, rt, oc = self.cfg, self.cfg.runtime, self.cfg.optim
        st, sampler = self.state, self.sampler
        loader_gen = torch.Generator().manual_seed(rt.seed)  # keeps DataLoader's seed draw off the global RNG
        max_steps = rt.max_steps
        while st.epoch < oc.epochs and not (max_steps is not None and st.step >= max_steps):
            sampler.set_epoch(st.epoch)
            self.method.on_epoch_start(st.epoch)
            n_batches = len(sampler)
            if st.epoch in oc.reload_best_at and sampler.start_batch == 0 and os.path.isfile(self.best_path):
                best = load_checkpoint(self.best_path)
                load_model_state(self.model, best["model"], where=self.best_path)
                if self.main:
                    log.info("epoch %d: reloaded the best model so far from %s", st.epoch + 1, self.best_path)
            self.model.train()
            self.method.train()
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                collate_fn=collate, generator=loader_gen, persistent_workers=False,
                                pin_memory=self.device.type == "cuda")
            self._epoch_batches(loader, n_batches)
            if sampler.start_batch < n_batches:  # max_steps reached mid-epoch
                if self.main:
                    save(self.last_path, self.payload())
                return "max_steps"
            self._end_of_epoch()
        return ""

    def _epoch_batches(self, loader, n_batches: int) -> None:
        rt, oc, ft = self.cfg.runtime, self.cfg.optim, self.cfg.finetune
        st, sampler, engine, main = self.state, self.sampler, self.engine, self.main
        bar = None
        if rt.progress and main and sys.stderr.isatty():  # a bar in a log file is megabytes of frames
            from tqdm import tqdm

            bar = tqdm(total=n_batches, initial=sampler.start_batch, desc=f"epoch {st.epoch + 1}/{oc.epochs}",
                       unit="batch", dynamic_ncols=True, leave=True)
        t_last = t_logged = time.perf_counter()
        try:
            for images, labels, _, ok in loader:
                b = sampler.start_batch
                lr = oc.lr * lr_factor(oc, st.epoch, b, n_batches)
                frozen = backbone_frozen_at(ft, st.epoch, b, n_batches)
                engine.set_lr(lr, frozen)
                set_backbone_mode(self.model.backbone, frozen=frozen, bn_mode=ft.bn_mode)
                self.method.on_batch_start(st.epoch, b)
                losses = engine.step(images, labels, where=f"epoch {st.epoch + 1}, step {st.step + 1}")
                sampler.start_batch = b + 1
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                st.add_step(losses, images.shape[0] * self.dist.world_size, dt)
                es = st.epoch_stats
                if bar is None and main and now - t_logged > 60:  # no bar: a line a minute instead
                    t_logged = now
                    log.info("epoch %d: batch %d/%d, loss %.4f, %.1f img/s", st.epoch + 1, b + 1, n_batches,
                             es["loss"] / es["n"], es["images"] / es["time"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{es['loss'] / es['n']:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{es['images'] / max(1e-9, es['time']):.1f}")
                if rt.checkpoint_every_steps and st.step % rt.checkpoint_every_steps == 0 and main:
                    save(self.last_path, self.payload())
                if rt.max_steps is not None and st.step >= rt.max_steps:
                    break
        except BadImageError as e:
            if bar is not None:
                bar.close()
            if main:
                save(self.last_path, self.payload())
            raise TrainingError(f"{e}. Stopped; {self.last_path} holds the run so far (fix or remove the file, "
                                "then --resume).") from None
        finally:
            if bar is not None:
                bar.close()
        if self.dataset.bad and main:
            bad = self.dataset.bad
            log.warning("epoch %d: %d unreadable training image(s) skipped: %s", st.epoch + 1, len(bad),
                        ", ".join(sorted(bad)[:5]) + (" ..." if len(bad) > 5 else ""))

    def _end_of_epoch(self) -> None:
        """Log, validate (select), checkpoint and plot the epoch that just ended."""
        rt, oc, st, sel = self.cfg.runtime, self.cfg.optim, self.state, self.sel_split
        record = epoch_record(st, self.engine.optimizer, self.parts)
        st.epoch += 1
        self.sampler.set_epoch(st.epoch)
        st.reset_epoch_stats()
        improved = False
        if sel and (st.epoch % rt.eval_every == 0 or st.epoch == oc.epochs):
            if self.main:
                t0 = time.perf_counter()
                m = self.evaluate_split(sel)
                record.update({f"{sel}/{k}": v for k, v in m.items() if isinstance(v, float)})
                record["eval_time_s"] = time.perf_counter() - t0
                value = m[self.cfg.data.select_metric]
                improved = st.best_value is None or value > st.best_value
                if improved:
                    st.best_value = value
            improved = D.broadcast_object(improved)
            st.best_value = D.broadcast_object(st.best_value)
        st.history.append(record)
        if self.main:
            log.info(epoch_line(record, self.parts, sel, improved))
            write_jsonl(self.metrics_path, record)
            save(self.last_path, self.payload())
            if improved or not sel:
                save(self.best_path, self.payload(record))
            draw_plots(st.history, self.out_dir, self.parts)
        D.barrier()

    def _final(self, stop_reason: str) -> dict:
        """The test-class report (main process): the selected model, and the zero-shot row when pretrained."""
        if not self.main:
            return {}
        cfg, rt, dc, st, sel = self.cfg, self.cfg.runtime, self.cfg.data, self.state, self.sel_split
        if not os.path.isfile(self.best_path) and os.path.isfile(self.last_path):
            shutil.copyfile(self.last_path, self.best_path)
        if sel and os.path.isfile(self.best_path):
            best = load_checkpoint(self.best_path)
            load_model_state(self.model, best["model"], where=self.best_path)
            chosen = f"best on {sel} (epoch {best.get('epoch')})"
        else:
            chosen = f"last (epoch {st.epoch})"
        t0 = time.perf_counter()
        test_metrics = self.evaluate_split("test", nmi=rt.nmi) if rt.test_report else {}
        baseline = None
        if cfg.model.pretrained and rt.baseline and rt.test_report:
            from trainer.baseline import pretrained_baseline

            baseline = pretrained_baseline(cfg, device=self.device, channels_last=self.channels_last,
                                           amp_dtype=self.adtype)
        final = {"test": test_metrics, "model": chosen, "protocol": self.protocol, "epochs": st.epoch,
                 "steps": st.step, "train_time_s": st.train_time, "eval_time_s": time.perf_counter() - t0,
                 f"best_selection_{dc.select_metric}": st.best_value, "selection_split": sel,
                 "selection_metric": dc.select_metric,
                 "method": cfg.method.name, "embedding": self.method.embedding,
                 "use_mpn": cfg.model.use_mpn, "seed": rt.seed, "stopped": stop_reason or "completed",
                 "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "env": self.env}
        if baseline is not None:
            final["baseline"] = {"test": baseline, "model": f"{cfg.model.backbone} ImageNet weights, no training "
                                 f"({cfg.model.pooling}-pooled trunk features, no head)"}
        final_report(self.out_dir, final, st.history, self.parts,
                     f"Test classes ({dc.dataset}, method {cfg.method.name}, model: {chosen}; {self.protocol})")
        return test_metrics


# --------------------------------------------------------------------------- evaluation of a saved checkpoint


def split_items(dc, split: str) -> tuple[list, list | None]:
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


def load_trained_model(path: str, overrides: dict | None = None) -> tuple[IBCModel, Config, dict]:
    """(model with the checkpoint's weights, its training config with ``overrides`` merged, the checkpoint)."""
    from trainer.config import deep_merge

    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(deep_merge(dict(ckpt.get("config") or {}), overrides or {}))
    mc = ModelConfig.from_dict(ckpt["model_config"])
    mc.pretrained = False  # the checkpoint has the weights: never look for the ImageNet ones
    model = IBCModel(mc)
    load_model_state(model, ckpt["model"], where=path)
    return model, cfg, ckpt


def evaluate_checkpoint(path: str, *, data_root: str | None = None, overrides: dict | None = None,
                        split: str = "test", out_dir: str | None = None, batch_size: int = 128,
                        num_workers: int | None = None, device: str = "auto", nmi: bool = True) -> dict:
    """Re-evaluate a checkpoint on ``split`` with the data and preprocessing config it was trained with."""
    from trainer.config import deep_merge

    _check_eval_overrides(overrides or {})
    if overrides:
        given = overrides.get("runtime") or {}
        batch_size = int(given.get("eval_batch_size", batch_size))
        device = str(given.get("device", device))
        nmi = bool(given.get("nmi", nmi))
        if given.get("threads"):
            torch.set_num_threads(int(given["threads"]))
    if data_root:
        overrides = deep_merge(overrides or {}, {"data": {"root": data_root}})
    model, cfg, ckpt = load_trained_model(path, overrides)
    dev = resolve_device(device)
    model.to(dev).eval()
    dc = cfg.data
    items, gallery = split_items(dc, split)
    m = evaluate_items(model, items, cfg.preprocess, gallery=gallery, ks=default_ks(dc.dataset), nmi=nmi,
                       seed=cfg.runtime.seed, batch_size=batch_size,
                       num_workers=dc.num_workers if num_workers is None else num_workers,
                       progress=cfg.runtime.progress, desc=f"eval {split}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "final_metrics.json"), "w") as f:
            json.dump({split: m, "checkpoint": os.path.abspath(path), "epoch": ckpt.get("epoch")}, f, indent=2)
    log.info("\n%s", fmt_table(m, f"{split} classes ({dc.dataset}), checkpoint {path} (epoch {ckpt.get('epoch')})"))
    return m


__all__ = ["train", "TrainResult", "TrainingError", "TrainStep", "StepEngine", "evaluate_checkpoint", "split_items",
           "load_trained_model", "lr_factor", "parameter_groups", "backbone_frozen_at", "set_backbone_mode",
           "init_head", "rng_state", "set_rng_state", "CheckpointError", "ModelConfig", "Any"]
