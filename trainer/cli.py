"""``ibc-train``: train IBC from a YAML preset, resume a run, or evaluate a checkpoint.

Examples::

    ibc-train --config configs/flowers102-cpu.yaml --data-root ../shared/data/flowers102 --out runs/x
    ibc-train --config configs/flowers102-cpu.yaml --out runs/x --set optim.lr=2e-3 --set model.use_mpn=false
    ibc-train --out runs/x --resume                       # continue a killed run (config from runs/x)
    ibc-train --eval-only runs/x/best.pt --data-root ../shared/data/flowers102
    ibc-train --pretrained-baseline --config configs/flowers102-lite0-cpu.yaml   # the untrained starting point
    torchrun --nproc_per_node 2 -m trainer.cli --config ... --out runs/ddp --set runtime.mpn_global_batch=true
"""

from __future__ import annotations

import logging
import os
import sys

import click

from sdk.cli_errors import OneLineCommand, one_line

EXIT_BAD_INPUT = 2  # one line on stderr naming the file or key (README "Bad input"); 130: interrupted


def _setup_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML preset (configs/*.yaml). With --resume, defaults to OUT/config.yaml.")
@click.option("--data-root", default=None, help="Dataset folder (overrides data.root).")
@click.option("--out", "out_dir", default=None, help="Run folder (config.yaml, last.pt, best.pt, metrics.jsonl, plots/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set optim.lr=1e-3 --set model.use_mpn=false (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--eval-only", "eval_ckpt", type=click.Path(dir_okay=False), default=None,
              help="Only evaluate this checkpoint on the test classes.")
@click.option("--pretrained-baseline", "baseline", is_flag=True,
              help="Only evaluate the config's pretrained backbone without training (pooled trunk features, no "
                   "head): the starting point a trained model must beat. Saved to OUT/baseline_metrics.json.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set runtime.seed=N.")
@click.option("--threads", type=int, default=None, help="Shortcut for --set runtime.threads=N.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(config_path, data_root, out_dir, overrides, resume, eval_ckpt, baseline, seed, threads, verbose):
    """Train Intra-Batch Connections (backbone + MPN) end to end, or evaluate a checkpoint."""
    _setup_logging(verbose)
    log = logging.getLogger("trainer")
    from sdk.errors import IbcError
    from trainer.config import ConfigError, deep_merge, load_config, parse_override
    from trainer.baseline import evaluate_baseline
    from trainer.loop import evaluate_checkpoint, train

    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"runtime.seed={seed}")
    if threads is not None:
        overrides.append(f"runtime.threads={threads}")
    try:
        if eval_ckpt:
            extra: dict = {}
            for o in overrides:
                extra = deep_merge(extra, parse_override(o))
            if threads:
                import torch

                torch.set_num_threads(threads)
            evaluate_checkpoint(eval_ckpt, data_root=data_root, overrides=extra, out_dir=out_dir)
            return
        if baseline:
            if data_root:
                overrides.append(f"data.root={data_root}")
            evaluate_baseline(load_config(config_path, overrides), out_dir=out_dir)
            return
        if not out_dir:
            raise ConfigError("--out is required for training")
        if resume and config_path is None:
            config_path = os.path.join(out_dir, "config.yaml")
            if not os.path.isfile(config_path):
                raise ConfigError(f"--resume: {config_path} not found (no run to resume there); pass --config")
        if data_root:
            overrides.append(f"data.root={data_root}")
        cfg = load_config(config_path, overrides)
        result = train(cfg, out_dir, resume=resume)
        if result.test_metrics:
            click.echo(f"run folder: {out_dir}  (best: {result.best_checkpoint})")
    except IbcError as e:  # every expected failure: bad config, data, checkpoint, image, missing weights
        log.error("%s", one_line(e))
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        log.error("interrupted; resume with: ibc-train --out %s --resume", out_dir)
        sys.exit(130)


if __name__ == "__main__":
    main()
