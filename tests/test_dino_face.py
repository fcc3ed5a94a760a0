"""The simpool.dino package face: the names of the issue import from it; ``import simpool`` does not load it."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_face_names_and_import_layering():
    code = (
        "import sys, simpool\n"
        "assert not [m for m in sys.modules if m.startswith('simpool.dino')], 'import simpool loaded simpool.dino'\n"
        "from simpool.dino import (DINOLoss, DINOHead, MultiCropWrapper, DINOStep, DataAugmentationDINO,\n"
        "                          GPUMultiCrop, cosine_scheduler, build_optimizer)\n"
        "import simpool.dino.loss, simpool.dino.step\n"
        "assert DINOLoss is simpool.dino.loss.DINOLoss and DINOStep is simpool.dino.step.DINOStep\n"
        "assert 'simpool.dino.train' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
