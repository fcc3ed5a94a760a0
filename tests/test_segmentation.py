"""Linear segmentation probe: exact IoUs, patch features of every family, data sources, CLI, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.data.fashion_on_photos import SEGMENTATION_CLASSES, class_mask, render_fashion_on_photo
from simpool.data.generated.voc import write_voc_style
from simpool.data.segmentation import SegmentationFolder, build_segmentation_splits
from simpool.evaluation import run_segmentation as seg_cli
from simpool.evaluation.segmentation_probe import (
    SegmentationHeads,
    all_background_confusion,
    confusion_matrix,
    iou_from_confusion,
)
from simpool.models import build_backbone
from tests.helpers import REPO, TINY_CONVNEXT, TINY_RESNET, TINY_VIT, Killed, free_port, needs_fashion

DEMO_EXPORT = REPO / "tests" / "fixtures" / "demo_backbone"  # the demo run's teacher (see its config.json)
TINY_FLAGS = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8",
              "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2", "--num_workers", "0"]


# ----------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------
def test_miou_equals_a_hand_made_confusion_matrix():
    # 3 classes; class 2 is never in the truth but predicted once (IoU 0), void pixels do not count.
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 255, 255], [0, 1, 0, 0]])
    pred = torch.tensor([[0, 0, 1, 1], [1, 0, 2, 0], [0, 2, 0, 0]])
    #            pred 0  1  2
    expected = [[5, 1, 0],   # truth 0: 6 pixels, one predicted 1
                [1, 2, 1],   # truth 1: 4 pixels
                [0, 0, 0]]   # truth 2: none (the 2 predicted on a void pixel is ignored)
    confusion = confusion_matrix(pred, target, num_classes=3)
    assert confusion.tolist() == expected
    scores = iou_from_confusion(confusion)
    # IoU_0 = 5 / (6 + 6 - 5) = 5/7; IoU_1 = 2 / (4 + 3 - 2) = 2/5; IoU_2 = 0 / (0 + 1 - 0) = 0
    assert scores["iou"] == pytest.approx([5 / 7, 2 / 5, 0.0], abs=1e-12)
    assert scores["miou"] == pytest.approx((5 / 7 + 2 / 5 + 0) / 3, abs=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(7 / 10, abs=1e-12)
    # a class absent from truth and predictions has no IoU and stays out of the mean
    four = iou_from_confusion(confusion_matrix(pred, target, num_classes=4))
    assert math.isnan(four["iou"][3]) and four["miou"] == pytest.approx(scores["miou"], abs=1e-12)
    # all background: IoU_0 = 6/10, IoU_1 = 0 (4 missed), IoU_2 undefined
    baseline = iou_from_confusion(all_background_confusion(target, 3))
    assert baseline["miou"] == pytest.approx((0.6 + 0.0) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="labels must lie in"):
        confusion_matrix(pred, target, num_classes=2)  # pred holds a 2


def test_heads_are_one_linear_map_per_patch_after_batchnorm():
    heads = SegmentationHeads(8, num_classes=3, num_heads=2, generator=torch.Generator().manual_seed(0)).eval()
    feats = torch.randn(2, 8, 3, 4)
    logits = heads(feats)
    assert logits.shape == (2, 2, 3, 3, 4)
    normed = heads.norm(feats)  # eval: running stats (0 mean, unit var at init)
    for h in range(2):
        w, b = heads.linear.heads[h].weight, heads.linear.heads[h].bias
        torch.testing.assert_close(logits[h], torch.einsum("cd,bdyx->bcyx", w, normed) + b[None, :, None, None])
    assert heads.upsampled(feats, (12, 16)).shape == (2, 2, 3, 12, 16)


@pytest.mark.parametrize("arch,mode,kwargs,stride", [
    ("vit_tiny", "simpool", TINY_VIT, 16), ("vit_tiny", "official", TINY_VIT, 16),
    ("resnet18", "simpool", TINY_RESNET, 32), ("convnext_tiny", "official", TINY_CONVNEXT, 32),
])
def test_patch_features_are_what_the_pooling_sees(arch, mode, kwargs, stride):
    model = build_backbone(arch, mode=mode, **kwargs).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        dense = model.patch_features(x)
        assert dense.shape == (2, model.embed_dim, 64 // stride, 96 // stride)
        if model.family == "vit":  # the last block's normalised patch tokens, [CLS] left out
            tokens = model.last_block_outputs(x, 1)[0][:, model.num_prefix_tokens:]
            torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens)
        elif mode == "simpool":  # the map SimPool pools
            torch.testing.assert_close(model.simpool(dense), model(x))


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
@needs_fashion
def test_voc_folder_reads_palette_indices_and_class_names(tmp_path):
    write_voc_style(tmp_path, 3, image_size=32, split="train", list_name="train", id_prefix="train_")
    write_voc_style(tmp_path, 2, image_size=32, split="test", list_name="val", id_prefix="val_")
    with Image.open(tmp_path / "SegmentationClass" / "train_000000.png") as png:
        assert png.mode == "P"  # a VOC palette PNG: the palette index is the class
    train, val, classes = build_segmentation_splits(tmp_path, image_size=16)
    assert classes == list(SEGMENTATION_CLASSES) and len(train) == 3 and len(val) == 2
    image, labels = SegmentationFolder(tmp_path, "train", 32)[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(labels, torch.from_numpy(class_mask(render_fashion_on_photo(0, 32, split="train"))).long())
    assert train[0][1].shape == (16, 16)  # nearest-resized labels keep class values
    assert set(train[0][1].unique().tolist()) <= set(labels.unique().tolist()) | {0}
    (tmp_path / "classes.txt").unlink()  # then names are class<i>, count = largest label + 1
    largest = max(int(SegmentationFolder(tmp_path, s, 32)[i][1].max()) for s, n in (("train", 3), ("val", 2))
                  for i in range(n))
    assert build_segmentation_splits(tmp_path, 16)[2] == [f"class{i}" for i in range(largest + 1)]


def test_bad_data_and_flags_stop_with_one_line(tmp_path, capsys):
    assert seg_cli.main([*TINY_FLAGS, "--data_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert seg_cli.main([*TINY_FLAGS, "--data_path", str(tmp_path), "--output_dir", str(tmp_path)]) == 2
    assert "not a VOC-style segmentation folder" in capsys.readouterr().err
    assert seg_cli.main([*TINY_FLAGS, "--data_path", "fashion-on-photos:x"]) == 2
    assert "positive number" in capsys.readouterr().err
    assert seg_cli.main([*TINY_FLAGS, "--data_path", "fashion-on-photos:4", "--lrs", "0.1", "0.1"]) == 2
    assert "distinct" in capsys.readouterr().err


@needs_fashion
def test_image_size_must_fit_the_stride(tmp_path, capsys):
    code = seg_cli.main([*TINY_FLAGS, "--data_path", "fashion-on-photos:2", "--image_size", "36",
                         "--output_dir", str(tmp_path)])
    assert code == 2 and "multiple of the model's stride 8: use 32" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the probe end to end
# ----------------------------------------------------------------------------------------------------------
def run_probe(out: Path, *extra: str, flags=TINY_FLAGS) -> dict:
    torch.manual_seed(torch.seed())  # a new global RNG state: the CLI must seed --random_init itself (--seed)
    code = seg_cli.main([*flags, "--data_path", "fashion-on-photos:24", "--image_size", "32", "--epochs", "4",
                         "--val_freq", "2", "--output_dir", str(out), *extra])
    assert code == 0
    return json.loads((out / "segmentation.json").read_text())


@needs_fashion
def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = run_probe(tmp_path / "straight")
    assert set(straight["iou"]) == set(SEGMENTATION_CLASSES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in straight["iou"].values())
    assert 0.0 <= straight["miou"] <= 1.0 and straight["best_lr"] in seg_cli.DEFAULT_LRS
    assert len(straight["per_lr"]) == len(seg_cli.DEFAULT_LRS)
    # the mIoU is the mean of the defined per-class IoUs of the best head, and matches its confusion matrix
    defined = [v for v in straight["iou"].values() if v is not None]
    assert straight["miou"] == pytest.approx(sum(defined) / len(defined), abs=1e-12)
    assert iou_from_confusion(torch.tensor(straight["confusion_best_lr"]))["miou"] == straight["miou"]

    interrupted = tmp_path / "interrupted"
    real_epoch = seg_cli.train_epoch
    calls = []

    def stop_at_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed  # as if the job were killed: checkpoint of epoch 2 is on disk
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(seg_cli, "train_epoch", stop_at_third_epoch)
    with pytest.raises(Killed):
        run_probe(interrupted)
    monkeypatch.setattr(seg_cli, "train_epoch", real_epoch)
    resumed = run_probe(interrupted, "--save_predictions", "3")
    assert resumed["per_lr"] == straight["per_lr"]
    with Image.open(interrupted / "predictions.png") as png:
        assert png.size == (3 * 32 + 4, 3 * 32)  # 3 rows of image | truth | prediction
    log = [json.loads(line) for line in (interrupted / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1, 2, 3]  # epochs 0-1 not trained again
    assert seg_cli.main([*TINY_FLAGS, "--data_path", "fashion-on-photos:24", "--image_size", "32", "--epochs", "5",
                         "--output_dir", str(interrupted)]) == 2  # another probe in the same folder: refused


@needs_fashion
def test_a_rerun_on_other_weights_is_refused_like_the_linear_probe(tmp_path, capsys):
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.pth"
        torch.save(build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=32,
                                  num_heads=2).state_dict(), path)
        weights.append(path)
    flags = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=1",
             "embed_dim=32", "num_heads=2", "--num_workers", "0", "--data_path", "fashion-on-photos:8",
             "--image_size", "32", "--epochs", "1", "--output_dir", str(tmp_path / "probe")]
    assert seg_cli.main(["--pretrained_weights", str(weights[0]), *flags]) == 0
    before = (tmp_path / "probe" / "checkpoint.pth.tar").read_bytes()
    capsys.readouterr()
    assert seg_cli.main(["--pretrained_weights", str(weights[1]), *flags]) == 2
    err = capsys.readouterr().err
    assert "holds a probe of other features or flags: weights" in err and "w1.pth" in err, err
    assert (tmp_path / "probe" / "checkpoint.pth.tar").read_bytes() == before  # nothing was overwritten


@needs_fashion
@pytest.mark.skipif(not (DEMO_EXPORT / "config.json").is_file(), reason="demo backbone fixture missing")
def test_trained_backbone_beats_all_background(tmp_path):
    """The demo run's teacher (DINO on Fashion-MNIST): its patch features segment the pasted items."""
    flags = ["--pretrained_weights", str(DEMO_EXPORT), "--num_workers", "0"]
    code = seg_cli.main([*flags, "--data_path", "fashion-on-photos:96", "--image_size", "56", "--epochs", "10",
                         "--val_freq", "10", "--lrs", "0.1", "1.0", "--output_dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "segmentation.json").read_text())
    # all-background scores IoU_bg = its pixel share and 0 elsewhere (mIoU 0.066 here); the probe 0.093
    assert result["miou"] > result["all_background"]["miou"] + 0.015
    assert result["iou"]["background"] > result["all_background"]["pixel_accuracy"]
    assert sum(v > 0.01 for v in result["iou"].values()) >= 3  # and it finds items of some classes


DDP_PROBE = """
import sys
from simpool.evaluation.run_segmentation import main
sys.exit(main(sys.argv[1:]))
"""




@needs_fashion
@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    weights = tmp_path / "tiny.pth"  # a file, not --random_init: every process must embed with the same weights
    torch.save(build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=32,
                              num_heads=2).state_dict(), weights)
    flags = ["--pretrained_weights", str(weights), *TINY_FLAGS[1:]]
    single = run_probe(tmp_path / "single", flags=flags)
    script = tmp_path / "probe.py"
    script.write_text(DDP_PROBE)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), *flags, "--data_path", "fashion-on-photos:24",
               "--image_size", "32", "--epochs", "4", "--val_freq", "2", "--output_dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((out / "segmentation.json").read_text())
    # integer confusion counts summed over the two val shards: the same pixels as one process
    assert np.array(ddp["confusion_best_lr"]).sum() == np.array(single["confusion_best_lr"]).sum() == 24 * 32 * 32
    for lr in single["per_lr"]:
        assert ddp["per_lr"][lr]["miou"] == pytest.approx(single["per_lr"][lr]["miou"], abs=1e-3)
