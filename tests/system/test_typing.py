"""mypy --strict over agent/, where mypy is installed (the latest-PyPI leg)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is installed only in the latest-PyPI leg")
def test_mypy_strict() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "agent"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
