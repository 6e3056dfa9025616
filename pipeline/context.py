"""What every stage sees: the run folder, the options, the training config, and earlier stages' records."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from pipeline.options import RunOptions
from pipeline.state import read_done, stage_dir


@dataclass
class Context:
    opts: RunOptions
    config: object  # trainer.config.Config
    out: str
    records: dict = field(default_factory=dict)  # stage -> its done.json record (this run or an earlier one)

    def dir(self, stage: str) -> str:
        d = stage_dir(self.out, stage)
        os.makedirs(d, exist_ok=True)
        return d

    def summary(self, stage: str) -> dict | None:
        rec = self.records.get(stage) or read_done(self.out, stage)
        return None if rec is None else rec.get("summary")

    @property
    def train_dir(self) -> str:
        return stage_dir(self.out, "train")

    @property
    def bundle_dir(self) -> str:
        return os.path.join(stage_dir(self.out, "export"), "bundle.ibc")

    def threads(self) -> int | None:
        return self.opts.threads or getattr(self.config.runtime, "threads", None)


def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


__all__ = ["Context", "write_json", "read_json"]
