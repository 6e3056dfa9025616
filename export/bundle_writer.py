"""Assemble the bundle manifest (DESIGN §5) from what the export built and measured.

Why separate from the orchestration: the manifest is the contract with the SDK
(:mod:`sdk.bundle`), so everything that goes into it is decided in one place, with only the
fields the SDK's reader accepts; extra detail lives in the free-form ``parity``, ``provenance``,
``runtime_hints`` and ``notes`` fields.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.onnx_export import INPUT_NAME, OUTPUT_NAME
from sdk.bundle import FileEntry, InputSpec, Manifest, Variant, file_entry

EXPORTER_VERSION = "0.1.0"


def json_safe(obj: Any) -> Any:
    """Plain JSON types only: tuples -> lists, numpy scalars -> Python, other objects -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        f = float(obj)
        return f if np.isfinite(f) else str(f)
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return str(obj)


def config_digest(config: dict) -> str:
    blob = json.dumps(json_safe(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of everything that shaped the exported files."""
    from models.checkpoint import library_versions as base

    out = dict(base())
    for name in ("onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "tensorrt"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except Exception:  # noqa: BLE001 - absent or broken optional package: just not listed
            continue
    out["platform"] = platform.platform()
    out["cpu"] = platform.processor() or platform.machine()
    return out


@dataclass
class BuiltVariant:
    """A variant built into the bundle directory, with its measurement."""

    name: str
    backend: str
    precision: str
    files: list[str]  # bundle-relative
    runtime_hints: dict = field(default_factory=dict)
    notes: str = ""
    parity: Any = None  # export.parity.VariantParity
    build: dict = field(default_factory=dict)  # quantization summary, timings, engine info
    images_per_s: float | None = None

    def entry(self, bundle_dir: str, passed_gate: bool, written_despite_failure: bool) -> Variant:
        parity = self.parity.to_dict() if self.parity is not None else {}
        parity.pop("name", None)
        if self.images_per_s:
            parity["images_per_s"] = round(self.images_per_s, 2)
            parity["images_per_s_note"] = "measured by the exporter during the parity pass (batch of the pass)"
        parity["build"] = json_safe(self.build)
        notes = self.notes
        if written_despite_failure:
            notes = (notes + " " if notes else "") + "FAILED the parity gate; written because --allow-drop was given."
        return Variant(name=self.name, backend=self.backend, precision=self.precision,
                       files=[file_entry(bundle_dir, f) for f in self.files], runtime_hints=dict(self.runtime_hints),
                       parity=json_safe(parity), passed=bool(passed_gate), notes=notes)


def build_manifest(bundle_dir: str, *, source, variants: list[BuiltVariant], passed: dict[str, bool],
                   allow_drop: bool, parity_info: dict, provenance_extra: dict) -> Manifest:
    """The manifest of ``variants`` (already written under ``bundle_dir``)."""
    entries = [v.entry(bundle_dir, passed[v.name], allow_drop and not passed[v.name]) for v in variants]
    provenance = {
        "checkpoint": {"path": os.path.abspath(source.path), "sha256": source.sha256, **json_safe(source.info)},
        "model_config": json_safe(source.model_config.to_dict()),
        "config": json_safe(source.config),
        "config_sha256": config_digest(source.config),
        "dataset": json_safe({k: (source.config.get("data") or {}).get(k) for k in ("dataset", "root")}),
        "versions": library_versions(),
        "exporter": {"name": "ibc-export", "version": EXPORTER_VERSION},
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **json_safe(provenance_extra),
    }
    prep = source.preprocess
    shape = [-1, 3, prep.crop, prep.crop] if prep.layout == "NCHW" else [-1, prep.crop, prep.crop, 3]
    return Manifest(
        embedding_dim=source.embedding_dim,
        preprocess=prep,
        variants=entries,
        input=InputSpec(name=INPUT_NAME, dtype="float32", layout=prep.layout, shape=shape),
        output_name=OUTPUT_NAME,
        normalized=True,
        parity=json_safe(parity_info),
        provenance=provenance,
    )


def variant_bytes(bundle_dir: str, files: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(bundle_dir, *f.split("/"))) for f in files)


__all__ = ["BuiltVariant", "build_manifest", "json_safe", "library_versions", "variant_bytes", "FileEntry"]
