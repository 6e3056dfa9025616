"""``ibc-retrieve``: index a folder of images with a bundle, query the saved catalogue, inspect either.

    ibc-retrieve index BUNDLE IMAGES_DIR --out catalog/ [--dataset cub|cars|sop|inshop|omniglot|folder]
    ibc-retrieve query catalog/ query1.jpg query2.jpg -k 5 [--grid hits.png] [--json]
    ibc-retrieve info BUNDLE_OR_CATALOG
    ibc-retrieve index BUNDLE IMAGES_DIR --store milvus:///path/catalog.db   (or http://host:19530)
    ibc-retrieve copy catalog/ milvus:///path/catalog.db                      (and back)

Ids are the image paths relative to IMAGES_DIR (bytes that are not UTF-8 written as ``\\xNN``);
metadata holds the absolute path and the label (the first folder under IMAGES_DIR, as in an
image-folder layout, or with ``--dataset`` the class of that dataset layout, read as the trainer
reads it). Symlinked folders are followed, each real folder once.

Exit codes: 0 done; 1 bad input or a failed step (one line ``Error: ...`` on stderr naming the
file or key; nothing written), including a folder where no image could be read; 2 usage error.
Unreadable images are skipped with one ``skipped PATH: reason`` line each (``--on-error raise``:
the first one stops the run). ``-v`` shows logging.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from sdk.backends import RUNTIME_ORDER
from sdk.bundle import PRECISIONS
from sdk.cli_errors import OneLineGroup, one_line
from sdk.datasets import DATASETS, IMAGE_EXTENSIONS

log = logging.getLogger("sdk.cli")

EXIT_ERROR = 1  # bad input or a failed step: one line "Error: ..." on stderr naming the file or key


def _friendly(fn):
    """Turn every expected error (:class:`sdk.errors.IbcError`, and the OS's file errors) into one line
    ``Error: ...`` and exit status 1; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sdk.errors import IbcError

        try:
            return fn(*args, **kwargs)
        except (IbcError, ValueError, OSError) as e:
            raise click.ClickException(one_line(e)) from None

    return wrapper


def display_path(path: str | os.PathLike) -> str:
    """A path as UTF-8-safe text: bytes that are not UTF-8 (a Latin-1 file name) become ``\\xNN``.

    Ids and metadata are stored as JSON text, which cannot hold the surrogates Python uses for them.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped).

    Symlinked folders are followed (as the trainer does), each real folder once, so a link
    back up the tree cannot loop.
    """
    root = Path(folder)
    out = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a duplicate
            log.warning("%s: already indexed through another path (symbolic link loop?); not entered again",
                        display_path(dirpath))
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


def dataset_images(root: str, dataset: str, split: str) -> tuple[list[str], list[str]]:
    """(image paths, class names) of a standard dataset layout, read as the trainer reads it."""
    from sdk.datasets import split_classes

    config = {"dataset": dataset, "root": root, "val_fraction": 0.0}
    splits = split_classes(config)
    names = ("train", "test") if split == "all" else (split,)
    if split not in ("all", *splits):
        raise click.ClickException(f"--split {split}: {dataset} has the splits {', '.join(sorted(splits))} (or all)")
    paths, labels = [], []
    for name in names:
        for cls, files in splits[name]:
            paths += files
            labels += [cls] * len(files)
    return paths, labels


@click.group(cls=OneLineGroup)
@click.option("-v", "--verbose", count=True, help="-v: info logging, -vv: debug.")
def main(verbose: int) -> None:
    """Embed images with an exported ibc bundle and search them (no torch needed)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_backend = click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", *RUNTIME_ORDER]))
_precision = click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", *PRECISIONS]))
_threads = click.option("--threads", type=int, default=None, help="Runtime threads (default: the runtime's).")
_token = click.option("--token", envvar="IBC_MILVUS_TOKEN", default=None,
                      help="Milvus server token (default: $IBC_MILVUS_TOKEN).")


@main.command("index")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Catalogue directory to write.")
@click.option("--store", default=None, help="Or a Milvus store: milvus:///path/catalog.db or http://host:19530.")
@_token
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Read IMAGES_DIR as this dataset layout (as ibc-train does); labels are its class names.")
@click.option("--split", default="all", show_default=True,
              help="With --dataset: train, test (In-Shop also query, gallery) or all (train + test).")
@click.option("--index", "index_kind", default="auto", show_default=True,
              type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]))
@click.option("--hnsw-dims", type=click.IntRange(min=1), default=None,
              help="HNSW: walk the graph on a learned projection to this many dims, re-rank exactly.")
@_backend
@_precision
@_threads
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--on-error", default="skip", show_default=True, type=click.Choice(["skip", "raise"]),
              help="skip: index the readable images and list the others; raise: stop, write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing catalogue at --out.")
@click.option("--decode", default="exact", show_default=True, type=click.Choice(["exact", "fast", "draft"]),
              help="exact: the parity gate's preprocessing; fast: resize only the centre crop (faster, +-1 grey "
                   "level); draft: also JPEG draft decoding of images 2x larger than needed (see sdk/decode.py).")
@click.option("--decode-workers", type=click.IntRange(min=1), default=None,
              help="Decode threads (default: min(4, CPUs)).")
@_friendly
def index_cmd(bundle, images_dir, out, store, token, dataset, split, index_kind, hnsw_dims, backend, precision, threads,
              batch_size, on_error, overwrite, decode, decode_workers):
    """Embed every image under IMAGES_DIR with BUNDLE and save a catalogue to --out (or add to --store)."""
    from sdk.retriever import Retriever

    if (out is None) == (store is None):
        raise click.UsageError("give one of --out DIR or --store URI")
    if out is not None and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} already exists (use --overwrite to replace it)")
    root = Path(images_dir)
    if dataset:
        paths, labels = dataset_images(images_dir, dataset, split)
        files = [Path(p) for p in paths]
    else:
        files = find_images(images_dir)
        labels = None
    if not files:
        raise click.ClickException(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {images_dir}")
    rel = [Path(os.path.relpath(f, root)) for f in files]
    ids = [display_path(r.as_posix()) for r in rel]
    if labels is None:
        labels = [display_path(r.parts[0]) if len(r.parts) > 1 else None for r in rel]
    meta = [{"path": display_path(os.path.abspath(f)), "label": label} for f, label in zip(files, labels)]
    t0 = time.perf_counter()
    with Retriever.from_bundle(bundle, backend=backend, precision=precision, threads=threads,
                               index=index_kind, hnsw_dims=hnsw_dims, store=store, token=token, decode=decode,
                               decode_workers=decode_workers) as r:
        click.echo(f"model: {r.variant.name} ({r.info()['reason']}); {len(files)} images", err=True)
        report = r.add(files, ids=ids, metadata=meta, on_error=on_error, batch_size=batch_size,
                       progress=sys.stderr.isatty())
        for pos, source, reason in report.skipped:
            click.echo(f"skipped {display_path(files[pos])}: {reason}", err=True)
        if not report.ids:
            raise click.ClickException(f"none of the {len(files)} images under {images_dir} could be read "
                                       f"(see the lines above); nothing written to {out or store}")
        out = r.save(out, overwrite=True) if out is not None else store
        dt = time.perf_counter() - t0
        click.echo(f"indexed {len(report.ids)} images ({len(report.skipped)} skipped) into {out} "
                   f"[{r.catalog.kind} index, {len(report.ids) / max(dt, 1e-9):.1f} images/s]")


def _catalogue_arg(value: str) -> str:
    """A catalogue folder that exists, or a store address (checked when it is opened)."""
    from sdk.catalog.milvus import is_store_uri

    if not is_store_uri(value) and not os.path.isdir(value):
        raise click.BadParameter(f"{value}: no such catalogue folder (or store address milvus:///..., http://...)")
    return value


@main.command("query")
@click.argument("catalog", callback=lambda ctx, param, value: _catalogue_arg(value))
@click.argument("images", nargs=-1, required=True)
@click.option("-k", "k", default=5, show_default=True, type=int, help="Hits per query.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="The bundle (default: the one the catalogue recorded).")
@click.option("--threshold", type=float, default=None, help="Minimum cosine similarity.")
@click.option("--ef-search", type=int, default=None, help="HNSW beam width for these queries.")
@click.option("--nprobe", type=int, default=None, help="IVF lists to visit for these queries.")
@_backend
@_precision
@_threads
@click.option("--filter", "filter_expr", default=None, help='Milvus store: metadata filter, e.g. \'label == "rose"\'.')
@_token
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Also write a PNG grid of the hits.")
@_friendly
def query_cmd(catalog, images, k, bundle, threshold, ef_search, nprobe, backend, precision, threads, filter_expr, token,
              as_json, grid):
    """Search CATALOG (a folder or a Milvus store address) for the nearest neighbours of each query image."""
    from sdk.retriever import Retriever

    with Retriever.load(catalog, bundle=bundle, backend=backend, precision=precision, threads=threads,
                        token=token) as r:
        hits = r.search(list(images), k=k, threshold=threshold, ef_search=ef_search, nprobe=nprobe,
                        filter=filter_expr)
    if as_json:
        click.echo(json.dumps([{"query": q, "hits": [{"id": h.id, "score": round(h.score, 6), "metadata": h.metadata}
                                                      for h in row]} for q, row in zip(images, hits)], indent=2))
    else:
        for q, row in zip(images, hits):
            click.echo(f"{q}")
            if not row:
                click.echo("   (no hits)")
            for rank, h in enumerate(row, 1):
                label = (h.metadata or {}).get("label")
                click.echo(f"  {rank:3d}. {h.score:7.4f}  {h.id}" + (f"  [{label}]" if label is not None else ""))
    if grid:
        from sdk.viz import save_grid

        save_grid(grid, list(images), hits)
        click.echo(f"wrote {grid}", err=True)


@main.command("info")
@click.argument("path", callback=lambda ctx, param, value: _catalogue_arg(value))
@_token
@_friendly
def info_cmd(path, token):
    """Describe a bundle (variants, parity), a catalogue (size, index, model) or a Milvus store."""
    from sdk.backends import open_runner, runtime_status
    from sdk.bundle import MANIFEST_NAME, load_manifest
    from sdk.catalog import Catalog
    from sdk.catalog.milvus import MilvusStore, is_store_uri

    if is_store_uri(path):
        store = MilvusStore(path, token=token, create=False)
        click.echo(store.describe())
        store.close()
    elif os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        m = load_manifest(path)  # every file's SHA-256
        click.echo(f"bundle {path}: dim {m.embedding_dim}, input {m.input.name} {m.input.shape}, digest {m.digest()[:12]}")
        for v in m.variants:
            if runtime_status(v.backend)[0]:  # the model's own output width must be the manifest's
                open_runner(path, m, v).close()
            p = v.parity
            r1 = (p.get("metrics") or {}).get("recall@1")
            facts = [f"R@1 {100 * r1:.2f}" if isinstance(r1, (int, float)) else None,
                     f"drop {p['recall1_drop']:+.2f} pts (tolerance {p.get('tolerance')})" if "recall1_drop" in p else None,
                     f"{p['images_per_s']:.0f} img/s" if isinstance(p.get("images_per_s"), (int, float)) else None]
            click.echo(f"  {v.name:24s} {'passed' if v.passed else 'FAILED'}  " + ", ".join(f for f in facts if f))
    else:
        Catalog.load(path)  # every file's SHA-256 and the index itself, not only the header
        h = Catalog.read_header(path)
        model = h.get("model") or {}
        click.echo(f"catalogue {path}: {h['entries']} entries, dim {h['dim']}, index {h['index']}, "
                   f"ids {h['id_kind']}, model {str(model.get('manifest_digest', '-'))[:12]} ({model.get('bundle', '-')})")


@main.command("copy")
@click.argument("source", callback=lambda ctx, param, value: _catalogue_arg(value))
@click.argument("target")
@_token
@click.option("--index", "index_kind", default=None, type=click.Choice(["auto", "flat", "hnsw", "ivfpq"]),
              help="Index of the target (default: the source's kind; a store: HNSW).")
@click.option("--overwrite", is_flag=True, help="Replace an existing catalogue folder at TARGET.")
@_friendly
def copy_cmd(source, target, token, index_kind, overwrite):
    """Copy a catalogue folder into a Milvus store, or a store into a folder: ids, vectors, metadata, model."""
    from sdk.catalog.copy import copy_catalogue

    n = copy_catalogue(source, target, token=token, index=index_kind, overwrite=overwrite,
                       progress=sys.stderr.isatty())
    click.echo(f"copied {n} entries from {source} to {target}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
