"""The catalogue: vectors of one model under user ids with JSON metadata, searchable while it changes.

One module per concern: :mod:`~sdk.catalog.index` (the ``Index`` interface) with one module per
index type (:mod:`~sdk.catalog.flat` with the certified :mod:`~sdk.catalog.int8_scan`,
:mod:`~sdk.catalog.hnsw` with the learned projection, :mod:`~sdk.catalog.ivfpq`); beside them
the id map (:mod:`~sdk.catalog.ids`), the lock, the folder on disk
(:mod:`~sdk.catalog.persistence`) and the model check; :mod:`~sdk.catalog.catalog` composes them.
:mod:`~sdk.catalog.milvus` keeps the same catalogue in a Milvus collection instead.
"""

from sdk.catalog.catalog import (
    AUTO_FLAT_MAX,
    ENTRIES_FILE,
    INDEX_TYPES,
    MIN_PQ_TRAIN,
    Catalog,
    choose_index,
    estimate_bytes,
)
from sdk.catalog.errors import (
    CatalogError,
    CatalogFormatError,
    CatalogMismatchError,
    DuplicateIdError,
    StoreError,
    UnknownIdError,
    VectorError,
)
from sdk.catalog.hnsw import projection_matrix
from sdk.catalog.ids import AddReport, Hit, normalize_id
from sdk.catalog.index import DELETED_FILE, INDEX_FILE, Index
from sdk.catalog.int8_scan import INT8_MIN_ENTRIES, INT8_TOPK_ONNX, Int8ExactScan, int8_scan_available
from sdk.catalog.ivfpq import ivfpq_params
from sdk.catalog.lock import RWLock
from sdk.catalog.model import check_same_model, describe_model
from sdk.catalog.persistence import CATALOG_FILE, CATALOG_FORMAT, CATALOG_SCHEMA_VERSION
from sdk.catalog.spec import INDEX_KINDS, IndexSpec, SearchParams, parse_memory
from sdk.catalog.vectors import as_vectors, faiss_search

__all__ = [
    "Catalog", "Hit", "AddReport", "Index", "IndexSpec", "SearchParams", "RWLock", "CatalogError", "VectorError",
    "DuplicateIdError", "UnknownIdError", "CatalogFormatError", "CatalogMismatchError", "StoreError", "as_vectors",
    "choose_index", "estimate_bytes", "ivfpq_params", "parse_memory", "check_same_model", "describe_model",
    "normalize_id", "projection_matrix", "faiss_search", "Int8ExactScan", "int8_scan_available", "INT8_TOPK_ONNX",
    "INT8_MIN_ENTRIES", "INDEX_KINDS", "INDEX_TYPES", "CATALOG_FILE", "CATALOG_FORMAT", "CATALOG_SCHEMA_VERSION",
    "ENTRIES_FILE", "INDEX_FILE", "DELETED_FILE", "AUTO_FLAT_MAX", "MIN_PQ_TRAIN",
]
