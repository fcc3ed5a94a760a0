"""Images with object annotations, for scoring attention maps: PASCAL VOC-style mask folders and COCO-style JSON.

Every reader yields :class:`MaskSample` items — a PIL image, its foreground and void masks (H, W) bool and one box
per object (k, 4) ``x0, y0, x1, y1`` inclusive-exclusive — ready for
:func:`simpool.evaluation.attention_metrics.evaluate_maps` (``gt_masks`` = mask, ``gt_boxes`` = boxes,
``ignore_masks`` = void).

* :func:`read_mask_folder`: ``JPEGImages/`` + ``SegmentationObject/`` (or ``SegmentationClass/``) PNG masks,
  VOC's conventions (0 background, 255 void, other values objects) or plain 0/255 masks;
* :func:`read_coco`: a folder of images + a COCO instances JSON (``images``, ``annotations`` with ``bbox``
  ``[x, y, w, h]``, optional polygon ``segmentation``, ``iscrowd``). Polygons are rasterised into the mask;
  annotations without polygons contribute their filled box, so on box-only data Jaccard is measured against
  boxes (a coarser target: say so when reporting). Crowd regions are void.

Example::

    >>> voc = read_mask_folder("/data/VOC2012")                       # lazily, one MaskSample per mask
    >>> coco = read_coco("/data/coco/val2017", "/data/coco/annotations/instances_val2017.json")
    >>> sample = coco[0]; sample.boxes.shape                          # (objects, 4)
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.ops import masks_to_boxes

from simpool.data.every_item import open_rgb, reading_image
from simpool.data.paths import DataError

__all__ = ["MaskSample", "MaskFolderDataset", "read_mask_folder", "CocoDataset", "read_coco", "mask_to_box"]


def mask_to_box(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Tight box (x0, y0, x1, y1) of the True pixels of (..., H, W) masks, inclusive-exclusive: int64 (..., 4).

    x0, y0 are the first column/row holding a True pixel and x1, y1 one past the last, so a single pixel at
    (x, y) has box (x, y, x + 1, y + 1) and the area (x1 - x0)(y1 - y0) counts pixels (the convention of
    ``torchvision.ops.box_iou``). ``torchvision.ops.masks_to_boxes`` gives the last row/column itself
    (x2, y2 inclusive): one is added. An empty mask gives (0, 0, 0, 0), a zero-area box.

    Example::

        >>> mask_to_box(torch.tensor([[0, 0, 0], [0, 1, 1]]))
        tensor([1, 1, 3, 2])
    """
    mask = torch.as_tensor(mask).bool()
    if mask.dim() < 2:
        raise ValueError(f"mask must have shape (H, W) or (..., H, W), got {tuple(mask.shape)}")
    flat = mask.reshape(-1, *mask.shape[-2:])
    found = flat.flatten(1).any(dim=1)
    boxes = torch.zeros(flat.shape[0], 4, dtype=torch.int64, device=mask.device)
    # Only non-empty masks go in: torchvision before 0.17 fails on an empty one.
    boxes[found] = masks_to_boxes(flat[found]).long() + torch.tensor([0, 0, 1, 1], device=mask.device)
    return boxes.view(*mask.shape[:-2], 4)


@dataclass(frozen=True)
class MaskSample:
    """One annotated image: foreground and void masks (H, W) bool, one box per object (k, 4)."""

    name: str
    image: Image.Image
    mask: torch.Tensor
    void: torch.Tensor
    boxes: torch.Tensor


