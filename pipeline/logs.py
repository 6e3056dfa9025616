"""Logging for a pipeline run: the terminal gets bars and lines, ``run.log`` one line per epoch or stage.

Why a filter on the file: a log file is read after the fact, so it keeps what the pipeline and
the trainer say at INFO (a stage started / finished, an epoch's loss and recall) and only
warnings from the libraries underneath; progress bars are drawn only on a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

FILE_INFO_LOGGERS = ("pipeline", "trainer")
NOISY = ("PIL", "matplotlib", "faiss", "nncf", "openvino", "onnxruntime", "torch", "onnxscript", "onnx_ir",
         "sklearn")


def bars_wanted() -> bool:
    """tqdm bars only when stderr is a terminal: in a file they are carriage-return frames."""
    return sys.stderr.isatty()


class _FileFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.split(".")[0] in FILE_INFO_LOGGERS


@contextlib.contextmanager
def run_logging(log_path: str, verbose: bool = False) -> Iterator[None]:
    """Log to stderr (INFO, or DEBUG with ``verbose``) and append to ``log_path`` for the duration."""
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    added = []
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)
        added.append(console)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.addFilter(_FileFilter())
    root.addHandler(file_handler)
    added.append(file_handler)
    levels = {n: logging.getLogger(n).level for n in NOISY}
    for n in NOISY:
        logging.getLogger(n).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        for h in added:
            root.removeHandler(h)
            h.close()
        root.setLevel(old_level)
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


__all__ = ["run_logging", "bars_wanted"]
