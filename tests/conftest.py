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


@pytest.fixture(scope="session")
def transcript_lines(data_dir) -> list:
    """Every reference line in the shared data: LibriSpeech trans.txt, long-form .txt, jfk.txt."""
    lines = []
    for path in sorted(data_dir.rglob("*.trans.txt")):
        lines += [line.partition(" ")[2] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for path in sorted((data_dir / "longform").glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) > 500, "expected the LibriSpeech transcripts under data_dir"
    return lines
