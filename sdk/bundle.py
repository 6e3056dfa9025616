"""The bundle: what ``ibc-export`` writes and the SDK loads (DESIGN §5).

A bundle is one directory holding the model files of each variant (backend × precision) and a
``manifest.json`` that describes them: schema version, embedding dim, input tensor, the
preprocessing, every file's SHA-256 and size, the parity report and the provenance. The SDK
refuses a bundle whose schema or hashes do not match, naming the file and the problem.

Writing is atomic (:func:`atomic_directory`): the bundle is built in a temporary sibling
directory and renamed into place, so a crash leaves the old bundle or the new one, never half.
"""

from __future__ import annotations

from sdk.errors import IbcError

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from sdk.preprocess import PreprocessConfig

FORMAT = "ibc-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class BundleError(IbcError, ValueError):
    """A bundle is missing, malformed, tampered with or of an unknown schema."""


@dataclass
class FileEntry:
    path: str  # relative to the bundle directory, '/'-separated
    sha256: str
    bytes: int


@dataclass
class Variant:
    """One deployable model: a backend, a precision, its files and how it fared in the parity gate."""

    name: str  # e.g. "onnxruntime-int8"
    backend: str
    precision: str
    files: list[FileEntry]
    runtime_hints: dict[str, Any] = field(default_factory=dict)  # e.g. OpenVINO INFERENCE_PRECISION_HINT
    parity: dict[str, Any] = field(default_factory=dict)  # metrics, drop vs reference, passed
    passed: bool = False
    notes: str = ""

    @property
    def main_file(self) -> FileEntry:
        return self.files[0]


@dataclass
class InputSpec:
    name: str = "images"
    dtype: str = "float32"
    layout: str = "NCHW"
    shape: list = field(default_factory=lambda: [-1, 3, 227, 227])  # -1: dynamic batch


@dataclass
class Manifest:
    embedding_dim: int
    preprocess: PreprocessConfig
    variants: list[Variant]
    input: InputSpec = field(default_factory=InputSpec)
    output_name: str = "embeddings"
    normalized: bool = True
    parity: dict[str, Any] = field(default_factory=dict)  # dataset, ks, tolerance, reference metrics
    provenance: dict[str, Any] = field(default_factory=dict)  # checkpoint digest, config, versions
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: not an ibc bundle manifest (format={d.get('format')!r})")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: unknown bundle schema version {version!r}; this SDK reads version {SCHEMA_VERSION}"
            )
        try:
            variants = []
            for v in d["variants"]:
                v = dict(v)
                v["files"] = [FileEntry(**f) for f in v["files"]]
                variant = Variant(**v)
                if variant.backend not in BACKENDS or variant.precision not in PRECISIONS or not variant.files:
                    raise BundleError(f"{where}: variant {variant.name!r} has a bad backend, precision or no files")
                variants.append(variant)
            rest = {k: v for k, v in d.items() if k not in ("variants", "preprocess", "input")}
            dim = d.get("embedding_dim")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
                raise BundleError(f"{where}: embedding_dim must be a positive integer, got {dim!r}")
            return cls(
                preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                input=InputSpec(**d.get("input", {})),
                variants=variants,
                **rest,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise BundleError(f"bundle has no variant {name!r}; it has {[v.name for v in self.variants]}")

    def digest(self) -> str:
        """SHA-256 of the canonical manifest JSON: identifies the model a catalogue was built with."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: str, relpath: str) -> FileEntry:
    """Hash and size of a file already written inside a bundle directory."""
    full = os.path.join(bundle_dir, *relpath.split("/"))
    return FileEntry(path=relpath, sha256=sha256_file(full), bytes=os.path.getsize(full))


def write_manifest(bundle_dir: str, manifest: Manifest) -> str:
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def read_manifest(bundle_dir: str) -> Manifest:
    bundle_dir = os.fspath(bundle_dir)
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME} (not a bundle, or a partial write)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    return Manifest.from_dict(data, where=path)


def verify_files(bundle_dir: str, manifest: Manifest, variants: list[Variant] | None = None) -> None:
    """Check every listed file exists with the recorded size and SHA-256."""
    for v in variants if variants is not None else manifest.variants:
        for entry in v.files:
            if entry.path.startswith("/") or ".." in entry.path.split("/"):
                raise BundleError(f"{bundle_dir}: variant {v.name!r} names a file outside the bundle: {entry.path}")
            full = os.path.join(bundle_dir, *entry.path.split("/"))
            if not os.path.isfile(full):
                raise BundleError(f"{full}: missing (listed in the manifest for {v.name!r})")
            if os.path.getsize(full) != entry.bytes or sha256_file(full) != entry.sha256:
                raise BundleError(f"{full}: SHA-256 does not match the manifest (tampered or corrupt file)")


def load_manifest(bundle_dir: str, verify: bool = True) -> Manifest:
    """Read and (by default) hash-verify a bundle."""
    manifest = read_manifest(bundle_dir)
    if verify:
        verify_files(os.fspath(bundle_dir), manifest)
    return manifest


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir`` in one rename.

    On any exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
