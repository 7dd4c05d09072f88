"""Fixtures only; the helpers tests share are in helpers.py."""

import pytest


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture(autouse=True)
def _private_tune_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's tuning cache."""
    monkeypatch.setenv("GCONV_REWRITE_CACHE", str(tmp_path / "tune-cache.json"))
