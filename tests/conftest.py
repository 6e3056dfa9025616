"""Shared test fixtures: the real data under ../shared/data (read, never copied into the repo)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IBC_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def flowers_images(shared_data) -> list[Path]:
    """A few real Flowers-102 JPEGs from two held-out classes."""
    files = sorted((shared_data / "flowers102" / "images" / "052").glob("*.jpg"))[:6]
    files += sorted((shared_data / "flowers102" / "images" / "090").glob("*.jpg"))[:6]
    if not files:
        pytest.skip("flowers102 images missing")
    return files
