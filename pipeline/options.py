"""What one pipeline run is asked to do: a typed description, the one place for its defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_PRESET = "flowers102-lite0-cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ExportOptions:
    """What the export stage passes to :func:`export.export_bundle` (see ``ibc-export --help``)."""

    backends: str = "onnx,openvino"
    precisions: str = "fp32,fp16,int8"
    tolerance: str | None = None  # e.g. "int8=0.5,fp16=0.1"
    parity_limit: int | None = None  # cap the held-out parity set (seeded sample)
    calib_size: int = 300
    val_limit: int | None = 1000
    batch_size: int = 32
    extra: dict = field(default_factory=dict)  # other export_bundle keywords (Python API only)

    def record(self) -> dict:
        """The plain, comparable form (a rerun with other options re-exports)."""
        return {"backends": self.backends, "precisions": self.precisions, "tolerance": self.tolerance,
                "parity_limit": self.parity_limit, "calib_size": self.calib_size, "val_limit": self.val_limit,
                "batch_size": self.batch_size, "extra": {k: repr(v) for k, v in sorted(self.extra.items())}}


@dataclass
class RunOptions:
    """One ``ibc-run``: the training config (preset + overrides), where the data is, and the later stages' knobs."""

    out: str
    config: str = DEFAULT_PRESET  # preset name (configs/NAME.yaml) or a YAML path
    overrides: list[str] = field(default_factory=list)  # --set section.key=value
    data_root: str | None = None  # the preset's dataset folder, if elsewhere
    folder: str | None = None  # any ROOT/<class>/* image folder instead of the preset's data set
    from_stage: str | None = None
    strict: bool = False  # a variant failing its gate fails the run
    export: ExportOptions = field(default_factory=ExportOptions)
    queries_per_class: int = 2  # held-out images per class used as queries (never in the catalogue)
    grid_queries: int = 8  # rows in the report's query grid
    tsne_points: int = 1500  # test embeddings shown on the 2-D map (seeded sample)
    threads: int | None = None  # runtime threads for indexing / querying (default: the config's)
    seed: int = 0

    def config_path(self) -> str:
        return resolve_preset(self.config)


def resolve_preset(name: str) -> str:
    """A YAML path as given, or a preset name looked up in ./configs and in the project's configs/."""
    candidates = [name]
    if not name.endswith((".yaml", ".yml")):
        candidates += [os.path.join("configs", name + ".yaml"), str(REPO_ROOT / "configs" / (name + ".yaml"))]
    else:
        candidates.append(str(REPO_ROOT / name))
    for c in candidates:
        if os.path.isfile(c):
            return c
    presets = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml"))
    raise PipelineError(f"config {name!r} not found (looked at {', '.join(candidates)}); presets: {', '.join(presets)}")


__all__ = ["RunOptions", "ExportOptions", "resolve_preset", "DEFAULT_PRESET"]
