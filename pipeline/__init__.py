"""The main job in one command: train -> export -> catalogue -> query -> report (``ibc-run``).

    from pipeline import run_pipeline, RunOptions
    result = run_pipeline(RunOptions(out="runs/flowers"))      # the Flowers preset; resumable
    print(result.report_html, result.variants_failed)

One module per stage (``train_stage``, ``export_stage``, ``catalogue_stage``, ``query_stage``,
``report_stage``); :mod:`pipeline.runner` runs them in order and resumes a run folder.
"""

from pipeline.errors import DataFolderMissing, PipelineError
from pipeline.options import ExportOptions, RunOptions
from pipeline.state import STAGES


def run_pipeline(opts: RunOptions, **kw):
    from pipeline.runner import run_pipeline as _run

    return _run(opts, **kw)


__all__ = ["run_pipeline", "RunOptions", "ExportOptions", "PipelineError", "DataFolderMissing", "STAGES"]
