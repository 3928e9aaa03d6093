"""Shared fixtures: the reference model spec and paths to the shared development data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(TESTS))  # for model_zoo


@pytest.fixture
def default_spec():
    from fedcoreml.ios_bridge.default_model import build_default_model

    return build_default_model(seed=0)


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"shared MNIST data not found at {SHARED_MNIST}")
    return SHARED_MNIST
