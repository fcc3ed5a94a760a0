"""DINO multi-crop for one image on a CPU loader core: the reference recipe, faster per core.

The reference (facebookresearch/dino ``DataAugmentationDINO``) turns one PIL image into

* global crop 1: RandomResizedCrop(224, scale=global, bicubic) → flip(0.5) → ColorJitter(0.4, 0.4, 0.2, 0.1)
  with p=0.8 → grayscale(0.2) → Gaussian blur (p=1.0) → normalise
* global crop 2: same, but blur p=0.1, then solarize (threshold 128) with p=0.2
* N local crops: RandomResizedCrop(96, scale=local, bicubic) → flip/jitter/grayscale → blur (p=0.5)
  → normalise

with the blur radius drawn from U(0.1, 2.0) (PIL's ``GaussianBlur`` radius is the Gaussian's standard
deviation). :class:`DataAugmentationDINO` draws the same random decisions (:func:`.params.sample_views`) and
renders them differently: the image becomes a uint8 tensor once; each crop is cut as a view and resized in one
antialiased bicubic ``interpolate`` call on uint8 (torch's antialiased bicubic uses a = -0.5 and widens the
kernel on downscaling, as PIL does), then converted to float once; the colour ops, blur and normalisation are
:func:`.ops.apply_crop_decisions` on that small crop. Results differ from the PIL reference only by rounding
(PIL rounds to uint8 after every op).

Not ``torchvision.transforms.v2``: on uint8 tensors it is slower at every op (whole pipeline 0.43x our img/s
per core; resized crop 0.9x, colour ops 0.25-0.7x, blur 0.15-0.5x; ``benchmarks/RESULTS.md``).

Threads: the ops are meant to run one thread per loader worker, as ``torch.utils.data.DataLoader`` sets in each
worker process (``torch.set_num_threads(1)``; call it yourself when augmenting in the main process).

Example::

    aug = DataAugmentationDINO((0.25, 1.0), (0.05, 0.25), local_crops_number=6)
    crops = aug(Image.open("cat.jpg").convert("RGB"))   # 2 x (3, 224, 224) then 6 x (3, 96, 96), float32
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from simpool.dino.augment.ops import apply_crop_decisions
from simpool.dino.augment.params import MultiCropSampler, ViewParams


def pil_to_uint8_chw(image: Image.Image | Tensor | np.ndarray) -> Tensor:
    """A (3, H, W) uint8 view of an RGB image, without copying the pixels of a PIL image."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.asarray(image)  # already a copy (PIL exports via tobytes), but read-only
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        with warnings.catch_warnings():
            # torch warns that the buffer is read-only; the pixels are only ever read
            warnings.simplefilter("ignore", UserWarning)
            image = torch.from_numpy(image).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a PIL image or a (3, H, W) uint8 tensor, got {image.dtype} {tuple(image.shape)}; "
            "decode with torchvision.io.decode_image(..., mode=ImageReadMode.RGB)"
        )
    return image


class DataAugmentationDINO(MultiCropSampler):
    """DINO multi-crop: 2 global crops then ``local_crops_number`` local crops, normalised float tensors.

    Same distributions as the reference (see the module docstring); colour ops in float rather than on
    uint8 PIL images, so results differ from PIL only by rounding. Arguments: those of
    :class:`~.params.MultiCropSampler` (crop scales, number of local crops, crop sizes, optional generator).
    """

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        pixels = pil_to_uint8_chw(image)
        params = self.sample_params([pixels.shape[1]], [pixels.shape[2]])
        return self.render(pixels, params)

    def render(self, pixels: Tensor, params: list[ViewParams]) -> list[Tensor]:
        """Apply sampled decisions to a (3, H, W) uint8 image; one crop per row of each ViewParams.

        One crop at a time: with a single row every op takes Python scalars and no rows are gathered or
        scattered, which on a CPU core beats batching the few crops of one image.
        """
        crops: list[Tensor] = []
        for recipe, view_params in zip(self.recipes, params):
            for box, decision in zip(view_params.boxes.tolist(), view_params.rows()):
                # the resize keeps the channels-last layout of the HWC source; the colour ops want each
                # channel contiguous (unbind(-3) then elementwise ops), so convert to planar float once
                resized = _resized_crop(pixels, box, recipe.size).unsqueeze(0)
                resized = resized.to(torch.float32, memory_format=torch.contiguous_format)
                crops.append(apply_crop_decisions(resized, [decision])[0])
        return crops


def _resized_crop(pixels: Tensor, box: list[int], size: int) -> Tensor:
    """Antialiased bicubic resize of a box of a uint8 (3, H, W) image, straight from a view (crop and resize
    in one pass, as PIL's ``resize(box=...)``); torch's antialiased bicubic uses a = -0.5, as PIL does."""
    top, left, height, width = box
    region = pixels[:, top : top + height, left : left + width].unsqueeze(0)
    return F.interpolate(region, size=(size, size), mode="bicubic", antialias=True)[0]
