"""Image retrieval on revisited Oxford and Paris, DINO's protocol (``eval_image_retrieval.py``) on any backbone.

1. Each image is shrunk to ``imsize`` on its long side (PIL ``thumbnail``, Lanczos: DINO's ``Image.ANTIALIAS``,
   removed in Pillow 10) and embedded whole by the global feature (SimPool's pooled vector, an official ViT's
   [CLS], a convnet's pooled vector). ``multiscale``: the mean of the features at scales 1, 1/sqrt(2) and 1/2
   (bilinear resizes of the normalised image tensor), as DINO's ``utils.multi_scale``.
2. Queries are embedded uncropped, as DINO does; ``crop_queries`` crops them to their ``bbx`` first, the
   revisitop standard.
3. Cosine ranking of the database (+ optional distractors, e.g. revisitop1m) for each L2-normalised query; the
   revisited mAP and mP@{1,5,10} in the Easy, Medium and Hard setups (:mod:`simpool.evaluation.revisited_map`).

Images of equal size after the thumbnail are embedded together (a batch never mixes sizes); per-scale features
are cached by image name, so a multi-scale run after a single-scale one embeds only the two new scales.

Example:
    >>> result = run_retrieval(model, read_revisited("/data/revisitop", "roxford5k"), "runs/ret/features",
    ...                        weights={"weights": "ckpt.pth"}, multiscale=True)
    >>> result["medium"]["map"], result["hard"]["map"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import Dataset
from torchvision import transforms

from simpool.data.every_item import open_rgb
from simpool.data.revisitop import RevisitedData
from simpool.evaluation.backbone_view import global_and_patches
from simpool.evaluation.feature_cache import FeatureCache, fill_caches
from simpool.evaluation.features import IMAGENET_MEAN, IMAGENET_STD
from simpool.evaluation.revisited_map import revisited_scores
from simpool.evaluation.search import ranking_positions

__all__ = ["FORMAT", "MULTISCALE", "ThumbnailDataset", "multiscale_features", "run_retrieval", "thumbnail_size"]

FORMAT = "simpool-retrieval-1"
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)


def thumbnail_size(width: int, height: int, imsize: int) -> tuple[int, int]:
    """The (width, height) ``PIL.Image.thumbnail((imsize, imsize))`` gives an image of that size (Pillow's own
    rounding, written out so that batches can be planned from the file headers without decoding)."""
    if imsize >= width and imsize >= height:
        return width, height
    aspect = width / height

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if 1 >= aspect:  # x / y = 1 for a square box
        return round_aspect(imsize * aspect, key=lambda n: abs(aspect - n / imsize)), imsize
    return imsize, round_aspect(imsize / aspect, key=lambda n: 0 if n == 0 else abs(aspect - imsize / n))


class ThumbnailDataset(Dataset):
    """``paths[i]`` as a normalised tensor, cropped to ``boxes[i]`` (x1, y1, x2, y2) when given, then shrunk
    to ``imsize`` on its long side (Lanczos thumbnail). ``size_of(i)`` tells its size without decoding it."""

    def __init__(self, paths: Sequence[Path], imsize: int, boxes: Sequence[tuple | None] | None = None):
        self.paths, self.imsize = list(paths), imsize
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def size_of(self, index: int) -> tuple[int, int]:
        box = self.boxes[index]
        if box is not None:
            width, height = _box_size(box)
        else:
            try:
                with Image.open(self.paths[index]) as image:  # reads the header only
                    width, height = image.size
            except OSError:  # no image: open_rgb says so in one line
                width, height = open_rgb(self.paths[index]).size
        return thumbnail_size(width, height, self.imsize)

    def __getitem__(self, index: int) -> torch.Tensor:
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # DINO's setting: some Oxford JPEGs end early
        image = open_rgb(self.paths[index])
        if self.boxes[index] is not None:
            image = image.crop(tuple(round(v) for v in self.boxes[index]))
        image.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        return self.normalize(image)


def _box_size(box: tuple) -> tuple[int, int]:
    x1, y1, x2, y2 = (round(v) for v in box)
    return x2 - x1, y2 - y1


def multiscale_features(model: torch.nn.Module, images: torch.Tensor,
                        scales: Sequence[float] = MULTISCALE) -> list[torch.Tensor]:
    """The global feature of ``images`` at each scale (bilinear, align_corners=False, as DINO), one tensor each."""
    out = []
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        out.append(global_and_patches(model, scaled).global_feature)
    return out


def _features(model, dataset: ThumbnailDataset, ids: list[str], name: str, cache_root: Path,
              identity: dict[str, Any], scales: Sequence[float], device: torch.device, batch_size: int,
              num_workers: int) -> torch.Tensor:
    """L2-normalised mean over ``scales`` of the cached per-scale features, embedding what is not cached."""
    caches = [FeatureCache(cache_root, f"{name}-s{scale:.4f}", {**identity, "scale": scale}).open()
              for scale in scales]
    todo = [(scale, cache) for scale, cache in zip(scales, caches, strict=True) if cache.missing(ids)]
    if todo:  # the same on every rank: all read the same cache
        fill_caches([cache for _, cache in todo], dataset, ids,
                    lambda images: multiscale_features(model, images, [scale for scale, _ in todo]), device,
                    batch_size, num_workers, size_key=dataset.size_of, desc=name)
    return F.normalize(torch.stack([cache.features(ids) for cache in caches]).mean(dim=0), dim=1)


@torch.no_grad()
def run_retrieval(
    model: torch.nn.Module,
    data: RevisitedData,
    cache_root: str | os.PathLike,
    weights: dict[str, Any],
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    distractors: Sequence[Path] = (),
    kappas: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The whole protocol (module docstring). Collective under torchrun; every rank returns the same dict:
    ``{"format", "dataset", "easy"|"medium"|"hard": {"map", "mp_at_k": {k: value}, "aps"}, ...}`` (fractions)."""
    device = torch.device(device)
    model.eval()
    cache_root = Path(cache_root)
    scales = MULTISCALE if multiscale else (1.0,)
    identity = {"format": FORMAT, **weights, "imsize": imsize}
    common = (cache_root, identity, scales, device, batch_size, num_workers)
    database = _features(model, ThumbnailDataset([data.image_path(n) for n in data.imlist], imsize), list(data.imlist),
                         f"{data.name}-database", *common)
    boxes = [entry["bbx"] for entry in data.gnd] if crop_queries else None
    if crop_queries and any(box is None for box in boxes):
        raise ValueError(f"--crop_queries: gnd_{data.name}.pkl has queries without a bbx")
    queries = _features(model, ThumbnailDataset([data.image_path(n) for n in data.qimlist], imsize, boxes),
                        list(data.qimlist), f"{data.name}-queries{'-cropped' if crop_queries else ''}", *common)
    if distractors:
        extra = _features(model, ThumbnailDataset(distractors, imsize), [str(p) for p in distractors],
                          "distractors", *common)
        database = torch.cat([database, extra])
    targets = [sorted({int(r) for key in ("easy", "hard", "junk") for r in entry[key]}) for entry in data.gnd]
    positions = ranking_positions(queries.to(device), database.to(device), targets)
    places = [dict(zip(rows, where.tolist(), strict=True)) for rows, where in zip(targets, positions, strict=True)]
    scores = revisited_scores(places, data.gnd, kappas)
    return {"format": FORMAT, "dataset": data.name, **scores, "num_queries": len(data.qimlist),
            "database_size": int(database.shape[0]), "num_distractors": len(distractors), "imsize": imsize,
            "multiscale": multiscale, "crop_queries": crop_queries, "feature_dim": int(database.shape[1])}
