"""Fixtures and settings only; the helpers tests share are in helpers.py."""

import os

import pytest
from hypothesis import settings

# CI decides whether a submission lands: there, property tests draw the same examples on every run (a fresh
# counterexample must not turn a landing red by chance); on developers' machines they explore new ones each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(autouse=True)
def _private_tune_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's tuning cache or calibration; CPU planning rests on the shipped
    Zen 3 profile on every host (tests of the basis selection and of auto-tuning unset this)."""
    monkeypatch.setenv("GCONV_REWRITE_CACHE", str(tmp_path / "tune-cache.json"))
    monkeypatch.setenv("GCONV_REWRITE_PROFILE", "cpu")
