"""Object discovery: CorLoc by hand and against attention_metrics.corloc, the VOC and COCO20k readers on generated
data in their distributed layouts, and the simpool-object-discovery driver (resume, bad input, 2 gloo processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool import build_backbone
from simpool.data import DataError
from simpool.data.coco20k import lost_coco_box, read_coco20k
from simpool.data.generated.coco20k import write_coco20k
from simpool.data.generated.voc_detection import write_voc_detection
from simpool.data.voc_boxes import find_voc_root, read_voc_boxes
from simpool.evaluation.attention_metrics import corloc
from simpool.evaluation.object_discovery import corloc_summary, discover, padded_tensor
from simpool.evaluation.run_object_discovery import main
from tests.helpers import run_module, torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--model_overrides", "depth=2", "embed_dim=48", "num_heads=3"]


# ----------------------------------------------------------------------------------------------------------
# CorLoc
# ----------------------------------------------------------------------------------------------------------
def record(correct_lost: bool, correct_map: bool, num_gt: int = 1) -> dict:
    return {"correct": {"lost": correct_lost, "dinoseg:map": correct_map, "dinoseg_largest:map": correct_map},
            "num_gt": num_gt}


def test_corloc_summary_by_hand():
    summary = corloc_summary([record(True, False), record(True, True), record(False, False), record(False, False, 0)])
    assert summary["corloc"]["lost"] == 50.0 and summary["corloc"]["dinoseg:map"] == 25.0
    assert summary["rows"] == {"LOST": 50.0, "DINO-seg": 25.0, "DINO-seg (largest component)": 25.0}
    assert summary["num_images"] == 4 and summary["num_without_boxes"] == 1  # counted as a miss, as in LOST


def test_corloc_summary_picks_the_best_head():
    heads = {"lost": True}
    for kind in ("dinoseg", "dinoseg_largest"):
        heads.update({f"{kind}:head0": False, f"{kind}:head1": True, f"{kind}:head_mean": False})
    summary = corloc_summary([{"correct": heads, "num_gt": 1}])
    assert summary["rows"]["DINO-seg head-mean map"] == 0.0 and summary["rows"]["DINO-seg best head (1)"] == 100.0


def test_discover_agrees_with_attention_metrics_corloc():
    model = build_backbone("vit_tiny", mode="official", patch_size=8, depth=2, embed_dim=48, num_heads=3).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40 + 8 * i, 56, 3)) * 255).astype(np.uint8)) for i in range(5)]
    gts = [np.array([[4.0, 4.0, 40.0, 30.0], [0.0, 0.0, 56.0, 8.0 * i + 40]]) for i in range(5)]
    records = [discover(model, image, 8, gt) for image, gt in zip(images, gts, strict=True)]
    for method in ("lost", "dinoseg:head_mean", "dinoseg:head2"):
        boxes = torch.tensor([r["boxes"][method] for r in records])
        assert corloc_summary(records)["corloc"][method] == pytest.approx(100 * corloc(boxes, gts))


def test_padding_and_resizing_map_boxes_back_to_the_image():
    image = Image.new("RGB", (50, 30), (120, 10, 200))
    tensor, scale = padded_tensor(image, 16)
    assert tensor.shape == (1, 3, 32, 64) and scale == (1.0, 1.0)
    assert tensor[0, :, 30:].abs().sum() == 0 and tensor[0, :, :, 50:].abs().sum() == 0  # zeros after normalising
    tensor, scale = padded_tensor(image, 16, image_size=60)
    assert tensor.shape == (1, 3, 64, 112) and scale == (100 / 50, 60 / 30)
    model = build_backbone("vit_tiny", mode="simpool", patch_size=16, depth=1, embed_dim=48, num_heads=3).eval()
    full = discover(model, image, 16, np.array([[0, 0, 50, 30]]))
    assert full["boxes"]["lost"][2] <= 50 and full["boxes"]["lost"][3] <= 30  # clipped to the image
    resized = discover(model, image, 16, np.array([[0, 0, 50, 30]]), image_size=60)
    assert all(v % 8 == 0 for v in resized["boxes"]["lost"][:2])  # patch edges of 16 px at scale 2 = 8 px here


# ----------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------
def test_voc_reader_uses_losts_box_convention_and_hard_flags(tmp_path):
    root = write_voc_detection(tmp_path, 9, image_size=32, year="2007")
    for path in (tmp_path, tmp_path / "VOCdevkit", root):
        assert find_voc_root(path) == root
    voc = read_voc_boxes(tmp_path, "trainval")
    assert len(voc) == 9
    name, image, boxes = voc[2]  # every third image has a second, difficult object
    xml = (root / "Annotations" / f"{name}.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    xmax = int(xml.split("<xmax>")[1].split("<")[0])
    assert boxes.shape == (2, 4) and boxes[0, 0] == xmin - 1 and boxes[0, 2] == xmax
    hard = read_voc_boxes(tmp_path, "trainval", no_hard=True)
    # --no_hard: the difficult objects go, and images 4 (its item truncated, no other object) is left out
    assert len(hard) == 8 and "2007_000004" not in hard.names and hard[2][2].shape == (1, 4)
    with pytest.raises(DataError, match="ImageSets/Main/test.txt does not exist"):
        read_voc_boxes(tmp_path, "test")
    write_voc_detection(tmp_path, 2, image_size=32, year="2012")
    with pytest.raises(DataError, match="pass --year"):
        read_voc_boxes(tmp_path)
    assert len(read_voc_boxes(tmp_path, year="2012")) == 2


def test_coco20k_reader_restricts_to_the_list_and_drops_crowds(tmp_path):
    paths = write_coco20k(tmp_path, 12, image_size=32)
    coco = read_coco20k(paths["images"], paths["annotations"], paths["image_list"])
    assert len(coco) == 9  # every fourth image of the JSON is not in the list
    everything = read_coco20k(paths["images"], paths["annotations"])
    assert len(everything) == 12
    index = coco.names.index(str(100_000 + 7 * 5))  # image 5 also has a crowd annotation
    assert coco[index][2].shape == (1, 4)
    assert lost_coco_box([0.5, 2.5, 10.0, 3.0]) == [0.0, 2.0, 10.0, 6.0]  # Python's round: halves to even
    listing = paths["image_list"]
    listing.write_text(listing.read_text() + "train2014/COCO_train2014_000000999999.jpg\n")
    with pytest.raises(DataError, match="999999 ids are not|not in"):
        read_coco20k(paths["images"], paths["annotations"], listing)


# ----------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voc")
    write_voc_detection(folder, 10, image_size=40)
    return folder


def tiny_weights(folder: Path, mode: str) -> Path:
    path = folder / f"tiny_{mode}.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("vit_tiny", mode=mode, patch_size=8, depth=2, embed_dim=48, num_heads=3).state_dict(),
               path)
    return path


def run_driver(weights: Path, out: Path, mode: str, *data_flags: str) -> dict:
    code = main(["--pretrained_weights", str(weights), *TINY, "--mode", mode, *data_flags, "--num_workers", "0",
                 "--no_progress", "--output_dir", str(out)])
    assert code == 0
    return json.loads((out / "object_discovery.json").read_text())


@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_driver_on_voc_resumes(tmp_path, voc, mode):
    weights = tiny_weights(tmp_path, mode)
    out = tmp_path / "od"
    first = run_driver(weights, out, mode, "--data_path", str(voc), "--figures", "3")
    assert first["num_images"] == 10 and len(list((out / "figures").glob("*.png"))) == 3
    assert "LOST" in first["rows"] and first["lost_source"] == "block"
    lines = (out / "object_discovery.rank0.jsonl").read_text().splitlines()
    (out / "object_discovery.rank0.jsonl").write_text("\n".join(lines[:6]) + "\n")
    second = run_driver(weights, out, mode, "--data_path", str(voc))
    assert len((out / "object_discovery.rank0.jsonl").read_text().splitlines()) == 10  # 4 redone, 6 kept
    assert second["corloc"] == first["corloc"]


def test_driver_on_coco20k_and_simpool_keys(tmp_path):
    paths = write_coco20k(tmp_path / "coco", 8, image_size=40)
    weights = tiny_weights(tmp_path, "simpool")
    flags = ["--data_path", str(paths["images"]), "--annotations", str(paths["annotations"]), "--image_list",
             str(paths["image_list"])]
    block = run_driver(weights, tmp_path / "block", "simpool", *flags)
    own = run_driver(weights, tmp_path / "own", "simpool", *flags, "--lost_features", "simpool")
    assert block["num_images"] == own["num_images"] == 6
    assert own["lost_source"] == "simpool" and set(own["rows"]) == set(block["rows"])


def test_bad_input_is_one_error_line(tmp_path, voc, capsys):
    result = run_module("simpool.evaluation.run_object_discovery", "--random_init", "--data_path", str(tmp_path),
                        "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --data_path") and "Annotations/" in result.stderr
    capsys.readouterr()
    assert main(["--random_init", "--data_path", str(voc), "--split", "val", "--output_dir", str(tmp_path / "o")]) == 2
    assert "val.txt does not exist" in capsys.readouterr().err
    assert main(["--random_init", *TINY, "--mode", "official", "--lost_features", "simpool", "--data_path", str(voc),
                 "--output_dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --lost_features simpool") and error.count("\n") == 1


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path, voc):
    weights = tiny_weights(tmp_path, "official")
    single = run_driver(weights, tmp_path / "single", "official", "--data_path", str(voc))
    flags = ["--pretrained_weights", str(weights), *TINY, "--mode", "official", "--data_path", str(voc),
             "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "ddp")]
    result = run_module("simpool.evaluation.run_object_discovery", *flags, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "object_discovery.json").read_text())
    assert ddp["corloc"] == single["corloc"] and ddp["rows"] == single["rows"]


def test_a_simpool_convnet_gets_dinoseg_but_no_lost(tmp_path, voc):
    weights = tmp_path / "resnet.pth"
    torch.save(build_backbone("resnet18", mode="simpool", layers=(1, 1, 1, 1)).state_dict(), weights)
    assert main(["--pretrained_weights", str(weights), "--arch", "resnet18", "--mode", "simpool", "--model_overrides",
                 "layers=[1,1,1,1]", "--data_path", str(voc), "--num_workers", "0", "--no_progress", "--figures", "1",
                 "--output_dir", str(tmp_path / "od")]) == 0
    result = json.loads((tmp_path / "od" / "object_discovery.json").read_text())
    assert set(result["rows"]) == {"DINO-seg", "DINO-seg (largest component)"} and "lost" not in result["corloc"]


def test_a_rerun_on_other_images_is_refused(tmp_path, voc, capsys):
    weights = tiny_weights(tmp_path, "simpool")
    run_driver(weights, tmp_path / "od", "simpool", "--data_path", str(voc))
    root = voc / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    names = (root / "trainval.txt").read_text().splitlines()
    (root / "half.txt").write_text("\n".join(names[:5]) + "\n")
    capsys.readouterr()
    assert main(["--pretrained_weights", str(weights), *TINY, "--mode", "simpool", "--data_path", str(voc), "--split",
                 "half", "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "od")]) == 2
    error = capsys.readouterr().err
    assert "num_images 10 -> 5" in error and "images_sha1" in error and error.count("\n") == 1
