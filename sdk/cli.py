"""``ibc-retrieve``: index a folder of images with a bundle, query the saved catalogue, inspect either.

    ibc-retrieve index BUNDLE IMAGES_DIR --out catalog/
    ibc-retrieve query catalog/ query1.jpg query2.jpg -k 5 [--grid hits.png] [--json]
    ibc-retrieve info BUNDLE_OR_CATALOG

Ids are the image paths relative to IMAGES_DIR; metadata holds the absolute path and the label
(the first folder under IMAGES_DIR, as in an image-folder layout). Errors are one line, no
traceback (``-v`` shows logging).
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

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _friendly(fn):
    """Turn the SDK's expected errors into a one-line ``Error: ...`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sdk.backends import BackendError

        try:
            return fn(*args, **kwargs)
        except (ValueError, BackendError, FileExistsError, FileNotFoundError, PermissionError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


@click.group()
@click.option("-v", "--verbose", count=True, help="-v: info logging, -vv: debug.")
def main(verbose: int) -> None:
    """Embed images with an exported ibc bundle and search them (no torch needed)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_backend = click.option("--backend", default="auto", show_default=True,
                        type=click.Choice(["auto", "tensorrt", "openvino", "onnxruntime"]))
_precision = click.option("--precision", default="auto", show_default=True,
                          type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8"]))
_threads = click.option("--threads", type=int, default=None, help="Runtime threads (default: the runtime's).")


@main.command("index")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Catalogue directory to write.")
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
def index_cmd(bundle, images_dir, out, index_kind, hnsw_dims, backend, precision, threads, batch_size, on_error,
              overwrite, decode, decode_workers):
    """Embed every image under IMAGES_DIR with BUNDLE and save a catalogue to --out."""
    from sdk.retriever import Retriever

    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} already exists (use --overwrite to replace it)")
    files = find_images(images_dir)
    if not files:
        raise click.ClickException(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {images_dir}")
    root = Path(images_dir)
    ids = [f.relative_to(root).as_posix() for f in files]
    meta = [{"path": str(f.resolve()), "label": (Path(i).parts[0] if len(Path(i).parts) > 1 else None)}
            for f, i in zip(files, ids)]
    t0 = time.perf_counter()
    with Retriever.from_bundle(bundle, backend=backend, precision=precision, threads=threads,
                               index=index_kind, hnsw_dims=hnsw_dims, decode=decode,
                               decode_workers=decode_workers) as r:
        click.echo(f"model: {r.variant.name} ({r.info()['reason']}); {len(files)} images", err=True)
        report = r.add(files, ids=ids, metadata=meta, on_error=on_error, batch_size=batch_size,
                       progress=sys.stderr.isatty())
        r.save(out, overwrite=True)
        dt = time.perf_counter() - t0
        for pos, source, reason in report.skipped:
            click.echo(f"skipped {source}: {reason}", err=True)
        click.echo(f"indexed {len(report.ids)} images ({len(report.skipped)} skipped) into {out} "
                   f"[{r.catalog.kind} index, {len(report.ids) / max(dt, 1e-9):.1f} images/s]")


@main.command("query")
@click.argument("catalog", type=click.Path(exists=True, file_okay=False))
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Also write a PNG grid of the hits.")
@_friendly
def query_cmd(catalog, images, k, bundle, threshold, ef_search, nprobe, backend, precision, threads, as_json, grid):
    """Search CATALOG for the nearest neighbours of each query image."""
    from sdk.retriever import Retriever

    with Retriever.load(catalog, bundle=bundle, backend=backend, precision=precision, threads=threads) as r:
        hits = r.search(list(images), k=k, threshold=threshold, ef_search=ef_search, nprobe=nprobe)
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
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@_friendly
def info_cmd(path):
    """Describe a bundle (variants, parity) or a catalogue (size, index, model)."""
    from sdk.bundle import MANIFEST_NAME, load_manifest
    from sdk.catalog import Catalog

    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        m = load_manifest(path)
        click.echo(f"bundle {path}: dim {m.embedding_dim}, input {m.input.name} {m.input.shape}, digest {m.digest()[:12]}")
        for v in m.variants:
            p = v.parity
            r1 = (p.get("metrics") or {}).get("recall@1")
            facts = [f"R@1 {100 * r1:.2f}" if isinstance(r1, (int, float)) else None,
                     f"drop {p['recall1_drop']:+.2f} pts (tolerance {p.get('tolerance')})" if "recall1_drop" in p else None,
                     f"{p['images_per_s']:.0f} img/s" if isinstance(p.get("images_per_s"), (int, float)) else None]
            click.echo(f"  {v.name:24s} {'passed' if v.passed else 'FAILED'}  " + ", ".join(f for f in facts if f))
    else:
        h = Catalog.read_header(path)
        model = h.get("model") or {}
        click.echo(f"catalogue {path}: {h['entries']} entries, dim {h['dim']}, index {h['index']}, "
                   f"ids {h['id_kind']}, model {str(model.get('manifest_digest', '-'))[:12]} ({model.get('bundle', '-')})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
