"""Which stages of a run folder are finished: a ``done.json`` per stage, written last.

Why per stage: a rerun resumes from the first stage that is not finished, or whose inputs (the
config or options it was run with) changed; ``--from STAGE`` discards that stage's output and
everything after it. A stage killed half-way has no ``done.json`` and runs again (training
resumes from its own ``last.pt``).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from pipeline.errors import PipelineError

STAGES = ("train", "export", "catalogue", "query", "report")
DONE = "done.json"
STARTED = "started.json"


def stage_dir(out: str, stage: str) -> str:
    return os.path.join(out, stage)


def read_done(out: str, stage: str) -> dict | None:
    path = os.path.join(stage_dir(out, stage), DONE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path} is unreadable ({e}); rerun with --from {stage}") from None


def write_done(out: str, stage: str, inputs: dict, summary: dict, seconds: float) -> dict:
    """Mark ``stage`` finished (atomically: a half-written marker is never read as finished)."""
    record = {"stage": stage, "inputs": inputs, "summary": summary, "seconds": round(seconds, 2),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = os.path.join(stage_dir(out, stage), DONE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)
    return record


def write_started(out: str, stage: str, inputs: dict) -> None:
    """Record the inputs a stage started with: a killed stage resumes only with the same inputs."""
    path = os.path.join(stage_dir(out, stage), STARTED)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(inputs, f, default=str)


def resumable(out: str, stage: str, inputs: dict) -> bool:
    """True when ``stage`` was started with these inputs and not finished (its partial output can be reused)."""
    path = os.path.join(stage_dir(out, stage), STARTED)
    if read_done(out, stage) is not None or not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f) == json.loads(json.dumps(inputs, default=str))
    except (OSError, ValueError):
        return False


def discard(out: str, stages) -> None:
    """Remove the output of ``stages`` (they will run again)."""
    for s in stages:
        d = stage_dir(out, s)
        if os.path.isdir(d):
            shutil.rmtree(d)


def first_to_run(out: str, inputs: dict[str, dict], from_stage: str | None) -> tuple[int, str]:
    """Index of the first stage to (re)run and why."""
    if from_stage is not None:
        if from_stage not in STAGES:
            raise PipelineError(f"--from {from_stage!r}: choose one of {', '.join(STAGES)}")
        return STAGES.index(from_stage), f"--from {from_stage}"
    for i, s in enumerate(STAGES):
        done = read_done(out, s)
        if done is None:
            return i, "not finished" if i else "new run"
        if json.loads(json.dumps(inputs.get(s, {}), default=str)) != done.get("inputs"):
            return i, f"the {s} stage's inputs changed since it ran"
    return len(STAGES), "every stage is finished"


__all__ = ["STAGES", "stage_dir", "read_done", "write_done", "write_started", "resumable", "discard", "first_to_run"]
