"""``ibc-run``: the main job in one command, resumable, ending with a report.

    ibc-run --out runs/flowers                                  # the Flowers preset (configs/flowers102-lite0-cpu.yaml)
    ibc-run --out runs/mine --folder photos/                    # any photos/<class>/<image> folder
    ibc-run --out runs/flowers --from export --tolerance int8=1  # redo export and everything after it

Exit codes: 0 the run finished and every exported variant passed its gate (or some failed: they
are shown in the report and left out of the bundle); 1 an expected error (one line naming the
stage and file or setting); 2 usage; 3 no variant passed its gate, or one failed with --strict
(the report is written either way); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import sys

import click

from pipeline.options import DEFAULT_PRESET
from pipeline.state import STAGES

EXIT_ERROR, EXIT_GATE, EXIT_INTERRUPTED = 1, 3, 130


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder: train/, export/, catalogue/, query/, report/ (index.html), run.log.")
@click.option("--config", default=DEFAULT_PRESET, help="Preset name (configs/NAME.yaml) or a YAML file.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="The preset's data set folder, if not where the preset says.")
@click.option("--folder", type=click.Path(file_okay=False), default=None,
              help="Train and search any ROOT/<class>/<image> folder (first half of the classes trains).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a training config value, e.g. --set optim.epochs=2 (repeatable).")
@click.option("--from", "from_stage", type=click.Choice(STAGES), default=None,
              help="Redo this stage and every one after it (default: resume at the first unfinished stage).")
@click.option("--strict", is_flag=True, help="Exit 3 when any variant fails its gate.")
@click.option("--backend", "backends", default="onnx,openvino", help="Export backends (comma list).")
@click.option("--precision", "precisions", default="fp32,fp16,int8", help="Export precisions (comma list).")
@click.option("--tolerance", default=None, help="Allowed Recall@1 drop in points, e.g. int8=0.5,fp16=0.1.")
@click.option("--parity-limit", type=click.IntRange(2), default=None, help="Cap the export's held-out parity set.")
@click.option("--calib-size", type=click.IntRange(1), default=300, help="int8 calibration images (training split).")
@click.option("--queries-per-class", default=2, type=click.IntRange(1),
              help="Held-out images per class used as queries (never indexed).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Runtime threads for indexing and queries.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(out, config, data_root, folder, overrides, from_stage, strict, backends, precisions, tolerance,
         parity_limit, calib_size, queries_per_class, threads, verbose):
    """Train, export, index the held-out gallery, query it, and write OUT/report/index.html."""
    from sdk.errors import IbcError

    from pipeline.options import ExportOptions, RunOptions
    from pipeline.runner import run_pipeline

    if folder and data_root:
        raise click.UsageError("--folder and --data-root are exclusive: --folder replaces the preset's data set")
    opts = RunOptions(out=out, config=config, overrides=list(overrides), data_root=data_root, folder=folder,
                      from_stage=from_stage, strict=strict, queries_per_class=queries_per_class, threads=threads,
                      export=ExportOptions(backends=backends, precisions=precisions, tolerance=tolerance,
                                           parity_limit=parity_limit, calib_size=calib_size))
    try:
        result = run_pipeline(opts, verbose=verbose)
    except IbcError as e:
        click.echo(f"ibc-run: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo(f"ibc-run: interrupted; run the same command again to resume {out}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if result.report_html:
        click.echo(f"report: {result.report_html}")
    if result.variants_failed:
        click.echo(f"failed the gate: {', '.join(result.variants_failed)}; "
                   + (f"the bundle ships {', '.join(result.variants_passed)}" if result.variants_passed
                      else "no variant passed, no bundle"), err=True)
    if not result.any_passed or (strict and result.variants_failed):
        sys.exit(EXIT_GATE)


if __name__ == "__main__":  # pragma: no cover
    main()
