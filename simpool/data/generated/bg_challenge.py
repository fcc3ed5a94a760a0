"""Fashion-on-photos written as MadryLab/backgrounds_challenge distributes ImageNet-9: ``<variant>/val/<NN_class>/``
for the eight variants, plus ``original/train/`` to train a probe on (as the challenge's IN-9 training download).

The nine IN-9 class folders (``00_dog`` ... ``08_fish``) hold Fashion-MNIST classes 0 ... 8 (class 9, ankle boot,
is left out). Variants of sample i (item mask m, photo background b, item box B):

* ``original``: the image; ``only_fg``: the item on black; ``no_fg``: b with the item's pixels black;
* ``only_bg_b``: b with B black; ``only_bg_t``: b with B filled by b's own pixels shifted sideways (a tiling);
* ``mixed_same`` / ``mixed_rand`` / ``mixed_next``: the item pasted on ``only_bg_t`` of another sample of the same
  class / of any class / of the next class.

Example::

    >>> write_bg_challenge("/tmp/in9", n_val=90, n_train=270)
    >>> simpool.data.bg_challenge.find_variants("/tmp/in9")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.bg_challenge import IN9_CLASSES, IN9_VARIANTS
from simpool.data.fashion_on_photos import Split, render_fashion_on_photo

__all__ = ["write_bg_challenge"]


def _tiled(background: np.ndarray, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    out = background.copy()
    shift = x1 - x0 if x1 - x0 < out.shape[1] else out.shape[1] // 2
    out[y0:y1, x0:x1] = np.roll(background, shift, axis=1)[y0:y1, x0:x1]
    return out


def _samples(n: int, image_size: int, seed: int, split: Split) -> list:
    """The first samples of each of classes 0..8 (class 9, ankle boot, is left out), ceil(n / 9) per class."""
    quota = -(-n // len(IN9_CLASSES))
    samples, counts, index = [], [0] * len(IN9_CLASSES), 0
    while len(samples) < n:
        sample = render_fashion_on_photo(index, image_size, seed, split)
        if sample.label < len(IN9_CLASSES) and counts[sample.label] < quota:
            samples.append(sample)
            counts[sample.label] += 1
        index += 1
    return samples


def _variants(samples: list, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    labels = np.array([s.label for s in samples])
    out: dict[str, list[np.ndarray]] = {v: [] for v in IN9_VARIANTS}
    for i, s in enumerate(samples):
        mask = s.mask[:, :, None]
        tiled = _tiled(s.background, s.box)
        black_box = s.background.copy()
        x0, y0, x1, y1 = s.box
        black_box[y0:y1, x0:x1] = 0
        partners = {
            "mixed_same": np.flatnonzero((labels == s.label) & (np.arange(len(samples)) != i)),
            "mixed_rand": np.flatnonzero(np.arange(len(samples)) != i),
            "mixed_next": np.flatnonzero(labels == (s.label + 1) % len(IN9_CLASSES)),
        }
        out["original"].append(s.image)
        out["only_fg"].append(np.where(mask, s.image, 0))
        out["no_fg"].append(np.where(mask, 0, s.background))
        out["only_bg_b"].append(black_box)
        out["only_bg_t"].append(tiled)
        for name, pool in partners.items():
            other = samples[int(rng.choice(pool))] if len(pool) else s
            out[name].append(np.where(mask, s.image, _tiled(other.background, other.box)))
    return out


def _write(folder: Path, images: list[np.ndarray], labels: list[int], prefix: str) -> None:
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        class_dir = folder / f"{label:02d}_{IN9_CLASSES[label]}"
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(class_dir / f"{prefix}{i:05d}.JPEG",
                                                                          quality=95)


def write_bg_challenge(folder: str | Path, n_val: int = 90, n_train: int = 0, image_size: int = 64,
                       seed: int = 0) -> Path:
    """Write ``n_val`` test images per variant (and ``n_train`` originals to ``original/train``); returns folder."""
    root = Path(folder)
    samples = _samples(n_val, image_size, seed, "test")
    labels = [s.label for s in samples]
    for variant, images in _variants(samples, np.random.default_rng([seed, 9])).items():
        _write(root / variant / "val", images, labels, f"{variant}_")
    if n_train:
        train = _samples(n_train, image_size, seed, "train")
        _write(root / "original" / "train", [s.image for s in train], [s.label for s in train], "train_")
    return root
