"""Attention-map quality of a frozen backbone: Jaccard with object masks and CorLoc (the command line is
:mod:`simpool.evaluation.run_attention`).

SimPool's claim (Psomas et al., ICCV 2023, §5) is that its pooling attention ``a`` outlines objects better than
the [CLS] attention of a ViT trained the same way. This module measures it on any VOC-style folder of images and
object masks (``JPEGImages/`` + ``SegmentationObject/``, see :func:`simpool.data.masks.read_mask_folder`), on
images with a COCO-style JSON of boxes and polygons (``--annotations``, :func:`simpool.data.masks.read_coco`;
box-only annotations are scored against their filled boxes), or on fashion-on-photos test images generated on the
fly (``--data_path fashion-on-photos:200``).

Which map (``model.attention_map``, on the patch grid (h, w) = (H / p, W / p)):

* SimPool models: the pooling attention a = softmax_j(K_j · q / sqrt(d_h)), one map per SimPool head;
* official-mode ViTs: the last block's [CLS]-to-patch attention, one map per self-attention head.

Maps come from :func:`simpool.attention_maps.attention_maps`, scores from
:func:`simpool.evaluation.attention_metrics.evaluate_maps` (maps are upsampled to the mask with nearest
neighbours, DINO's convention, and averaged over images):

* ``jaccard_mass``: J(M, G), M = the fewest patches holding ``keep`` (60%) of the attention mass (DINO);
* ``jaccard_best_threshold``: max_t J(a_norm > t, G), t picked per image — an oracle upper bound;
* ``corloc``: share of images where the box of the largest component of M has IoU >= 0.5 with a gt box.

With several heads the report gives the *mean over heads* of each score, the scores of the *head-average map*
(the map averaged over heads, then scored) and the *best head* (the head with the highest mean
``jaccard_mass`` on these very images: picked with the ground truth, so optimistic).

Example::

    >>> samples = load_mask_samples("fashion-on-photos:50", image_size=96)
    >>> result = evaluate_attention(model, samples, image_size=96)
    >>> result["rows"]["best head"]["jaccard_mass"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simpool.attention_maps import attention_maps, model_stride, prepare_image
from simpool.data.fashion_on_photos import mask_samples
from simpool.data.masks import MaskSample, read_coco, read_mask_folder
from simpool.evaluation.attention_metrics import evaluate_maps
from simpool.run.config import ConfigError

FASHION_ON_PHOTOS = "fashion-on-photos"
DEFAULT_FASHION_IMAGES = 200
METRICS = ("jaccard_mass", "jaccard_best_threshold", "corloc")

__all__ = [
    "FASHION_ON_PHOTOS",
    "evaluate_attention",
    "format_table",
    "load_mask_samples",
    "parse_fashion_spec",
    "summary_rows",
]


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def parse_fashion_spec(data_path: str) -> int | None:
    """``fashion-on-photos[:N]`` -> N (default 200); any other path -> None."""
    name, _, count = str(data_path).partition(":")
    if name != FASHION_ON_PHOTOS:
        return None
    if not count:
        return DEFAULT_FASHION_IMAGES
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--data_path {data_path!r}: write {FASHION_ON_PHOTOS}:N with N a positive integer")
    return int(count)


def load_mask_samples(data_path: str | Path, image_size: int = 224, seed: int = 0,
                      annotations: str | Path | None = None) -> Sequence[MaskSample]:
    """A VOC-style folder, a COCO-style folder + JSON (``annotations``), or ``fashion-on-photos[:N]`` rendered at
    ``image_size`` px; folders are read lazily.

    Images without any object are not scoreable (Jaccard and CorLoc need a ground-truth object): a VOC folder
    holding such images raises a ValueError when they are reached, naming the image; COCO images without a
    non-crowd annotation are skipped.
    """
    count = parse_fashion_spec(str(data_path))
    if count is not None:
        if annotations is not None:
            raise ConfigError("--annotations goes with a folder of images, not with fashion-on-photos")
        return mask_samples(count, image_size, seed, split="test")
    if not Path(data_path).is_dir():
        raise ConfigError(f"--data_path {str(data_path)!r} is neither a folder (VOC-style: JPEGImages/ + "
                             f"SegmentationObject/; COCO-style: images + --annotations) nor {FASHION_ON_PHOTOS}[:N]")
    if annotations is not None:
        return read_coco(data_path, annotations)  # a ValueError naming the file on bad input
    return read_mask_folder(data_path)


# ----------------------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------------------
def _maps_of(model: nn.Module, samples: Sequence[MaskSample], image_size: int | None,
             batch_size: int) -> list[torch.Tensor]:
    """One (heads, h, w) map per sample; consecutive images of one prepared size share a forward pass."""
    stride = model_stride(model)
    maps: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            maps.extend(attention_maps(model, torch.cat(pending)).unbind(0))
            pending.clear()

    for index in range(len(samples)):
        sample = samples[index]
        if not bool(sample.mask.any()):
            raise ValueError(f"image {sample.name!r} has no object in its mask: remove it from the folder "
                             "(Jaccard and CorLoc need a ground-truth object)")
        tensor, _ = prepare_image(sample.image, image_size, stride)
        if pending and (tensor.shape != pending[0].shape or len(pending) >= batch_size):
            flush()
        pending.append(tensor)
    flush()
    return maps


def summary_rows(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Table rows of an ``evaluate_maps`` report: one row for a single-map model, else three.

    Several heads: ``mean over heads`` (per-head scores averaged), ``head-average map`` (the map averaged over
    heads, scored) and ``best head`` (highest mean ``jaccard_mass`` on these images).
    """
    def pick(row: dict[str, Any]) -> dict[str, float]:
        return {name: float(row[name]) for name in METRICS}

    if report["num_heads"] == 1:
        return {"map": pick(report["best_head"])}
    return {
        "mean over heads": pick(report["mean_over_heads"]),
        "head-average map": pick(report["head_average_map"]),
        f"best head ({report['best_head']['head']})": pick(report["best_head"]),
    }


