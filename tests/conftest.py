"""Shared fixtures; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import default_model_path


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()
