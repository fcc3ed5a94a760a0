"""DINO multi-crop augmentation: the reference recipe on uint8 tensors, per image on a CPU core or batched
on any device.

* :mod:`.params`: view recipes (:class:`ViewRecipe`, :func:`dino_view_recipes`) and the vectorised sampler of
  every random decision (:func:`sample_views`), as :class:`ViewParams` records
* :mod:`.ops`: pixel operations on float tensors (colour jitter, grayscale, blur, solarize, normalisation) and
  :func:`apply_crop_decisions`, which applies a crop's decisions with them
* :mod:`.cpu`: :class:`DataAugmentationDINO`, the per-image transform run by loader workers
* :mod:`.batched`: :class:`GPUMultiCrop`, the batched transform for the device, with its loader half
  (:class:`DecodeForGPU`, :func:`collate_padded_skip_bad`)

Example::

    aug = DataAugmentationDINO((0.25, 1.0), (0.05, 0.25), local_crops_number=6)
    crops = aug(image)   # 2 x (3, 224, 224) then 6 x (3, 96, 96), float32, normalised
"""

from simpool.dino.augment.batched import DecodeForGPU, GPUMultiCrop, collate_padded_skip_bad, pad_images
from simpool.dino.augment.cpu import DataAugmentationDINO, pil_to_uint8_chw
from simpool.dino.augment.ops import apply_crop_decisions
from simpool.dino.augment.params import MultiCropSampler, ViewParams, ViewRecipe, dino_view_recipes, sample_views

__all__ = [
    "DataAugmentationDINO",
    "DecodeForGPU",
    "GPUMultiCrop",
    "MultiCropSampler",
    "ViewParams",
    "ViewRecipe",
    "apply_crop_decisions",
    "collate_padded_skip_bad",
    "dino_view_recipes",
    "pad_images",
    "pil_to_uint8_chw",
    "sample_views",
]
