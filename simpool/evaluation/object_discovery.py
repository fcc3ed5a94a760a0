"""Unsupervised object discovery (SimPool Table 6): one box per image from DINO-seg and LOST, scored by CorLoc.

Per image, as LOST's ``main_lost.py`` runs it: the image at its own resolution (``image_size`` None; or its shorter
side resized, boxes mapped back), ``ToTensor`` + ImageNet normalisation, zero-padded at the bottom and right to
whole patches; then

* **LOST** (:func:`simpool.evaluation.lost.lost`) on the patch keys of the last block (``lost_source``);
* **DINO-seg** (:func:`simpool.evaluation.lost.dinoseg_box`) on each attention map of the model -- SimPool's ``a``,
  or an official ViT's [CLS] attention per head and averaged over heads -- with LOST's component choice
  (``dinoseg``) and with the largest component (``dinoseg_largest``).

**CorLoc** = share of images whose box has IoU >= 0.5 (torchvision's IoU, pixel edges, as LOST's ``bbox_iou``)
with at least one ground-truth box; an image without a box counts as a miss, as in LOST.

Example::

    >>> record = discover(model, image, patch_size=16, gt_boxes=boxes)
    >>> record["correct"]["lost"], record["boxes"]["dinoseg:head_mean"]
    >>> corloc_summary(records.values())["corloc"]["lost"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from simpool.attention_maps import attention_maps
from simpool.evaluation.attention_metrics import box_iou
from simpool.evaluation.lost import FeatureSource, dinoseg_box, lost, lost_box, vit_patch_features

__all__ = ["CORLOC_IOU", "corloc_summary", "discover", "map_names", "padded_tensor"]

CORLOC_IOU = 0.5


def map_names(num_heads: int) -> list[str]:
    """``["map"]`` for one map (SimPool), else ``head0 .. head<n-1>`` and ``head_mean``."""
    return ["map"] if num_heads == 1 else [f"head{i}" for i in range(num_heads)] + ["head_mean"]


def padded_tensor(image: Image.Image, patch_size: int, image_size: int | None = None) -> tuple[torch.Tensor, tuple]:
    """(1, 3, H_pad, W_pad) normalised tensor zero-padded to whole patches, and the (sx, sy) scale from the original
    image to the resized one (1, 1 at full resolution). ``image_size``: the shorter side after a bicubic resize."""
    width, height = image.size
    if image_size is not None:
        scale = image_size / min(width, height)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    tensor = TF.normalize(TF.to_tensor(image.convert("RGB")), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    _, new_h, new_w = tensor.shape
    pad_h, pad_w = -new_h % patch_size, -new_w % patch_size
    padded = torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h))  # zeros after normalisation, as LOST
    return padded.unsqueeze(0), (new_w / width, new_h / height)


def _correct(box: Sequence[float], gt_boxes: np.ndarray) -> bool:
    if len(gt_boxes) == 0:
        return False
    return bool(box_iou(torch.tensor([box], dtype=torch.float64), torch.as_tensor(gt_boxes)).max() >= CORLOC_IOU)


@torch.no_grad()
def discover(
    model: nn.Module,
    image: Image.Image,
    patch_size: int,
    gt_boxes: np.ndarray,
    image_size: int | None = None,
    k_patches: int = 100,
    which: str = "k",
    lost_source: FeatureSource = "block",
    keep: float = 0.6,
) -> dict[str, Any]:
    """The boxes of LOST and DINO-seg (per map) on one image, in its original pixels, and whether each is correct.

    Returns ``{"boxes": {method: [x0, y0, x1, y1]}, "correct": {method: bool}, "seed": int, "num_gt": k}`` with
    methods ``lost`` (ViTs only; ``seed`` is None otherwise), ``dinoseg:<map>`` and ``dinoseg_largest:<map>``
    (maps of :func:`map_names`). ``patch_size`` is the model's stride (a convnet's total downsampling).
    """
    tensor, (sx, sy) = padded_tensor(image, patch_size, image_size)
    device = next(model.parameters()).device
    tensor = tensor.to(device)
    resized_hw = (round(image.height * sy), round(image.width * sx))
    grid = (tensor.shape[-2] // patch_size, tensor.shape[-1] // patch_size)
    boxes: dict[str, list[float]] = {}
    seed = None
    if hasattr(model, "blocks"):  # LOST needs a transformer's patch keys; convnets get DINO-seg only
        result = lost(vit_patch_features(model, tensor, which, lost_source)[0], grid, k_patches)
        boxes["lost"], seed = lost_box(result, patch_size, resized_hw), result.seed
    maps = attention_maps(model, tensor)[0]  # (heads, h, w)
    candidates = torch.cat([maps, maps.mean(dim=0, keepdim=True)]) if maps.shape[0] > 1 else maps
    for name, grid_map in zip(map_names(maps.shape[0]), candidates, strict=True):
        boxes[f"dinoseg:{name}"] = dinoseg_box(grid_map, patch_size, keep, component="lost")
        boxes[f"dinoseg_largest:{name}"] = dinoseg_box(grid_map, patch_size, keep, component="largest")
    scale = np.array([sx, sy, sx, sy])
    boxes = {method: (np.asarray(box) / scale).tolist() for method, box in boxes.items()}
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    return {"boxes": boxes, "correct": {m: _correct(b, gt) for m, b in boxes.items()}, "seed": seed,
            "num_gt": len(gt)}


def corloc_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """CorLoc (percent) per method over per-image records of :func:`discover`, with the best DINO-seg head.

    ``rows`` holds the table's entries: ``LOST``, ``DINO-seg`` (SimPool's map, or for several heads the head-mean
    map, each head and the best head -- picked on these very images, so optimistic) and the same with the largest
    component.
    """
    records = list(records)
    if not records:
        raise ValueError("no image to score")
    methods = list(records[0]["correct"])
    corloc = {m: 100.0 * float(np.mean([r["correct"][m] for r in records])) for m in methods}
    rows = {"LOST": corloc["lost"]} if "lost" in corloc else {}
    for kind, label in (("dinoseg", "DINO-seg"), ("dinoseg_largest", "DINO-seg (largest component)")):
        maps = [m.split(":", 1)[1] for m in methods if m.startswith(f"{kind}:")]
        if maps == ["map"]:
            rows[label] = corloc[f"{kind}:map"]
            continue
        heads = [m for m in maps if m != "head_mean"]
        best = max(heads, key=lambda h: (corloc[f"{kind}:{h}"], -int(h[4:])))
        rows[f"{label} head-mean map"] = corloc[f"{kind}:head_mean"]
        rows[f"{label} best head ({best[4:]})"] = corloc[f"{kind}:{best}"]
    return {"num_images": len(records), "num_without_boxes": sum(r["num_gt"] == 0 for r in records),
            "corloc": corloc, "rows": rows}
