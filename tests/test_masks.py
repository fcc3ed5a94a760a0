"""COCO-style annotations as mask samples: boxes, polygon masks, box-only objects, crowd regions, skipped images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.data.masks import read_coco
from simpool.evaluation.run_attention import main
from tests.helpers import read_scores, tiny_checkpoint


def write_coco(folder, annotations=None):
    """Three 40x30 images: a.png with a polygon object, a box-only object and a crowd region; b.png with only a
    crowd region; c.png without annotations."""
    (folder / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / "images" / f"{name}.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
                   {"id": 3, "file_name": "c.png", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [
            # a rectangle polygon covering pixels x 2..9, y 3..7 (PIL fills the outline too)
            {"id": 10, "image_id": 1, "bbox": [2, 3, 7, 4], "iscrowd": 0,
             "segmentation": [[2, 3, 9, 3, 9, 7, 2, 7]]},
            # box only: x 20.5 -> 20 .. 30.2 -> 31 (exclusive), y 10 .. 20
            {"id": 11, "image_id": 1, "bbox": [20.5, 10, 9.7, 10], "iscrowd": 0},
            {"id": 12, "image_id": 1, "bbox": [0, 25, 40, 5], "iscrowd": 1, "segmentation": {"counts": "x"}},
            {"id": 13, "image_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return folder / "images", path


def test_coco_boxes_polygons_crowd_and_skipped_images(tmp_path):
    images, annotations = write_coco(tmp_path)
    data = read_coco(images, annotations)
    assert len(data) == 1 and data.skipped == 2 and data.names == ["a"]
    sample = data[0]
    assert sample.image.size == (40, 30)
    assert sample.boxes.tolist() == [[2, 3, 9, 7], [20, 10, 31, 20]]  # crowd boxes are not objects
    expected = np.zeros((30, 40), dtype=bool)
    expected[3:8, 2:10] = True  # the polygon, outline included
    expected[10:20, 20:31] = True  # the filled box of the box-only object
    assert torch.equal(sample.mask, torch.from_numpy(expected))
    void = np.zeros((30, 40), dtype=bool)
    void[25:30, :] = True  # the crowd region (its RLE is not decoded: its box)
    assert torch.equal(sample.void, torch.from_numpy(void))


def test_coco_bad_input_names_the_problem(tmp_path):
    images, annotations = write_coco(tmp_path)
    (tmp_path / "not.json").write_text("{oops")
    with pytest.raises(ValueError, match="not JSON"):
        read_coco(images, tmp_path / "not.json")
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        read_coco(images, tmp_path / "other.json")
    (tmp_path / "keyless.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match="lacks a COCO key"):
        read_coco(images, tmp_path / "keyless.json")
    with pytest.raises(ValueError, match="does not exist"):
        read_coco(tmp_path / "missing", annotations)
    (images / "a.png").unlink()
    with pytest.raises(ValueError, match="a.png"):
        read_coco(images, annotations)[0]
    crowd_only = tmp_path / "crowd"
    crowd_only.mkdir()
    images, annotations = write_coco(crowd_only, [{"id": 1, "image_id": 1, "bbox": [0, 0, 4, 4], "iscrowd": 1}])
    with pytest.raises(ValueError, match="no image has a non-crowd annotation"):
        read_coco(images, annotations)


def test_attention_cli_scores_a_coco_folder(tmp_path, capsys):
    images, annotations = write_coco(tmp_path / "coco")
    flags = ["--pretrained_weights", str(tiny_checkpoint(tmp_path, "simpool")), "--arch", "vit_tiny", "--mode",
             "simpool", "--patch_size", "8", "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2",
             "img_size=32", "--image_size", "32"]
    out = tmp_path / "coco.json"
    assert main([*flags, "--data_path", str(images), "--annotations", str(annotations), "--output", str(out)]) == 0
    assert read_scores(out)["num_images"] == 1
    assert main([*flags, "--data_path", "fashion-on-photos:2", "--annotations", str(annotations)]) == 2
    assert "--annotations goes with a folder" in capsys.readouterr().err
