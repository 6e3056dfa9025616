"""Stage 1, train: ``trainer.train`` into ``OUT/train`` (a killed run resumes from its ``last.pt``)."""

from __future__ import annotations

import logging
import os

from pipeline.context import Context

log = logging.getLogger("pipeline.train")


def inputs(ctx: Context) -> dict:
    return {"config": ctx.config.to_dict()}


def run(ctx: Context) -> dict:
    from trainer.loop import train

    out = ctx.dir("train")
    resume = os.path.isfile(os.path.join(out, "last.pt"))
    if resume:
        log.info("train: resuming %s from last.pt", out)
    result = train(ctx.config, out, resume=resume)
    return {"best_checkpoint": result.best_checkpoint, "epochs": result.epochs, "steps": result.steps,
            "train_time_s": round(result.train_time_s, 1), "protocol": result.protocol,
            "test": {k: v for k, v in result.test_metrics.items() if isinstance(v, float)}}


__all__ = ["run", "inputs"]
