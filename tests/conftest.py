"""pytest fixtures shared by every test module: where the reference fixtures live, a seed per test
(plain helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURE_DIRS, REPO, TINY_CONVNEXT, TINY_RESNET, TINY_VIT  # noqa: F401 - test_reference_parity reads them here

_UNTRACKED = pytest.StashKey[set]()

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


def _untracked_files() -> set[str]:
    """Files in the checkout git neither tracks nor ignores (empty outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


def pytest_sessionstart(session):
    session.config.stash[_UNTRACKED] = _untracked_files()


def pytest_sessionfinish(session, exitstatus):
    """A tool run by a test with its default output folder (".") writes into the checkout: fail the run, naming
    the files, instead of leaving them for a commit (every test works in tmp_path)."""
    new = sorted(_untracked_files() - session.config.stash.get(_UNTRACKED, set()))
    if new:
        print(f"\nerror: the tests left files in the checkout: {', '.join(new[:10])}; a test ran a tool without "
              "--output_dir (it defaults to .): give it tmp_path", file=sys.stderr)
        session.exitstatus = 1
