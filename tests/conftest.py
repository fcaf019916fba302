"""Shared test setup: never touch the network, keep torch single-process friendly."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("GHOSTIFY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def user_model_file() -> Path:
    return FIXTURES / "user_model.py"