def evaluate_attention(
    model: nn.Module,
    samples: Sequence[MaskSample],
    image_size: int | None = 224,
    keep: float = 0.6,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score the attention maps of ``model`` (eval mode, on any device) on mask samples.

    Each image is resized as :func:`simpool.attention_maps.prepare_image` does (shorter side to ``image_size``,
    sides rounded to the patch size; ``None`` keeps the size); the maps are scored against the masks at their
    own resolution (nearest upsampling, VOC void pixels ignored, CorLoc against every object box).

    Returns ``{"num_images", "num_heads", "keep", "rows": summary_rows(report), "report": evaluate_maps(...)}``.
    """
    if len(samples) == 0:
        raise ValueError("no images to evaluate")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep must be a mass fraction in (0, 1], got {keep}")
    maps = _maps_of(model, samples, image_size, batch_size)
    gt_masks = [samples[i].mask for i in range(len(samples))]
    report = evaluate_maps(
        maps,
        gt_masks,
        gt_boxes=[samples[i].boxes for i in range(len(samples))],
        ignore_masks=[samples[i].void for i in range(len(samples))],
        keep=keep,
    )
    return {
        "num_images": report["num_images"],
        "num_heads": report["num_heads"],
        "keep": keep,
        "rows": summary_rows(report),
        "report": report,
    }


def format_table(rows: dict[str, dict[str, float]], keep: float = 0.6) -> str:
    header = f"{'map':<22} {f'Jaccard@{keep:.0%}':>12} {'best-thr J':>11} {'CorLoc':>8}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<22} {row['jaccard_mass']:>12.4f} {row['jaccard_best_threshold']:>11.4f} "
                     f"{row['corloc']:>8.4f}")
    return "\n".join(lines)
