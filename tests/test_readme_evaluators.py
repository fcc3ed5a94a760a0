"""The README's generated-data commands for DINO's other evaluators run as typed (slow: three evaluators on CPU)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def generated_data_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Retrieval, copy detection, video segmentation"):text.index("## Clusters")]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Debian package dataset-fashion-mnist is not installed")
def test_generated_data_commands_run_as_typed(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fixtures").symlink_to(REPO / "tests" / "fixtures")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    commands = generated_data_commands()
    assert len(commands) == 6
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert json.loads((tmp_path / "runs/demo_retrieval/retrieval_roxford5k.json").read_text())["num_queries"] == 6
    assert "strong" in json.loads((tmp_path / "runs/demo_copydays/copy_detection.json").read_text())["map"]
    assert 0 <= json.loads((tmp_path / "runs/demo_davis/video_segmentation.json").read_text())["J&F-Mean"] <= 1
