"""Catalogues saved by the SDK before sdk/catalog/ became a package still load and answer the same.

The folders under tests/fixtures/catalog_v1/ were written by tests/fixtures/make_catalog_v1.py with
that older code, together with the hits it returned; nothing here regenerates them.
"""

import json
import os
import shutil

import numpy as np
import pytest

from sdk.catalog import Catalog, CatalogMismatchError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "catalog_v1")
MODEL = {"manifest_digest": "f" * 64, "embedding_dim": 16, "preprocess": {"resize": 20, "crop": 16}}


@pytest.mark.parametrize("name", ["flat", "hnsw", "hnsw_projected", "ivfpq"])
def test_catalogue_saved_in_the_v1_layout_loads_and_answers_the_same(tmp_path, name):
    with open(os.path.join(FIXTURES, f"{name}.expected.json")) as f:
        expected = json.load(f)
    q = np.load(os.path.join(FIXTURES, "queries.npy"))
    folder = shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)  # never write into the fixture
    cat = Catalog.load(folder, model=MODEL)
    assert cat.kind == expected["kind"] and len(cat) == expected["entries"]
    assert cat.ids() == expected["ids"] and not set(expected["removed"]) & set(cat.ids())
    hits = cat.search(q, k=5, ef_search=32, nprobe=4)
    assert [[h.id for h in row] for row in hits] == [[h[0] for h in row] for row in expected["hits"]]
    assert [[h.metadata for h in row] for row in hits] == [[h[2] for h in row] for row in expected["hits"]]
    np.testing.assert_allclose([[h.score for h in row] for row in hits],
                               [[h[1] for h in row] for row in expected["hits"]], atol=1e-5)
    if expected["next_id"] is not None:  # the id counter carried over
        assert cat.add(q[:1]) == [expected["next_id"]]
    with pytest.raises(CatalogMismatchError):
        Catalog.load(folder, model={**MODEL, "manifest_digest": "0" * 64})
