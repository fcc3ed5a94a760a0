"""Shared test helpers: where the reference fixtures live, tiny model settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIRS = [
    Path(os.environ.get("SIMPOOL_FIXTURES", REPO / "tests" / "fixtures" / "reference")),
    REPO.parent / "shared" / "fixtures" / "reference",
]

# One intra-op thread: tiny tensors gain nothing from more, CPU results become bitwise reproducible, and
# OpenMP threads spinning against other processes on a busy 2-core machine can slow a test 20-fold.
torch.set_num_threads(1)

TINY_VIT = {"depth": 2, "embed_dim": 192, "num_heads": 3}
TINY_RESNET = {"layers": (1, 1, 1, 1)}
TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (32, 64, 128, 256)}


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
