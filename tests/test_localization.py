"""MaxBoxAccV2 (wsolevaluation): contour boxes, IoU, thresholds against hand cases and a naive re-implementation;
the wsolevaluation reader and the simpool-localization driver on generated data in wsolevaluation's layout."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from simpool import build_backbone
from simpool.data import DataError
from simpool.data.generated.wsol import write_wsol
from simpool.data.wsol import read_wsol
from simpool.evaluation.localization import (
    cam_thresholds,
    contour_boxes,
    correct_at_thresholds,
    max_box_acc,
    normalize_scoremap,
    quantize_scoremap,
    resize_boxes,
    resize_scoremap,
    wsol_box_iou,
)
from simpool.evaluation.run_localization import main
from tests.helpers import run_module, torchrun

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# a naive version of the definition: flood fills, then every threshold one by one
# ----------------------------------------------------------------------------------------------------------
def naive_components(mask: np.ndarray, neighbours: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    seen, parts = np.zeros_like(mask, bool), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        part, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            part.append((y, x))
            for dy, dx in neighbours:
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(part)
    return parts


EIGHT = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def naive_contour_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """cv2's contours: outer borders of 8-connected objects, borders of 4-connected enclosed holes (their foreground
    neighbours: the hole's extent grown by one); box = (x, y, x_last + 1, y_last + 1) clipped to W - 1, H - 1."""
    height, width = mask.shape
    boxes = []

    def box(points, grow):
        ys, xs = zip(*points, strict=True)
        x1, y1 = max(xs) + grow + 1, max(ys) + grow + 1
        return (min(xs) - grow, min(ys) - grow, min(x1, width - 1), min(y1, height - 1))

    for part in naive_components(mask, EIGHT):
        boxes.append(box(part, 0))
    for hole in naive_components(~mask, FOUR):
        if not any(y in (0, height - 1) or x in (0, width - 1) for y, x in hole):
            boxes.append(box(hole, 1))
    return boxes or [(0, 0, 0, 0)]


def naive_iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def naive_max_box_acc_v2(maps: list[np.ndarray], gts: list[np.ndarray], interval: float = 0.01) -> float:
    """The metric's definition, looped: every threshold, every image, every contour box, every gt box."""
    thresholds = np.arange(0, 1, interval)
    accuracies = []
    for delta in (0.3, 0.5, 0.7):
        best = 0.0
        for t in thresholds:
            hits = 0
            for scoremap, gt in zip(maps, gts, strict=True):
                q = (scoremap * 255).astype(np.uint8)
                boxes = naive_contour_boxes(q > int(t * q.max()))
                hits += max(naive_iou(b, g) for b in boxes for g in gt) >= delta
            best = max(best, 100.0 * hits / len(maps))
        accuracies.append(best)
    return float(np.mean(accuracies))


def random_masks(count: int, seed: int = 0):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(1, 24, 2))
        if rng.random() < 0.5:
            yield rng.random((height, width)) < rng.random()
        else:
            yield ndimage.gaussian_filter(rng.random((height, width)), 1.2) > rng.uniform(0.4, 0.6)


# ----------------------------------------------------------------------------------------------------------
# contour boxes and IoU
# ----------------------------------------------------------------------------------------------------------
def test_contour_boxes_hand_cases():
    assert contour_boxes(np.zeros((5, 5), bool)).tolist() == [[0, 0, 0, 0]]  # no contour: wsolevaluation's box
    one = np.zeros((6, 6), bool)
    one[3, 2] = True
    assert contour_boxes(one).tolist() == [[2, 3, 3, 4]]  # boundingRect (2, 3, 1, 1): x + w, y + h
    corner = np.zeros((6, 6), bool)
    corner[5, 5] = True
    assert contour_boxes(corner).tolist() == [[5, 5, 5, 5]]  # x + w = 6 clipped to W - 1
    diagonal = np.zeros((5, 5), bool)
    diagonal[1, 1] = diagonal[2, 2] = True  # corner neighbours: one 8-connected object
    assert contour_boxes(diagonal).tolist() == [[1, 1, 3, 3]]
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False  # one hole: its border spans 1..3, + 1 clipped to 4
    assert sorted(contour_boxes(ring).tolist()) == [[0, 0, 4, 4], [1, 1, 4, 4]]
    notch = np.ones((5, 5), bool)
    notch[0, 2] = False  # background reaching the border is no hole
    assert contour_boxes(notch).tolist() == [[0, 0, 4, 4]]
    big = np.zeros((10, 12), bool)
    big[1:9, 1:11] = True
    big[3:5, 3:6] = False  # a 2 x 3 hole at x 3..5, y 3..4: border pixels x 2..6, y 2..5
    big[6, 8] = False  # and a one-pixel hole at (8, 6): border x 7..9, y 5..7
    assert sorted(contour_boxes(big).tolist()) == [[1, 1, 11, 9], [2, 2, 7, 6], [7, 5, 10, 8]]


