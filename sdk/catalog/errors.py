"""The catalogue's error types, all under :class:`sdk.errors.IbcError` (and ``ValueError``, as before)."""

from __future__ import annotations

from sdk.errors import IbcError


class CatalogError(IbcError, ValueError):
    """Bad input to, or an unusable state of, a catalogue."""


class VectorError(CatalogError):
    """Vectors of the wrong shape, dtype or with NaN / inf / zero rows."""


class DuplicateIdError(CatalogError):
    """An id given to ``add`` is repeated in the batch or already in the catalogue."""


class UnknownIdError(CatalogError, KeyError):
    """``remove`` was asked for ids the catalogue does not hold."""

    __str__ = ValueError.__str__  # KeyError would quote the whole message


class CatalogFormatError(CatalogError):
    """A saved catalogue is missing files, partially written, tampered with or of an unknown schema."""


class CatalogMismatchError(CatalogError):
    """A saved catalogue was built with a different model than the one it is opened with."""


class StoreError(CatalogError):
    """A vector store (e.g. a Milvus server) is unreachable, refuses a request or is not installed."""
