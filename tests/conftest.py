"""Shared test fixtures: the repo root on sys.path and the parity-fixture folder."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parity_dir() -> Path:
    return Path(os.environ.get("LD_PARITY_DIR", ROOT.parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """Folder of reference outputs made by the original code (see its README).

    Skips with a reason where it is absent; in CI (CI=true) a missing folder is a failure,
    because the parity tests are the point of the suite there."""
    d = _parity_dir()
    if not (d / "README.md").exists():
        msg = f"parity fixtures not found at {d} (set LD_PARITY_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d
