"""Copy detection on Copydays, DINO's protocol (``eval_copy_detection.py``) on any simpool backbone.

1. Every image is resized to a square ``imsize`` (320, bicubic) and embedded as ``[g, GeM_p(patches)]``: the global
   feature g (SimPool's pooled vector, an official ViT's [CLS], a convnet's pooled vector) concatenated with the
   generalised mean of the patch tokens, ``GeM_p(x) = (mean_over_patches max(x, 1e-6)^p)^(1/p)``, p = 4.
2. Optional PCA whitening learned on ``--whitening_path`` images: with mean m and the *centred* covariance
   C = V diag(d) V^T of their features, ``x -> diag(d)^(-power) V^T (x - m)``, power 0.5, eigenvalues below
   ``1e-5 max(d)`` raised to it. (DINO centres the features but learns C un-centred, ``X^T X / n``: fixed here.)
3. L2-normalised queries (every block, ``original`` included) are ranked by cosine against the database
   (the originals, then the distractors); the top ``topk`` (20) results are scored.
4. Per block, the Holidays AP (``score_ap_from_ranks_1``, the same trapezoid as revisitop's AP: see
   :func:`simpool.evaluation.revisited_map.average_precision`) of the positives found in the top k, averaged
   over the block's queries; ``strong`` is the headline.

Example:
    >>> result = run_copy_detection(model, read_copydays("/data/copydays"), cache_root="runs/cd/features",
    ...                             weights={"weights": "ckpt.pth"}, whitening_path="/data/yfcc_20k")
    >>> result["map"]["strong"]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

from simpool.data.copydays import Copydays, list_images
from simpool.data.every_item import open_rgb
from simpool.evaluation.backbone_view import global_and_patches
from simpool.evaluation.feature_cache import FeatureCache, fill_caches
from simpool.evaluation.features import IMAGENET_MEAN, IMAGENET_STD
from simpool.evaluation.revisited_map import average_precision
from simpool.evaluation.search import topk_cosine

__all__ = ["FORMAT", "ImageListDataset", "PCAWhitening", "block_map", "copy_detection_features", "gem",
           "holidays_ap", "run_copy_detection"]

FORMAT = "simpool-copy-detection-1"


def gem(patches: torch.Tensor, p: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the grid of (B, D, h, w) -> (B, D): ``(mean max(x, eps)^p)^(1/p)``."""
    return patches.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def copy_detection_features(model: torch.nn.Module, images: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """(B, 2D): the global feature concatenated with GeM_p of the patch tokens (DINO's copy-detection feature)."""
    view = global_and_patches(model, images)
    return torch.cat([view.global_feature, gem(view.patches.float(), p)], dim=1)


class PCAWhitening:
    """PCA whitening ``x -> diag(d)^(-power) V^T (x - mean)`` learned from the centred covariance of ``features``.

    Example:
        >>> white = PCAWhitening.fit(train_features, power=0.5)
        >>> white(queries).shape == queries.shape
        True
    """

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor):
        self.mean, self.projection = mean, projection

    @classmethod
    def fit(cls, features: torch.Tensor, power: float = 0.5) -> PCAWhitening:
        x = features.double()
        mean = x.mean(dim=0)
        centred = x - mean
        cov = centred.T @ centred / x.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=float(eigenvalues.max()) * 1e-5)  # DINO's floor for null directions
        order = torch.argsort(eigenvalues, descending=True)
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        projection = torch.diag(eigenvalues.pow(-power)) @ eigenvectors.T
        return cls(mean.float(), projection.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) @ self.projection.to(x.device).T


def holidays_ap(ranks: Sequence[int], num_positives: int) -> float:
    """The Holidays package's ``score_ap_from_ranks_1``: AP from the sorted 0-based ranks of the true positives
    found in a result list, out of ``num_positives``."""
    return average_precision(torch.as_tensor(list(ranks), dtype=torch.float64).numpy(), num_positives)


