"""Shared test settings: where the speech data lives, and Triton's CPU interpreter."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Triton kernels run on CPU through the interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from data import data_root  # noqa: E402  (one setting for the data folder: $FASTWHISPER_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "test-clean").is_dir():
        pytest.fail(f"speech data not found at {root}; set FASTWHISPER_DATA to the shared data folder")
    return root
