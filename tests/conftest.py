"""pytest fixtures shared by every test module: where the reference fixtures live, a seed per test
(plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURE_DIRS, TINY_CONVNEXT, TINY_RESNET, TINY_VIT  # noqa: F401 - test_reference_parity reads them here

# One intra-op thread: tiny tensors gain nothing from more, CPU results become bitwise reproducible, and
# OpenMP threads spinning against other processes on a busy 2-core machine can slow a test 20-fold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of checkpoints written by the reference code (../shared/fixtures/reference beside the repo)."""
    for folder in FIXTURE_DIRS:
        if (folder / "outputs.pt").is_file():
            return folder
    if os.environ.get("CI"):
        pytest.fail(f"reference fixtures not found in {[str(d) for d in FIXTURE_DIRS]}")
    pytest.skip("reference fixtures not found; set SIMPOOL_FIXTURES to their folder")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