def test_contour_boxes_equal_a_naive_flood_fill():
    for mask in random_masks(400):
        assert sorted(map(tuple, contour_boxes(mask).tolist())) == sorted(naive_contour_boxes(mask))


def test_contour_boxes_equal_opencv_where_installed():
    # a test-only dependency ([dev]: make install, so CI, has it, where a skip would hide a gap)
    cv2 = __import__("cv2") if os.environ.get("CI") else pytest.importorskip("cv2")
    for mask in random_masks(400, seed=1):
        contours = cv2.findContours(mask.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        height, width = mask.shape
        expected = [(x, y, min(x + w, width - 1), min(y + h, height - 1))
                    for x, y, w, h in (cv2.boundingRect(c) for c in contours)] or [(0, 0, 0, 0)]
        assert sorted(map(tuple, contour_boxes(mask).tolist())) == sorted(expected)


def test_wsol_iou_counts_pixels_inclusively():
    assert wsol_box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]])[0, 0] == pytest.approx(1 / 7)  # 4 + 4 - 1 pixels
    assert wsol_box_iou([[2, 3, 5, 7]], [[2, 3, 5, 7]])[0, 0] == 1.0
    assert wsol_box_iou([[0, 0, 1, 1]], [[3, 3, 4, 4]])[0, 0] == 0.0
    assert wsol_box_iou([[0, 0, 0, 0]], [[0, 0, 9, 9]])[0, 0] == pytest.approx(1 / 100)
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.integers(0, 30, (20, 2, 2)), axis=1), np.sort(rng.integers(0, 30, (15, 2, 2)), axis=1)
    boxes_a = np.stack([a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1]], 1)
    boxes_b = np.stack([b[:, 0, 0], b[:, 0, 1], b[:, 1, 0], b[:, 1, 1]], 1)
    expected = [[naive_iou(x, y) for y in boxes_b] for x in boxes_a]
    np.testing.assert_allclose(wsol_box_iou(boxes_a, boxes_b), expected)


# ----------------------------------------------------------------------------------------------------------
# maps, thresholds, the metric
# ----------------------------------------------------------------------------------------------------------
def test_scoremap_resize_normalise_quantise():
    np.testing.assert_allclose(normalize_scoremap(np.array([[1.0, 3.0], [2.0, 5.0]])), [[0, 0.5], [0.25, 1]])
    assert not normalize_scoremap(np.full((3, 3), 2.0)).any()  # constant map -> zeros
    assert quantize_scoremap(np.array([[0.0, 0.999, 1.0]])).tolist() == [[0, 254, 255]]  # truncation
    resized = resize_scoremap(np.full((2, 3), 0.7), (8, 12))
    np.testing.assert_allclose(resized, 0.7)  # bicubic weights sum to 1
    ramp = resize_scoremap(np.arange(4.0)[None].repeat(4, 0), (16, 16))
    assert ramp.shape == (16, 16) and np.all(np.diff(ramp[:, 2:-2], axis=1) >= 0)
    assert len(cam_thresholds(0.01)) == 100 and cam_thresholds(0.01)[-1] < 1


def test_ground_truth_boxes_truncate_when_resized():
    # CUB's first test image: 500 x 335, box 60,27,385,331 -> int(60*224/500)=26, int(27*224/335)=18, ...
    assert resize_boxes([[60, 27, 385, 331]], (500, 335), (224, 224)).tolist() == [[26, 18, 172, 221]]


def test_max_box_acc_hand_computed():
    correct = np.zeros((4, 2, 3), bool)  # 4 images, IoU thresholds (50, 70), 3 score thresholds
    correct[:3, 0, 1] = True  # at t1, 3 of 4 images are correct at IoU 50
    correct[:2, 0, 2] = True
    correct[0, 1, :] = True  # image 0 is correct at IoU 70 everywhere, image 1 at t2 only
    correct[1, 1, 2] = True
    result = max_box_acc(correct, (50, 70))
    assert result["max_box_acc"] == {"50": 75.0, "70": 50.0}
    assert result["best_threshold_index"] == {"50": 1, "70": 2}
    assert result["max_box_acc_v2"] == 62.5
    with pytest.raises(ValueError):
        max_box_acc(np.zeros((0, 3, 5), bool))


