"""The pipeline's expected errors: each names the stage, file or setting at fault (the CLI prints one line)."""

from __future__ import annotations

from sdk.errors import IbcError


class PipelineError(IbcError, RuntimeError):
    """A stage cannot run or go on (missing data folder, unreadable stage output, ...)."""


class DataFolderMissing(PipelineError):
    """The data set folder is absent; the message says where to put it."""