_VOID = 255
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _decode_mask(values: np.ndarray, binary: bool | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Raw PNG values → (foreground, void, per-object masks), see :func:`read_mask_folder`."""
    if binary is None:
        binary = bool(np.isin(values, (0, _VOID)).all())
    if binary:
        foreground = values != 0
        return foreground, np.zeros_like(foreground), [foreground]
    void = values == _VOID
    foreground = (values != 0) & ~void
    objects = [values == v for v in np.unique(values[foreground])]
    return foreground, void, objects


class MaskFolderDataset(Dataset):
    """Lazy reader of a VOC-style folder; item i is a :class:`MaskSample`. See :func:`read_mask_folder`."""

    def __init__(self, folder: str | Path, mask_dir: str | None = None, binary: bool | None = None) -> None:
        root = Path(folder)
        self.image_dir = root / "JPEGImages"
        candidates = [mask_dir] if mask_dir else ["SegmentationObject", "SegmentationClass"]
        found = [root / name for name in candidates if (root / name).is_dir()]
        if not self.image_dir.is_dir() or not found:
            raise DataError(f"{root} is not a VOC-style folder: expected JPEGImages/ and one of "
                            f"{candidates}/ with PNG masks (pass mask_dir= for another mask folder name)")
        self.mask_dir = found[0]
        self.binary = binary
        self.names = sorted(path.stem for path in self.mask_dir.glob("*.png"))
        if not self.names:
            raise DataError(f"no PNG masks in {self.mask_dir}")
        self.image_paths = [self._image_path(name) for name in self.names]

    def _image_path(self, name: str) -> Path:
        for suffix in _IMAGE_SUFFIXES:
            if (path := self.image_dir / f"{name}{suffix}").is_file():
                return path
        raise DataError(f"mask {self.mask_dir / name}.png has no image {self.image_dir / name}.jpg "
                        "(or .jpeg/.png)")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> MaskSample:
        name = self.names[index]
        image = open_rgb(self.image_paths[index])
        with reading_image(self.mask_dir / f"{name}.png") as mask_file:
            if mask_file.mode not in ("P", "L", "1", "I", "I;16"):
                raise DataError(f"{mask_file.filename}: mask mode {mask_file.mode} is not a label image; "
                                "save masks as palette (VOC) or greyscale PNGs")
            values = np.asarray(mask_file)  # palette PNGs give the palette indices, i.e. the labels
        if values.shape != (image.height, image.width):
            raise DataError(f"{name}: mask {values.shape} and image {(image.height, image.width)} "
                            "differ in size")
        foreground, void, objects = _decode_mask(values.astype(np.int64), self.binary)
        boxes = mask_to_box(np.stack(objects)) if objects else torch.zeros(0, 4, dtype=torch.int64)
        return MaskSample(name=name, image=image, mask=torch.from_numpy(foreground),
                          void=torch.from_numpy(void), boxes=boxes)


def read_mask_folder(
    folder: str | Path, mask_dir: str | None = None, binary: bool | None = None
) -> MaskFolderDataset:
    """Open a VOC-style folder of images and PNG masks (lazily: VOC has thousands of images).

    Layout: ``JPEGImages/<id>.jpg`` and ``SegmentationObject/<id>.png`` (or
    ``SegmentationClass/``, or ``mask_dir``); only ids that have a mask are read. Mask values:

    * VOC convention: 0 = background, 255 = void (object borders and ambiguous pixels, ignored
      in scoring), every other value = foreground. In ``SegmentationObject`` each value is one
      object instance and gets its own box; in ``SegmentationClass`` a value is a class, so
      instances of one class share a box.
    * binary masks: a mask whose only values are 0 and 255 (as :func:`write_voc_style` writes, and
      most tools save) is read as 0 = background, 255 = foreground, no void — a VOC mask always
      holds an object id besides 0 and 255, so the two cases cannot be confused. Force either
      reading with ``binary=True`` (any non-zero = foreground) or ``binary=False`` (VOC rule).

    Each item is a :class:`MaskSample` (PIL image, mask, void, boxes (k, 4) x0, y0, x1, y1,
    inclusive-exclusive) ready for :func:`simpool.evaluation.attention_metrics.evaluate_maps`
    (``gt_boxes`` = boxes, ``ignore_masks`` = void).
    """
    return MaskFolderDataset(folder, mask_dir=mask_dir, binary=binary)


# ----------------------------------------------------------------------------- COCO-style JSON


def _coco_box(bbox: Any, width: int, height: int, where: str) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` (floats, pixel edges) → the integer pixel box covering it, clipped to the image."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise DataError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(width, int(np.ceil(x + w))), min(height, int(np.ceil(y + h)))
    return x0, y0, x1, y1


class CocoDataset(Dataset):
    """Lazy reader of images + a COCO instances JSON; item i is a :class:`MaskSample`. See :func:`read_coco`."""

    def __init__(self, image_dir: str | Path, annotation_file: str | Path) -> None:
        self.image_dir = Path(image_dir)
        path = Path(annotation_file)
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder {self.image_dir} does not exist")
        if not path.is_file():
            raise DataError(f"COCO annotation file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not JSON ({error}); expected a COCO instances file") from error
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DataError(f"{path} is not a COCO instances file: it needs 'images' and 'annotations' lists")
        by_image: dict[Any, list[dict]] = defaultdict(list)
        try:
            for annotation in data["annotations"]:
                by_image[annotation["image_id"]].append(annotation)
            # Only images with at least one non-crowd object can be scored (Jaccard and CorLoc need one).
            self.images = [image for image in data["images"]
                           if any(not a.get("iscrowd", 0) for a in by_image.get(image["id"], []))]
            self.names = [Path(image["file_name"]).stem for image in self.images]
        except (KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{path}: an entry lacks a COCO key ({error!r}); images need 'id' and "
                            "'file_name', annotations 'image_id' and 'bbox'") from error
        self.annotations = by_image
        self.skipped = len(data["images"]) - len(self.images)
        if not self.images:
            raise DataError(f"{path}: no image has a non-crowd annotation; nothing to score")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> MaskSample:
        info = self.images[index]
        image_path = self.image_dir / info["file_name"]
        if not image_path.is_file():
            raise DataError(f"{image_path} (file_name of image id {info['id']}) does not exist under "
                            f"{self.image_dir}; pass the folder the file names are relative to")
        image = open_rgb(image_path)
        width, height = image.size
        foreground = Image.new("1", (width, height))
        void = Image.new("1", (width, height))
        boxes = []
        for annotation in self.annotations[info["id"]]:
            where = f"annotation {annotation.get('id', '?')} of {info['file_name']}"
            box = _coco_box(annotation.get("bbox"), width, height, where)
            target = void if annotation.get("iscrowd", 0) else foreground
            polygons = annotation.get("segmentation")
            draw = ImageDraw.Draw(target)
            if isinstance(polygons, list) and polygons:  # polygons: [[x0, y0, x1, y1, ...], ...]
                for polygon in polygons:
                    draw.polygon([float(v) for v in polygon], fill=1, outline=1)
            else:  # no polygon (box-only data, or crowd RLE): the filled box
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=1)
            if not annotation.get("iscrowd", 0) and box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
        mask = torch.from_numpy(np.array(foreground, dtype=bool))
        void_mask = torch.from_numpy(np.array(void, dtype=bool)) & ~mask
        return MaskSample(name=self.names[index], image=image, mask=mask, void=void_mask,
                          boxes=torch.tensor(boxes, dtype=torch.int64).view(-1, 4))


def read_coco(image_dir: str | Path, annotation_file: str | Path) -> CocoDataset:
    """Open a COCO-style data set: ``image_dir`` holds the ``file_name`` of every entry of ``annotation_file``.

    Boxes come from ``bbox`` (``[x, y, w, h]``, widened to whole pixels); the mask is the union of the polygon
    ``segmentation`` of the non-crowd objects, or of their boxes where an annotation has no polygon; crowd
    annotations are void (ignored in scoring). Images without a non-crowd object are skipped
    (``dataset.skipped`` counts them).
    """
    return CocoDataset(image_dir, annotation_file)
