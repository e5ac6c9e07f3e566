"""ruff's checks (pyflakes, the error classes E4/E7/E9, lines over 120 characters (E501) and bugbear, as
pyproject.toml selects them) find nothing in the repository. ruff comes with the dev extras; without it the
test skips, except under CI=true, where that is a failure."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ruff is not installed: pip install -e '.[dev]'")
        pytest.skip("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
