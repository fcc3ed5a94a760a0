"""DINO multi-crop on batches of tensors, on any device: the loader only decodes, the accelerator augments.

The reference spends ~28 ms of CPU per image on augmentation, so on a 16-core host feeding one GPU the loader
workers take every core and the training step still waits for data. Here the CPU work per image is reading
and decoding the file (a data set with :class:`DecodeForGPU` as its transform, batched by
:func:`collate_padded_skip_bad`); :class:`GPUMultiCrop` then draws DINO's random decisions for the whole batch
(the sampler of the CPU path, :class:`.params.MultiCropSampler`) and renders all crops with batched tensor ops:

* crop + resize: ``torchvision.ops.roi_align`` with one box per crop, ``aligned=True`` and adaptive
  sampling (ceil(box side / output side) bilinear samples per output pixel and axis, averaged). That is
  bilinear interpolation with box-filter antialiasing, where the reference uses PIL's antialiased bicubic:
  crops come out slightly softer; the crop geometry distribution is identical;
* flip, colour jitter (per-sample random order), grayscale, Gaussian blur (per-sample sigma), solarize and
  normalisation: :func:`.ops.apply_crop_decisions`, the code the CPU path runs too. Each op runs once per
  batch on the rows that apply it; rows are chosen from the decisions, which live on the CPU, so nothing
  waits on the device.

Randomness comes from a CPU ``torch.Generator`` (given to the constructor or to a call), so the same seed gives
the same crops on CPU and on CUDA, and the decisions are drawn without any device synchronisation.

Input: a list of (3, H_i, W_i) uint8 tensors, or a zero-padded (B, 3, Hmax, Wmax) uint8 tensor with
``sizes`` (B, 2) = (H_i, W_i) as :func:`pad_images` returns. Output: [global 1, global 2, local 1, ...,
local N], each (B, 3, s, s) float32 on the input's device, normalised.

Example::

    dataset = ImageFolderDataset(root, transform=DecodeForGPU())
    loader = DataLoader(dataset, batch_size=100, num_workers=4, collate_fn=collate_padded_skip_bad,
                        pin_memory=True)
    multicrop = GPUMultiCrop((0.25, 1.0), (0.05, 0.25), local_crops_number=6)
    for (images, sizes), labels, num_skipped in loader:
        crops = multicrop(images.to("cuda", non_blocking=True), sizes)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import roi_align

from simpool.data import BadSample, CollatedBatch, collate_skip_bad
from simpool.dino.augment.cpu import pil_to_uint8_chw
from simpool.dino.augment.ops import apply_crop_decisions
from simpool.dino.augment.params import MultiCropSampler, ViewParams

# ----------------------------------------------------------------------------------------------------------
# CPU side: decode, pad
# ----------------------------------------------------------------------------------------------------------


class DecodeForGPU:
    """Dataset transform of the batched path: PIL image -> (3, H, W) uint8, large photos reduced on the CPU.

    Photos whose longer side exceeds ``2 * max_side`` are shrunk by an integer factor (``Image.reduce``, a
    cheap box filter) so a padded batch stays small; DINO's crops are at most 224 px, so ``max_side=512``
    keeps every crop at or above its output resolution for the usual crop scales.
    """

    def __init__(self, max_side: int = 512) -> None:
        self.max_side = max_side

    def __call__(self, image: Image.Image) -> Tensor:
        factor = max(image.size) // self.max_side
        if factor >= 2:
            image = image.reduce(factor)
        return pil_to_uint8_chw(image)


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (3, H_i, W_i) images into a zero-padded (B, 3, Hmax, Wmax) tensor; also return sizes (B, 2)."""
    if len(images) == 0:
        raise ValueError("need at least one image")
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) images, got shape {tuple(image.shape)}")
    sizes = torch.tensor([[image.shape[1], image.shape[2]] for image in images], dtype=torch.int64)
    height, width = sizes.max(dim=0).values.tolist()
    padded = images[0].new_zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    return padded, sizes


def _collate_padded(batch: Sequence[tuple[Tensor, int]]) -> tuple[tuple[Tensor, Tensor], Tensor]:
    # one padded tensor rather than a list, so the batch moves to the device in a single copy
    padded, sizes = pad_images([image for image, _ in batch])
    return (padded, sizes), torch.tensor([label for _, label in batch], dtype=torch.int64)