def test_correct_at_thresholds_hand_case():
    scoremap = np.zeros((10, 10))
    scoremap[2:6, 3:8] = 1.0  # an object at x 3..7, y 2..5
    scoremap[8, 8] = 0.5  # and a weaker blob
    q = quantize_scoremap(scoremap)
    gt = np.array([[3, 2, 7, 5]])  # inclusive pixels
    correct = correct_at_thresholds(q, gt, [0.0, 0.6], (50, 90))
    # t = 0: two contours; the object's box (3, 2, 8, 6) has IoU 20/30 with gt -> correct at 50, not 90
    # t = 0.6: only the object: the same box
    assert correct.tolist() == [[True, True], [False, False]]


def test_max_box_acc_v2_equals_brute_force_definition():
    rng = np.random.default_rng(3)
    maps, gts, rows = [], [], []
    for _ in range(6):
        grid = rng.random((4, 4)) ** 3
        scoremap = normalize_scoremap(resize_scoremap(grid, (24, 24)))
        gt = np.sort(rng.integers(0, 24, (rng.integers(1, 3), 2, 2)), axis=1)
        gt = np.stack([gt[:, 0, 0], gt[:, 0, 1], gt[:, 1, 0], gt[:, 1, 1]], 1)
        maps.append(scoremap)
        gts.append(gt)
        rows.append(correct_at_thresholds(quantize_scoremap(scoremap), gt, cam_thresholds(0.05)))
    ours = max_box_acc(np.stack(rows))["max_box_acc_v2"]
    assert ours == pytest.approx(naive_max_box_acc_v2(maps, gts, 0.05))


# ----------------------------------------------------------------------------------------------------------
# wsolevaluation's metadata
# ----------------------------------------------------------------------------------------------------------
def test_read_wsol_reads_the_metadata_and_names_broken_files(tmp_path):
    images, metadata = write_wsol(tmp_path / "wsol", 8, image_size=32)
    data = read_wsol(images, metadata)
    assert len(data) == 8 and data.sizes[data.image_ids[0]] == (40, 32)  # aspect 1.25
    image_id, image, boxes = data[3]
    assert image.size == (40, 32) and boxes.shape == (2, 4)  # every fourth image has a second box
    lines = (metadata / "localization.txt").read_text().splitlines()
    assert lines[0].split(",")[1:] == [str(v) for v in data.boxes[data.image_ids[0]][0]]
    (metadata / "image_sizes.txt").write_text("\n".join((metadata / "image_sizes.txt").read_text().splitlines()[1:]))
    with pytest.raises(DataError, match="image_sizes.txt has no line"):
        read_wsol(images, metadata)
    (metadata / "localization.txt").unlink()
    with pytest.raises(DataError, match="lacks localization.txt"):
        read_wsol(images, metadata)


# ----------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--model_overrides", "depth=2", "embed_dim=48", "num_heads=3"]


@pytest.fixture(scope="module")
def wsol_data(tmp_path_factory):
    return write_wsol(tmp_path_factory.mktemp("wsol"), 10, image_size=48)


def tiny_weights(folder: Path, mode: str) -> Path:
    path = folder / f"tiny_{mode}.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("vit_tiny", mode=mode, patch_size=8, depth=2, embed_dim=48, num_heads=3).state_dict(),
               path)
    return path


def run_driver(weights: Path, data, out: Path, mode: str, *extra: str) -> dict:
    images, metadata = data
    code = main(["--pretrained_weights", str(weights), *TINY, "--mode", mode, "--data_path", str(images),
                 "--metadata", str(metadata), "--image_size", "64", "--num_workers", "0", "--no_progress",
                 "--output_dir", str(out), *extra])
    assert code == 0
    return json.loads((out / "localization.json").read_text())