def block_map(indices: torch.Tensor, positives: Sequence[Sequence[int]]) -> float:
    """Mean Holidays AP of a block: ``indices`` (Q, k) database rows best first, ``positives[q]`` the rows of q's
    originals. Positives outside the top k count as not found."""
    total = 0.0
    for row, wanted in zip(indices.tolist(), positives, strict=True):
        wanted = set(wanted)
        total += holidays_ap([rank for rank, db in enumerate(row) if db in wanted], len(wanted))
    return total / max(1, len(positives))


class ImageListDataset(Dataset):
    """``transform(RGB image)`` of each path, in order."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[index]))


def square_transform(imsize: int) -> transforms.Compose:
    """DINO's: bicubic resize to imsize x imsize (aspect ratio not kept), ToTensor, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize((imsize, imsize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _embed_paths(model, paths: list[Path], name: str, cache_root: Path, identity: dict[str, Any], imsize: int,
                 p: float, device: torch.device, batch_size: int, num_workers: int) -> torch.Tensor:
    cache = FeatureCache(cache_root, name, identity).open()
    ids = [str(path.resolve()) for path in paths]
    fill_caches([cache], ImageListDataset(paths, square_transform(imsize)), ids,
                lambda images: [copy_detection_features(model, images, p)], device, batch_size, num_workers,
                desc=name)
    return cache.features(ids)


@torch.no_grad()
def run_copy_detection(
    model: torch.nn.Module,
    copydays: Copydays,
    cache_root: str | os.PathLike,
    weights: dict[str, Any],
    distractors_path: str | os.PathLike | None = None,
    whitening_path: str | os.PathLike | None = None,
    imsize: int = 320,
    gem_p: float = 4.0,
    whitening_power: float = 0.5,
    topk: int = 20,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The whole protocol (module docstring); features cached under ``cache_root`` by ``weights`` (what identifies
    the model: :func:`simpool.run.weights_identity`) and settings. Collective under torchrun; every rank returns
    the same dict: ``{"format", "map": {block: mAP}, "strong_map", "num_queries", "database_size", ...}``."""
    device = torch.device(device)
    model.eval()
    cache_root = Path(cache_root)
    identity = {"format": FORMAT, **weights, "imsize": imsize, "gem_p": gem_p}
    args = (cache_root, identity, imsize, gem_p, device, batch_size, num_workers)
    block_features = {name: _embed_paths(model, files, f"copydays-{name.replace('/', '-')}", *args)
                      for name, files in copydays.blocks.items()}
    database = [block_features["original"]]
    num_distractors = 0
    if distractors_path is not None:
        distractors = _embed_paths(model, list_images(distractors_path, "--distractors_path"), "distractors", *args)
        database.append(distractors)
        num_distractors = distractors.shape[0]
    database_features = torch.cat(database)
    queries = torch.cat(list(block_features.values()))
    num_whitening = 0
    if whitening_path is not None:
        whitening_features = _embed_paths(model, list_images(whitening_path, "--whitening_path"), "whitening", *args)
        num_whitening = whitening_features.shape[0]
        white = PCAWhitening.fit(whitening_features, whitening_power)
        database_features, queries = white(database_features), white(queries)
    database_features = F.normalize(database_features, dim=1).to(device)
    queries = F.normalize(queries, dim=1).to(device)
    _, indices = topk_cosine(queries, database_features, topk)
    indices = indices.cpu()
    maps, start = {}, 0
    for name, files in copydays.blocks.items():
        maps[name] = block_map(indices[start:start + len(files)], copydays.positives(name))
        start += len(files)
    return {"format": FORMAT, "map": maps, "strong_map": maps["strong"],
            "num_queries": {name: len(files) for name, files in copydays.blocks.items()},
            "database_size": int(database_features.shape[0]), "num_distractors": num_distractors,
            "num_whitening": num_whitening, "imsize": imsize, "gem_p": gem_p,
            "whitening_power": whitening_power if whitening_path is not None else None, "topk": topk,
            "feature_dim": int(queries.shape[1])}
