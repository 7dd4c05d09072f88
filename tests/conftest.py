"""Fixtures only; the helpers tests share are in helpers.py."""

import pytest


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(autouse=True)
def _private_tune_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's tuning cache or calibration; CPU planning rests on the shipped
    Zen 3 profile on every host (tests of the basis selection and of auto-tuning unset this)."""
    monkeypatch.setenv("GCONV_REWRITE_CACHE", str(tmp_path / "tune-cache.json"))
    monkeypatch.setenv("GCONV_REWRITE_PROFILE", "cpu")