@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_driver_scores_every_image_and_resumes(tmp_path, wsol_data, mode):
    weights = tiny_weights(tmp_path, mode)
    out = tmp_path / "loc"
    first = run_driver(weights, wsol_data, out, mode, "--figures", "2")
    assert first["num_images"] == 10 and len(list((out / "figures").glob("*.png"))) == 2
    expected_rows = ["map"] if mode == "simpool" else ["head-mean map", "best head"]
    assert [r.split(" (")[0] for r in first["rows"]] == expected_rows
    per_map = first["per_map"]["map" if mode == "simpool" else "head_mean"]
    assert per_map["max_box_acc_v2"] == pytest.approx(np.mean(list(per_map["max_box_acc"].values())))
    # a rerun after a kill: 4 images were done, the other 6 are scored again (and only they)
    lines = (out / "localization.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 10
    (out / "localization.rank0.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a cut line
    second = run_driver(weights, wsol_data, out, mode)
    records = [json.loads(line) for line in (out / "localization.rank0.jsonl").read_text().splitlines()
               if line.endswith("}")]
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    assert second["per_map"] == first["per_map"]
    # a third run finds everything done: nothing is added
    run_driver(weights, wsol_data, out, mode)
    assert len((out / "localization.rank0.jsonl").read_text().splitlines()) == 11  # 10 records + the cut line


def test_driver_result_equals_the_library_on_the_same_maps(tmp_path, wsol_data):
    weights = tiny_weights(tmp_path, "simpool")
    result = run_driver(weights, wsol_data, tmp_path / "loc", "simpool")
    from simpool.attention_maps import attention_maps
    from simpool.evaluation.run_localization import WsolImages
    from simpool.loading import load_model

    model, _ = load_model(str(weights), arch="vit_tiny", mode="simpool", patch_size=8, depth=2, embed_dim=48,
                          num_heads=3)
    data = read_wsol(*wsol_data)
    rows, dataset = [], WsolImages(data, range(len(data)), 64)
    for i in range(len(data)):
        grid = attention_maps(model.eval(), dataset[i][0][None])[0, 0]
        q = quantize_scoremap(normalize_scoremap(resize_scoremap(grid, (64, 64))))
        gt = resize_boxes(data.boxes[data.image_ids[i]], data.sizes[data.image_ids[i]], (64, 64))
        rows.append(correct_at_thresholds(q, gt, cam_thresholds(0.01)))
    assert result["per_map"]["map"]["max_box_acc"] == max_box_acc(np.stack(rows))["max_box_acc"]


def test_bad_input_is_one_error_line(tmp_path, wsol_data, capsys):
    images, metadata = wsol_data
    broken = tmp_path / "meta"
    broken.mkdir()
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt"):
        (broken / name).write_text((metadata / name).read_text())
    result = run_module("simpool.evaluation.run_localization", "--random_init", "--data_path", str(images),
                        "--metadata", str(broken), "--output_dir",
                      str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --metadata") and "localization.txt" in result.stderr
    capsys.readouterr()
    assert main(["--random_init", "--arch", "resnet18", "--mode", "official", "--model_overrides", "layers=[1,1,1,1]",
                 "--data_path", str(images), "--metadata", str(metadata), "--output_dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: resnet18 in official mode") and "has no attention map" in error


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path, wsol_data):
    weights = tiny_weights(tmp_path, "official")
    # one image per forward pass in both runs: a batch's size may change a GEMM's rounding, not the protocol
    single = run_driver(weights, wsol_data, tmp_path / "single", "official", "--batch_size_per_gpu", "1")
    images, metadata = wsol_data
    flags = ["--pretrained_weights", str(weights), *TINY, "--mode", "official", "--data_path", str(images),
             "--metadata", str(metadata), "--image_size", "64", "--batch_size_per_gpu", "1", "--num_workers", "0",
             "--no_progress", "--output_dir", str(tmp_path / "ddp")]
    result = run_module("simpool.evaluation.run_localization", *flags, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "localization.json").read_text())
    assert ddp["per_map"] == single["per_map"] and ddp["rows"] == single["rows"]
    assert len((tmp_path / "ddp" / "localization.rank1.jsonl").read_text().splitlines()) == 5


def test_a_simpool_convnet_is_scored_on_its_map(tmp_path, wsol_data):
    weights = tmp_path / "resnet.pth"
    torch.save(build_backbone("resnet18", mode="simpool", layers=(1, 1, 1, 1)).state_dict(), weights)
    images, metadata = wsol_data
    assert main(["--pretrained_weights", str(weights), "--arch", "resnet18", "--mode", "simpool", "--model_overrides",
                 "layers=[1,1,1,1]", "--data_path", str(images), "--metadata", str(metadata), "--image_size", "64",
                 "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "loc")]) == 0
    result = json.loads((tmp_path / "loc" / "localization.json").read_text())
    assert list(result["rows"]) == ["map"] and result["num_images"] == 10
