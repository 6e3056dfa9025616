"""``run_pipeline``: train -> export -> catalogue -> query -> report in one run folder, resumable.

Each stage writes under ``OUT/<stage>/`` and, when finished, ``OUT/<stage>/done.json`` with its
inputs and summary (:mod:`pipeline.state`). A rerun starts at the first unfinished stage (or one
whose inputs changed); ``from_stage`` discards that stage and the ones after it. When no variant
passes the export gate the catalogue and query stages are recorded as skipped and the report is
still written: partial results are results.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field

from sdk.errors import IbcError

from pipeline import catalogue_stage, export_stage, query_stage, report_stage, train_stage
from pipeline.context import Context
from pipeline.data import require_data, training_config
from pipeline.errors import PipelineError
from pipeline.logs import run_logging
from pipeline.options import RunOptions
from pipeline.state import STAGES, discard, first_to_run, read_done, resumable, write_done, write_started

log = logging.getLogger("pipeline")

MODULES = {"train": train_stage, "export": export_stage, "catalogue": catalogue_stage, "query": query_stage,
           "report": report_stage}


@dataclass
class PipelineResult:
    out: str
    ran: list[str] = field(default_factory=list)  # stages run this time
    reused: list[str] = field(default_factory=list)  # finished stages of an earlier run, kept
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why it could not run
    variants_passed: list[str] = field(default_factory=list)
    variants_failed: list[str] = field(default_factory=list)
    report_html: str | None = None
    seconds: float = 0.0

    @property
    def any_passed(self) -> bool:
        return bool(self.variants_passed)


def run_pipeline(opts: RunOptions, *, verbose: bool = False) -> PipelineResult:
    """Run (or resume) the pipeline described by ``opts``; see the module docstring."""
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    with run_logging(os.path.join(out, "run.log"), verbose):
        return _run(opts, out)


def _run(opts: RunOptions, out: str) -> PipelineResult:
    t_start = time.perf_counter()
    cfg = training_config(opts)
    ctx = Context(opts=opts, config=cfg, out=out)
    inputs = {s: copy.deepcopy(MODULES[s].inputs(ctx)) for s in STAGES}
    start, why = first_to_run(out, inputs, opts.from_stage)
    if start < len(STAGES):
        require_data(cfg, opts)  # every stage reads the images (training, the gate, the gallery, the thumbnails)
    # a stage killed half-way keeps its partial output (training resumes from last.pt) if its inputs are unchanged
    keep = start < len(STAGES) and opts.from_stage is None and resumable(out, STAGES[start], inputs[STAGES[start]])
    discard(out, STAGES[start + 1 if keep else start:])
    result = PipelineResult(out=out)
    result.reused = list(STAGES[:start])
    if start < len(STAGES):
        log.info("run %s: starting at %s (%s)%s", out, STAGES[start], why,
                 f"; reusing {', '.join(result.reused)}" if result.reused else "")
    else:
        log.info("run %s: %s; nothing to do (use --from STAGE to redo one)", out, why)
    for stage in STAGES[start:]:
        skip = _why_skip(ctx, stage)
        t0 = time.perf_counter()
        if skip:
            log.warning("%s: skipped, %s", stage, skip)
            summary = {"skipped": skip}
            result.skipped[stage] = skip
        else:
            log.info("%s: started", stage)
            write_started(out, stage, inputs[stage])
            try:
                summary = MODULES[stage].run(ctx)
            except PipelineError:
                raise
            except IbcError as e:
                raise PipelineError(f"{stage} stage failed: {e} (fix it and rerun the same command: the run resumes "
                                    f"at {stage})") from e
        ctx.records[stage] = write_done(out, stage, inputs[stage], summary, time.perf_counter() - t0)
        if not skip:
            log.info("%s: finished in %.1f s", stage, time.perf_counter() - t0)
        if stage not in result.ran and not skip:
            result.ran.append(stage)
    export = (read_done(out, "export") or {}).get("summary") or {}
    for v in export.get("variants", []):
        (result.variants_passed if v["passed"] else result.variants_failed).append(v["name"])
    report = (read_done(out, "report") or {}).get("summary") or {}
    result.report_html = report.get("html")
    result.seconds = time.perf_counter() - t_start
    return result


def _why_skip(ctx: Context, stage: str) -> str:
    if stage in ("catalogue", "query"):
        export = ctx.summary("export") or {}
        if not export.get("bundle"):
            return "no variant passed the export gate, so there is no bundle to index with"
    if stage == "query" and (ctx.summary("catalogue") or {}).get("skipped"):
        return "the catalogue stage was skipped"
    return ""


__all__ = ["run_pipeline", "PipelineResult", "STAGES"]
