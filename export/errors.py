"""Exceptions of the exporter: each names the file, variant or setting at fault.

Why a hierarchy: the CLI turns every :class:`ExportError` into one clear line and a non-zero exit,
while bugs (anything else) keep their traceback.
"""

from __future__ import annotations

from sdk.errors import IbcError


class ExportError(IbcError, RuntimeError):
    """The export cannot go on; the message says what and where."""


class BackendUnavailable(ExportError):
    """A requested backend (or the quantizer it needs) is not installed or has no device here."""


class DataSetError(ExportError):
    """A calibration / validation / parity image set is missing, empty, unlabelled or holds unreadable images."""


class NumericCheckError(ExportError):
    """An exported model disagrees numerically with the PyTorch model it came from."""


class GateFailure(ExportError):
    """One or more variants lost more Recall@1 than their tolerance allows.

    ``result`` is the :class:`export.api.ExportResult` (``None`` when nothing could be written).
    """

    def __init__(self, message: str, failed: list, result=None):
        super().__init__(message)
        self.failed = failed
        self.result = result
