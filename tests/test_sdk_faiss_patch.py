"""The catalogue keeps working after faiss.contrib.torch_utils patched faiss (as PML's import does)."""

import subprocess
import sys

CODE = r"""
import numpy as np
import faiss.contrib.torch_utils  # noqa: F401  - what `import pytorch_metric_learning` does
from sdk.catalog import Catalog
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 16)).astype(np.float32)
for kind in ("flat", "hnsw"):
    c = Catalog(dim=16, index=kind)
    c.add(x, ids=list(range(300)))
    c.remove([0])
    hits = c.search(x[:5], k=3)
    assert hits[1][0].id == 1 and all(h.id != 0 for row in hits for h in row), kind
print("ok")
"""


def test_catalog_search_after_torch_utils_patch():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
