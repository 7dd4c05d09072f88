"""The linter is part of the test suite, so CI runs it with the README's test command."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if exe is None:  # the [test] extra installs it; a missing linter must fail, not skip
        pytest.fail("ruff is not installed: pip install '.[test]'")
    return [exe]


def test_ruff_finds_nothing():
    """pyproject.toml's [tool.ruff] rules (the code's own habits: 120 columns, no imports in functions, ...)."""
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_would_catch_a_violation(tmp_path):
    """The check is live: the same configuration refuses an import inside a function of the package."""
    bad = tmp_path / "gconv_rewrite" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    import os\n    return os\n")
    proc = subprocess.run(_ruff() + ["check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "PLC0415" in proc.stdout, proc.stdout + proc.stderr
