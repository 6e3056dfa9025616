"""ibc-export: checkpoint -> ONNX / OpenVINO / TensorRT variants, gated on Recall@K -> bundle.

Use :func:`export_bundle` from Python, or the ``ibc-export`` command (:mod:`export.cli`).
Imports here are lazy so ``import export`` stays cheap.
"""

from export.errors import BackendUnavailable, DataSetError, ExportError, GateFailure, NumericCheckError

__all__ = ["export_bundle", "ExportResult", "ExportError", "BackendUnavailable", "DataSetError", "GateFailure",
           "NumericCheckError"]


def __getattr__(name):
    if name in ("export_bundle", "ExportResult"):
        from export import api

        return getattr(api, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