def collate_padded_skip_bad(samples: Sequence[tuple[Tensor, Any] | BadSample]) -> CollatedBatch:
    """DataLoader ``collate_fn`` of the batched path: :func:`simpool.data.collate_skip_bad` (drop and count
    unreadable files) with the good (uint8 image, label) samples padded into one batch.

    Returns ``CollatedBatch(images=(padded (B, 3, Hmax, Wmax) uint8, sizes (B, 2)), labels (B,), num_skipped)``.
    """
    return collate_skip_bad(samples, collate=_collate_padded)


# ----------------------------------------------------------------------------------------------------------
# Device side: batched augmentation
# ----------------------------------------------------------------------------------------------------------


class GPUMultiCrop(MultiCropSampler, nn.Module):
    """Batched DINO multi-crop (2 global + N local crops) on uint8 image batches, any device.

    Arguments: those of :class:`~.params.MultiCropSampler` (crop scales, number of local crops, crop sizes,
    optional CPU generator; None draws from torch's global RNG).
    """

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        sizes: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        padded, sizes = _as_padded_batch(images, sizes)
        params = self.sample_params(sizes[:, 0], sizes[:, 1], generator)
        return self.render(padded, sizes, params)

    def render(self, padded: Tensor, sizes: Tensor, params: list[ViewParams]) -> list[Tensor]:
        """Apply sampled decisions to a padded uint8 batch; returns the 2 + N crop batches."""
        source = _edge_replicated_float(padded, sizes)
        batch = padded.shape[0]
        crops: list[Tensor] = []
        sizes_of_views = [recipe.size for recipe in self.recipes]
        # views of one output size (the two global views; the local views) are rendered as one batch
        for size in dict.fromkeys(sizes_of_views):
            group = ViewParams.cat([p for p, s in zip(params, sizes_of_views) if s == size])
            if len(group) > 0:
                crops.extend(render_crops(source, size, group).split(batch, dim=0))
        return crops


def _as_padded_batch(images: Tensor | Sequence[Tensor], sizes: Tensor | None) -> tuple[Tensor, Tensor]:
    if isinstance(images, Tensor) and images.dim() == 4:
        if images.dtype != torch.uint8 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) uint8 batch, got {images.dtype} {tuple(images.shape)}")
        if sizes is None:
            sizes = torch.tensor([[images.shape[2], images.shape[3]]] * images.shape[0])
        sizes = torch.as_tensor(sizes, dtype=torch.int64).cpu()
        if sizes.shape != (images.shape[0], 2):
            raise ValueError(f"sizes must be (B, 2) = (height, width) per image, got {tuple(sizes.shape)}")
        if (sizes[:, 0] > images.shape[2]).any() or (sizes[:, 1] > images.shape[3]).any() or (sizes < 1).any():
            raise ValueError("sizes must lie within the padded batch's height and width")
        return images, sizes
    if sizes is not None:
        raise ValueError("sizes goes with a padded (B, 3, H, W) batch; a list of images carries its own sizes")
    for image in images:
        if image.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {image.dtype}")
    return pad_images(list(images))


def _edge_replicated_float(padded: Tensor, sizes: Tensor) -> Tensor:
    """Float copy of the batch, one pixel larger, with each image's last row/column repeated into its padding.

    roi_align's bilinear samples near a crop's right/bottom edge read one pixel beyond it; that pixel must
    be the image's own edge, not the zero padding.
    """
    batch, _, height, width = padded.shape
    device = padded.device
    sizes = sizes.to(device)
    rows = torch.minimum(torch.arange(height + 1, device=device)[None, :], sizes[:, :1] - 1)
    cols = torch.minimum(torch.arange(width + 1, device=device)[None, :], sizes[:, 1:] - 1)
    index = torch.arange(batch, device=device)[:, None, None]
    # advanced indexing puts the indexed dims first: (B, H+1, W+1, 3)
    gathered = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2).float()


def render_crops(source: Tensor, size: int, params: ViewParams) -> Tensor:
    """Render K crops (row k from image k mod B of ``source``), returning (K, 3, size, size) normalised."""
    device = source.device
    num_images = source.shape[0]
    count = len(params)
    top, left, height, width = params.boxes.to(torch.float32).unbind(1)
    image_index = (torch.arange(count) % num_images).to(torch.float32)
    boxes = torch.stack([image_index, left, top, left + width, top + height], dim=1).to(device)
    crops = roi_align(source, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return apply_crop_decisions(crops, params)
