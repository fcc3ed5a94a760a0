"""ONNX export (``utils/export_backbone.py CHECKPOINT OUT_DIR --onnx``): onnxruntime on the CPU gives the torch
features at several input sizes, and a missing onnx extra stops the command with the pip line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from simpool.checkpoint import FORMAT_KEY, FORMAT_VERSION
from simpool.cli.run_export import main
from simpool.loading import load_backbone
from simpool.models import build_backbone
from tests.helpers import REPO, TINY_RESNET, TINY_VIT, onnx_error

try:
    import onnxruntime
except ImportError:  # the [onnx] extra; `make install` (and so CI) installs it, where a skip would hide a gap
    if os.environ.get("CI"):
        raise
    pytest.skip("onnxruntime is not installed: pip install -e '.[onnx]'", allow_module_level=True)

CASES = {
    "simpool_vit": ("vit_tiny", "simpool", TINY_VIT),
    "official_vit": ("vit_tiny", "official", TINY_VIT),
    "simpool_resnet": ("resnet18", "simpool", TINY_RESNET),
}


def overrides(kwargs: dict) -> list[str]:
    return [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in kwargs.items()]


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_torch_at_two_sizes(case, tmp_path, capsys):
    arch, mode, kwargs = CASES[case]
    weights = tmp_path / "checkpoint.pth"  # a checkpoint of ours (a backbone-only file would mean DINO's weights)
    backbone = build_backbone(arch, mode=mode, **kwargs).state_dict()
    torch.save({FORMAT_KEY: FORMAT_VERSION, "teacher": {f"backbone.{k}": v for k, v in backbone.items()}}, weights)
    out = tmp_path / "export"
    code = main([str(weights), str(out), "--arch", arch, "--mode", mode, "--model_overrides", *overrides(kwargs),
                 "--onnx", "--onnx_image_size", "64"])
    assert code == 0, capsys.readouterr().err
    assert "onnxruntime matches torch" in capsys.readouterr().out
    model = load_backbone(out)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()[0]
    assert inputs.name == "images" and inputs.shape == ["batch", 3, "height", "width"]
    # the traced size, and another batch, height and width (a ViT resamples its position embeddings in-graph)
    for shape in [(1, 3, 64, 64), (3, 3, 96, 128)]:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert got.shape == expected.shape == (shape[0], model.embed_dim)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# Reference-rule ViTs (weights written by DINO / the SimPool fork) resample by a scale computed from the input size:
# simpool mode even at the trained 224 px, official mode everywhere but there. A backbone-only file is read as such
# weights too (a ViT-S/16 backbone file ended in a TypeError from upsample_bicubic2d while tracing).
REFERENCE_VITS = {
    "simpool_checkpoint": ("vit_simpool_dino_checkpoint.pth", []),
    "official_backbone": ("vit_official_backbone.pth", ["--arch", "vit_tiny", "--mode", "official"]),
}


@pytest.mark.parametrize("case", list(REFERENCE_VITS))
def test_reference_vit_weights_export_with_dynamic_height_and_width(case, reference_dir, tmp_path, capsys):
    name, flags = REFERENCE_VITS[case]
    out = tmp_path / "export"
    code = main([str(reference_dir / name), str(out), *flags, "--model_overrides", *overrides(TINY_VIT), "--onnx"])
    assert code == 0, capsys.readouterr().err
    model = load_backbone(out)
    assert model.pos_embed_resampling == "reference"
    assert onnx_error(model, out / "model.onnx", [(2, 3, 224, 224), (1, 3, 160, 224), (1, 3, 96, 96)]) <= 1e-4


def test_vit_traced_at_its_trained_size_runs_at_other_sizes(tmp_path, capsys):
    """Traced at the grid its embeddings have (224 px, patch 16), the graph must still resample at other sizes: timm's
    same-size shortcut once froze it ("Attempting to broadcast an axis by a dimension other than 1. 150 by 196")."""
    weights = tmp_path / "checkpoint.pth"
    backbone = build_backbone("vit_tiny", mode="simpool", depth=1).state_dict()
    torch.save({FORMAT_KEY: FORMAT_VERSION, "teacher": {f"backbone.{k}": v for k, v in backbone.items()}}, weights)
    out = tmp_path / "export"
    code = main([str(weights), str(out), "--arch", "vit_tiny", "--mode", "simpool", "--model_overrides", "depth=1",
                 "--onnx"])
    assert code == 0, capsys.readouterr().err
    assert "at 224x224 and 160x240" in capsys.readouterr().out
    assert onnx_error(load_backbone(out), out / "model.onnx", [(1, 3, 224, 224), (2, 3, 160, 224)]) <= 1e-4


SHIM = "raise ImportError(\"No module named 'onnx' (hidden by the test)\")\n"


def test_onnx_without_the_extra_stops_with_the_pip_command(tmp_path):
    shim = tmp_path / "shim"
    for name in ("onnx", "onnxruntime"):  # real packages first on the path whose import fails
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(SHIM)
    weights = tmp_path / "backbone.pth"
    torch.save(build_backbone("resnet18", mode="simpool", **TINY_RESNET).state_dict(), weights)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}
    command = [sys.executable, str(REPO / "utils" / "export_backbone.py"), str(weights), str(tmp_path / "out"),
               "--arch", "resnet18", "--mode", "simpool", "--model_overrides", "layers=[1,1,1,1]", "--onnx"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "pip install 'simpool[onnx]'" in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before writing anything
