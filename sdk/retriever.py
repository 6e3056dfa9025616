"""``Retriever``: an exported bundle + a runtime + a catalogue — embed images, search by image or vector.

Why one object: on a device the usual job is "load the model once, index a folder, answer
queries"; the Retriever ties the three parts together and makes sure they agree (the catalogue
records which model made its vectors and refuses another). It never imports torch: numpy,
Pillow, faiss and the runtime of the chosen backend only.

    r = Retriever.from_bundle("bundle/")            # verifies hashes, picks runtime + variant
    r.add(["a.jpg", "b.jpg"], ids=["a", "b"], metadata=[{"label": 1}, {"label": 2}])
    hits = r.search("query.jpg", k=5)               # [[Hit(id, score, metadata), ...]]
    r.save("catalog/"); r2 = Retriever.load("catalog/")
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from sdk.backends import BackendError, Runner, open_runner, plan
from sdk.bundle import BundleError, Manifest, Variant, load_manifest
from sdk.catalog import (
    AddReport,
    Catalog,
    CatalogError,
    CatalogFormatError,
    Hit,
    VectorError,
    check_same_model,
)
from sdk.catalog.milvus import is_store_uri
from sdk.preprocess import ImageError, describe_source, preprocess_image

log = logging.getLogger(__name__)

_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, Image.Image)
DECODE_MODES = ("exact", "fast", "draft")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, (bool, np.bool_))


def split_input(items: Any) -> tuple[str, Any]:
    """Tell images from vectors: returns ``("vectors", array)`` or ``("images", list)``.

    Floating-point arrays (1-D: one vector, 2-D: a batch) and lists of numbers are vectors;
    paths, bytes, PIL images and uint8 arrays (HxW[xC] one image, NxHxWxC a batch) are images.
    """
    if isinstance(items, np.ndarray):
        if items.dtype.kind == "f":
            return "vectors", items
        if items.dtype == np.uint8:
            if items.ndim in (2, 3):
                return "images", [items]
            if items.ndim == 4:
                return "images", list(items)
        raise VectorError(
            f"cannot use an array of dtype {items.dtype} and shape {items.shape}: vectors must be floating point, "
            "images uint8 HxWxC (or NxHxWxC)"
        )
    if isinstance(items, _IMAGE_TYPES):
        return "images", [items]
    try:
        items = list(items)
    except TypeError:
        raise CatalogError(f"expected images (paths, bytes, PIL images, uint8 arrays) or vectors, "
                           f"got {type(items).__name__}") from None
    if not items:
        return "images", []
    first = items[0]
    if _is_number(first):
        return "vectors", np.asarray(items)
    if (isinstance(first, np.ndarray) and first.dtype.kind == "f") or (
            isinstance(first, (list, tuple)) and first and _is_number(first[0])):
        try:
            return "vectors", np.asarray(items)
        except ValueError:
            raise VectorError("vectors of different lengths in one batch") from None
    return "images", items


class Retriever:
    """Embeds images with a bundle's model and searches a :class:`~sdk.catalog.Catalog` of them.

    Build one with :meth:`from_bundle` (empty catalogue) or :meth:`load` (saved catalogue).
    Searching is thread-safe and concurrent; adds and removes are serialised and atomic.
    """

    def __init__(self, bundle_dir: str, manifest: Manifest, variant: Variant, runner: Runner, *,
                 catalog: Catalog | None = None, index: str = "auto", decode_workers: int | None = None,
                 decode: str = "exact", notes: Sequence[str] = (), reason: str = "", **index_options: Any):
        self.bundle_dir = os.path.abspath(os.fspath(bundle_dir))
        self.manifest = manifest
        self.variant = variant
        self.runner = runner
        self.dim = int(manifest.embedding_dim)
        self.decode_workers = decode_workers if decode_workers is not None else min(4, os.cpu_count() or 1)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.decode = decode  # "exact": sdk.preprocess; "fast" / "draft": sdk.decode (see there)
        self._notes = list(notes)
        self._reason = reason
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.catalog = catalog if catalog is not None else Catalog(self.dim, index, model=self.model_record(),
                                                                   **index_options)

    # ------------------------------------------------------------------------------ construction
    @staticmethod
    def _open(path: str | os.PathLike, backend: str, precision: str, threads: int | None, verify: bool):
        path = os.fspath(path)
        manifest = load_manifest(path, verify=verify)  # schema + every file's SHA-256
        candidates, notes = plan(manifest, backend, precision)
        errors = []
        for cand in candidates:
            try:
                runner = open_runner(path, manifest, cand.variant, threads=threads)
            except (BackendError, ImportError, OSError) as e:
                log.warning("could not load variant %s: %s", cand.variant.name, e)
                errors.append(f"{cand.variant.name}: failed to load ({e})")
                continue
            log.info("bundle %s: using %s (%s)", path, cand.variant.name, cand.reason)
            return manifest, cand, runner, notes + errors
        raise BackendError(f"bundle {path}: no variant could be loaded: " + "; ".join(errors))

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, backend: str = "auto", precision: str = "auto",
                    threads: int | None = None, *, index: str = "auto", verify: bool = True,
                    decode_workers: int | None = None, decode: str = "exact", store: str | None = None,
                    token: str | None = None, **index_options: Any) -> "Retriever":
        """Open a bundle (hash-verified) with an empty catalogue, or with the Milvus store at ``store``.

        ``backend``: auto | tensorrt | openvino | onnxruntime. ``precision``: auto (fastest variant
        that passed the parity gate) | fp32 | fp16 | bf16 | int8. ``threads``: runtime threads.
        ``index`` and ``index_options`` configure the catalogue (see :class:`~sdk.catalog.IndexSpec`).
        ``decode``: "exact" (the parity gate's tensors), "fast" or "draft" (cheaper, see :mod:`sdk.decode`).
        ``store``: ``milvus:///path/catalog.db`` (Milvus Lite, embedded) or ``http://host:19530``
        (a Milvus server; ``token`` if it wants one), see :mod:`sdk.catalog.milvus`; a store
        that holds another model's vectors is refused.
        """
        manifest, cand, runner, notes = cls._open(path, backend, precision, threads, verify)
        catalog = None
        if store is not None:
            from sdk.catalog.milvus import MilvusStore

            try:
                catalog = MilvusStore(store, int(manifest.embedding_dim), model=_model_record(os.fspath(path), manifest,
                                      cand.variant), index=index, token=token, **index_options)
            except BaseException:
                runner.close()
                raise
        return cls(path, manifest, cand.variant, runner, catalog=catalog, index=index, decode_workers=decode_workers,
                   decode=decode, notes=notes, reason=cand.reason, **index_options)

    @classmethod
    def load(cls, directory: str | os.PathLike, bundle: str | os.PathLike | None = None, backend: str = "auto",
             precision: str = "auto", threads: int | None = None, *, verify: bool = True,
             decode_workers: int | None = None, decode: str = "exact", token: str | None = None) -> "Retriever":
        """Open a saved catalogue (a folder, or a Milvus store address) with its model: ``bundle`` or,
        if None, the bundle path it recorded.

        A catalogue built with another model (manifest digest, dimension or preprocessing
        differ) is refused with :class:`~sdk.catalog.CatalogMismatchError`.
        """
        directory = os.fspath(directory)
        store = None
        if is_store_uri(directory):
            from sdk.catalog.milvus import MilvusStore

            store = MilvusStore(directory, token=token, create=False)
            recorded = store.model or {}
        else:
            recorded = Catalog.read_header(directory).get("model") or {}
        if bundle is None:
            bundle = recorded.get("bundle")
            if not bundle:
                raise CatalogFormatError(f"catalogue {directory} records no bundle; pass bundle=")
            if not os.path.isdir(bundle):
                raise BundleError(f"catalogue {directory} was built with the bundle at {bundle}, which is not there "
                                  "any more; pass bundle= (the same model)")
        manifest = load_manifest(os.fspath(bundle), verify=False)
        check_same_model(recorded or None, _model_record(os.fspath(bundle), manifest, None), directory)
        manifest, cand, runner, notes = cls._open(bundle, backend, precision, threads, verify)
        model = _model_record(os.fspath(bundle), manifest, cand.variant)
        if store is not None:
            catalog = store
        else:
            catalog = Catalog.load(directory, model=model)
            catalog.model = {**(catalog.model or {}), "bundle": model["bundle"]}  # bundle may have moved
        return cls(bundle, manifest, cand.variant, runner, catalog=catalog, decode_workers=decode_workers,
                   decode=decode, notes=notes, reason=cand.reason)

    def model_record(self) -> dict:
        """What a saved catalogue records about the model its vectors came from."""
        return _model_record(self.bundle_dir, self.manifest, self.variant)

    def info(self) -> dict:
        """Which runtime, variant and why; the runner's settings; the parity report; the catalogue."""
        return {
            "bundle": self.bundle_dir,
            "manifest_digest": self.manifest.digest(),
            "embedding_dim": self.dim,
            "variant": self.variant.name,
            "backend": self.variant.backend,
            "precision": self.variant.precision,
            "reason": self._reason,
            "parity": {"passed": self.variant.passed, **self.variant.parity},
            "passed_over": list(self._notes),
            "runner": self.runner.describe(),
            "decode": {"mode": self.decode, "workers": self.decode_workers},
            "preprocess": self.manifest.preprocess.to_dict(),
            "catalog": self.catalog.info(),
        }

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.runner.close()
        if hasattr(self.catalog, "close"):  # a Milvus store's connection
            self.catalog.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.catalog)

    def __repr__(self) -> str:
        return f"Retriever({self.variant.name}, dim={self.dim}, {len(self)} entries, index={self.catalog.kind})"

    # ------------------------------------------------------------------------------------- embed
    def _executor(self) -> cf.ThreadPoolExecutor | None:
        if self.decode_workers <= 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self.decode_workers, thread_name_prefix="ibc-decode")
            return self._pool

    def _preprocess_one(self, item: Any) -> np.ndarray | ImageError:
        try:
            if self.decode != "exact":
                from sdk.decode import fast_preprocess

                return fast_preprocess(item, self.manifest.preprocess, draft=self.decode == "draft")
            return preprocess_image(item, self.manifest.preprocess)
        except ImageError as e:
            return e

    def _chunks(self, items: list, batch_size: int) -> Iterator[list]:
        """Preprocessed chunks, the next one decoding in the pool while the caller runs the model."""
        pool = self._executor()
        starts = range(0, len(items), batch_size)
        if pool is None:
            for s in starts:
                yield [self._preprocess_one(it) for it in items[s:s + batch_size]]
            return
        pending = None
        for s in starts:
            futures = [pool.submit(self._preprocess_one, it) for it in items[s:s + batch_size]]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = futures
        if pending is not None:
            yield [f.result() for f in pending]

    def _embed_images(self, items: list, batch_size: int, on_error: str,
                      progress: bool = False) -> tuple[np.ndarray, list[int], list]:
        """(vectors of the good images, their positions in ``items``, skipped ``(position, item, reason)``)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        out, kept, skipped = [], [], []
        pos = 0
        bar = _progress_bar(len(items)) if progress else None
        for chunk in self._chunks(items, batch_size):
            if bar is not None:
                bar.update(len(chunk))
            arrays = []
            for offset, res in enumerate(chunk):
                i = pos + offset
                if isinstance(res, ImageError):
                    if on_error == "raise":
                        raise ImageError(items[i], f"{res.reason} (item {i} of {len(items)}; nothing was added)")
                    skipped.append((i, describe_source(items[i]), res.reason))
                    log.warning("skipping item %d, %s: %s", i, res.source, res.reason)
                    continue
                arrays.append(res)
                kept.append(i)
            pos += len(chunk)
            if arrays:
                out.append(self._run_model(np.stack(arrays), kept[-len(arrays):], items))
        if bar is not None:
            bar.close()
        vecs = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        return vecs, kept, skipped

    def _run_model(self, batch: np.ndarray, positions: list[int], items: list) -> np.ndarray:
        y = self.runner.run(batch)
        y = np.asarray(y, dtype=np.float32).reshape(len(batch), -1)
        if y.shape[1] != self.dim:
            raise BackendError(f"the model returned {y.shape[1]}-d embeddings, the manifest says {self.dim}")
        norms = np.linalg.norm(y, axis=1)
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            names = ", ".join(describe_source(items[positions[j]]) for j in np.flatnonzero(bad)[:3])
            raise BackendError(f"the model produced NaN/inf/zero embeddings for {names}")
        return y / norms[:, None]

    def embed(self, images: Any, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Images (paths, bytes, PIL images, HWC uint8 arrays; one or a list) -> (N, dim) float32, L2-normalised.

        Preprocessing is the manifest's, through :mod:`sdk.preprocess`; decoding runs in a thread
        pool of ``decode_workers``. An unreadable image raises :class:`~sdk.preprocess.ImageError`
        naming it.
        """
        kind, items = split_input(images)
        if kind == "vectors":
            raise VectorError("embed() takes images; these look like vectors (floating-point array)")
        vecs, _, _ = self._embed_images(items, batch_size, "raise", progress)
        return vecs

    def _vectors_of(self, items: Any, batch_size: int, on_error: str = "raise",
                    progress: bool = False) -> tuple[np.ndarray, list[int], list]:
        kind, data = split_input(items)
        if kind == "vectors":
            from sdk.catalog import as_vectors

            vecs = as_vectors(data, self.dim)
            return vecs, list(range(len(vecs))), []
        return self._embed_images(data, batch_size, on_error, progress)

    # ----------------------------------------------------------------------------------- catalog
    def add(self, items: Any, ids: Sequence | None = None, metadata: Sequence[dict | None] | None = None, *,
            on_error: str = "raise", batch_size: int = 32, progress: bool = False) -> AddReport:
        """Add images or vectors. ``on_error="raise"``: one bad image and nothing is added;
        ``"skip"``: the good ones are added, the bad ones listed in ``report.skipped``.

        Ids and metadata, when given, align with ``items``; ids default to consecutive integers.
        """
        kind, data = split_input(items)
        n = len(data)
        id_list = None
        if ids is not None:
            id_list = [ids] if isinstance(ids, (str, int, np.integer)) else list(ids)
            if len(id_list) != n:
                raise CatalogError(f"got {len(id_list)} ids for {n} items")
        meta_list = None
        if metadata is not None:
            meta_list = [metadata] if isinstance(metadata, dict) else list(metadata)
            if len(meta_list) != n:
                raise CatalogError(f"got {len(meta_list)} metadata entries for {n} items")
        if id_list is not None:  # refuse bad / duplicate / taken ids before spending time embedding
            self.catalog.check_new_ids(id_list, n)
        vecs, kept, skipped = self._vectors_of(data, batch_size, on_error, progress)
        sub_ids = None if id_list is None else [id_list[i] for i in kept]
        sub_meta = None if meta_list is None else [meta_list[i] for i in kept]
        added = self.catalog.add(vecs, ids=sub_ids, metadata=sub_meta, progress=progress) if len(vecs) else []
        if skipped:
            log.warning("added %d of %d items; skipped %d unreadable", len(added), n, len(skipped))
        return AddReport(ids=list(added), skipped=skipped)

    def remove(self, ids: Any, missing: str = "raise") -> int:
        """Remove entries by id; unknown ids raise :class:`~sdk.catalog.UnknownIdError` unless ``missing="ignore"``."""
        return self.catalog.remove(ids, missing=missing)

    def search(self, queries: Any, k: int = 10, threshold: float | None = None, *, ef_search: int | None = None,
               nprobe: int | None = None, batch_size: int = 32, filter: str | None = None) -> list[list[Hit]]:
        """Images or vectors -> per query, up to k ``Hit(id, score, metadata)``, best first.

        Fewer hits come back when the catalogue is smaller than k (none when empty) or
        ``threshold`` (minimum cosine similarity) cuts them. ``ef_search`` / ``nprobe`` tune
        HNSW / IVF-PQ for this call; ``filter`` (Milvus store only) is a Milvus expression over
        metadata keys, e.g. ``'label == "rose"'``.
        """
        vecs, _, _ = self._vectors_of(queries, batch_size)
        return self.catalog.search(vecs, k, threshold, ef_search=ef_search, nprobe=nprobe, filter=filter)

    def search_raw(self, queries: Any, k: int = 10, *, ef_search: int | None = None, nprobe: int | None = None,
                   batch_size: int = 32, filter: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` arrays of shape (nq, k) as faiss gives them (-inf / -1 or None pad)."""
        vecs, _, _ = self._vectors_of(queries, batch_size)
        return self.catalog.search_raw(vecs, k, ef_search=ef_search, nprobe=nprobe, filter=filter)

    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> str:
        """Save the catalogue (atomically) with the record of this bundle's model (a Milvus store: nothing to do)."""
        return self.catalog.save(directory, overwrite=overwrite)


def _progress_bar(total: int):
    """A tqdm bar on stderr when tqdm is installed (it is optional for the SDK), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="embed", leave=False)


def _model_record(bundle_dir: str, manifest: Manifest, variant: Variant | None) -> dict:
    record = {
        "manifest_digest": manifest.digest(),
        "embedding_dim": int(manifest.embedding_dim),
        "preprocess": manifest.preprocess.to_dict(),
        "bundle": os.path.abspath(bundle_dir),
    }
    if variant is not None:
        record["variant"] = variant.name
    return record


__all__ = ["Retriever", "Hit", "AddReport", "split_input"]
