"""Localisation (SimPool Table 5): MaxBoxAccV2 of a frozen backbone's attention maps on CUB-200-2011 / ImageNet val.

The data as clovaai/wsolevaluation distributes it: ``--data_path`` the image root, ``--metadata`` a split folder
of its metadata (``metadata/CUB/test``, ``metadata/ILSVRC/test``; :mod:`simpool.data.wsol`). The protocol is
:mod:`simpool.evaluation.localization`: images resized to 224 x 224, the map resized bicubically and min-max
normalised, boxes around every contour at each threshold of ``arange(0, 1, 0.01)``, MaxBoxAcc at IoU 30/50/70 and
their mean. Maps: SimPool's ``a``; for official ViTs the last block's [CLS] attention of every head and their mean
(the table gives the head-mean map and the best head). Official convnets have no attention map (the protocol would
need CAM, which is out of scope): they are refused.

Files in ``--output_dir``: ``localization.json`` (the table's rows, MaxBoxAcc per IoU threshold and map, the best
threshold, data set size), ``localization.rank<R>.jsonl`` (each image's correctness per threshold, so that a rerun
skips finished images) and ``figures/`` (the first ``--figures`` images at 224 x 224: ground truth green, the box
of the best threshold at IoU 50 red).

Usage::

    simpool-localization --pretrained_weights runs/vits/checkpoint.pth --data_path /data/CUB_200_2011/images \\
        --metadata wsolevaluation/metadata/CUB/test --output_dir runs/vits/loc_cub
    torchrun --nproc_per_node=4 -m simpool.evaluation.run_localization --pretrained_weights runs/vits/checkpoint.pth \\
        --data_path /data/imagenet --metadata wsolevaluation/metadata/ILSVRC/test --output_dir runs/vits/loc_in1k
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from simpool.attention_maps import attention_maps, model_stride
from simpool.data.every_item import every_item
from simpool.data.wsol import WsolData, read_wsol
from simpool.distributed import is_main_process
from simpool.evaluation.box_figures import COLOURS, draw_boxes, figure_name
from simpool.evaluation.common import checked_frozen_model, write_json
from simpool.evaluation.localization import (
    IOU_THRESHOLDS,
    cam_thresholds,
    contour_boxes,
    correct_at_thresholds,
    max_box_acc,
    normalize_scoremap,
    quantize_scoremap,
    resize_boxes,
    resize_scoremap,
    wsol_box_iou,
)
from simpool.evaluation.object_discovery import map_names
from simpool.run import ItemResults, shard, weights_identity
from simpool.run.config import IMAGE_SIDE, WORKERS, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_distributed_flags, add_model_flags, require_weights
from simpool.run.process import data_errors_agreed, driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_localization")
RESULTS_FILE = "localization.json"

__all__ = ["WsolImages", "check_applies", "get_args_parser", "main", "run_localization", "summary"]


class WsolImages(Dataset):
    """(normalised S x S tensor, index) of the images of ``data`` listed in ``indices`` (wsolevaluation's test
    transform: ``Resize((S, S))``, bilinear)."""

    def __init__(self, data: WsolData, indices: Sequence[int], size: int) -> None:
        self.data, self.indices = data, list(indices)
        self.transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        _, image, _ = self.data[self.indices[i]]
        return self.transform(image), self.indices[i]


def check_applies(model: torch.nn.Module, image_size: int) -> None:
    if not hasattr(model, "blocks") and getattr(model, "simpool", None) is None:
        raise ConfigError(f"{model.arch} in official mode pools by averaging and has no attention map; "
                             "MaxBoxAccV2 would need CAM, which this tool does not compute: evaluate a ViT or a "
                             "SimPool model")
    stride = model_stride(model)
    if hasattr(model, "blocks") and image_size % stride:
        raise ConfigError(f"--image_size {image_size} is not a multiple of the patch size {stride}")


def _with_head_mean(maps: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) -> (B, maps, h, w): the heads and their mean when there are several."""
    return torch.cat([maps, maps.mean(dim=1, keepdim=True)], dim=1) if maps.shape[1] > 1 else maps


def _quantized(grid_map: torch.Tensor, size: int) -> np.ndarray:
    return quantize_scoremap(normalize_scoremap(resize_scoremap(grid_map, (size, size))))


def _pack(correct: np.ndarray) -> list[str]:
    return [np.packbits(row).tobytes().hex() for row in correct]


def _unpack(rows: list[str], count: int) -> np.ndarray:
    return np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8))[:count] for h in rows]).astype(bool)


def summary(records: Sequence[dict[str, Any]], num_thresholds: int, iou_thresholds: Sequence[int]) -> dict[str, Any]:
    """MaxBoxAcc per map over per-image records, and the table's rows (the map; or head-mean and best head)."""
    names = list(records[0]["correct"])
    per_map = {name: max_box_acc(np.stack([_unpack(r["correct"][name], num_thresholds) for r in records]),
                                 iou_thresholds) for name in names}
    if names == ["map"]:
        rows = {"map": per_map["map"]["max_box_acc_v2"]}
    else:
        heads = [n for n in names if n != "head_mean"]
        best = max(heads, key=lambda h: (per_map[h]["max_box_acc_v2"], -int(h[4:])))
        rows = {"head-mean map": per_map["head_mean"]["max_box_acc_v2"],
                f"best head ({best[4:]})": per_map[best]["max_box_acc_v2"]}
    return {"num_images": len(records), "per_map": per_map, "rows": rows}


def run_localization(
    model: torch.nn.Module,
    source: dict[str, Any],
    data: WsolData,
    output_dir: str | Path,
    *,
    image_size: int = 224,
    interval: float = 0.01,
    iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
    batch_size: int = 32,
    num_workers: int = 0,
    figures: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """MaxBoxAccV2 over every image of ``data``, resuming from ``output_dir``; collective under torchrun. Returns
    (on every rank) the dict that rank 0 writes to ``localization.json``."""
    check_applies(model, image_size)
    output_dir = Path(output_dir)
    thresholds = cam_thresholds(interval)
    protocol = {"image_size": image_size, "cam_curve_interval": interval, "iou_thresholds": list(iou_thresholds)}
    identity = {**weights_identity(source), **protocol, "data_path": str(data.image_root.resolve()),
                "metadata": str(data.metadata.resolve()), "num_images": len(data),
                "images_sha1": hashlib.sha1("\n".join(data.image_ids).encode()).hexdigest()}
    items = ItemResults(output_dir, "localization", identity).open()
    position = {image_id: i for i, image_id in enumerate(data.image_ids)}
    mine = [position[i] for i in shard(items.todo(data.image_ids))]
    loader = every_item(WsolImages(data, mine, image_size), batch_size=batch_size, num_workers=num_workers)
    with data_errors_agreed():  # an unreadable image on one rank stops every rank before the gather
        with tqdm(total=len(mine), disable=not (progress and is_main_process()), desc="localization") as bar:
            for images, indices in loader:
                maps = _with_head_mean(attention_maps(model, images))
                names = map_names(maps.shape[1] - (maps.shape[1] > 1))
                for grid_maps, index in zip(maps, indices.tolist(), strict=True):
                    image_id = data.image_ids[index]
                    gt = resize_boxes(data.boxes[image_id], data.sizes[image_id], (image_size, image_size))
                    correct = {name: _pack(correct_at_thresholds(_quantized(m, image_size), gt, thresholds,
                                                                 iou_thresholds))
                               for name, m in zip(names, grid_maps, strict=True)}
                    items.add(image_id, {"correct": correct})
                bar.update(len(indices))
    records = items.gather()
    result = {"evaluator": "localization", **source, "data_path": str(data.image_root),
              "metadata": str(data.metadata), **protocol,
              **summary([records[i] for i in data.image_ids], len(thresholds), iou_thresholds)}
    if is_main_process():
        write_json(output_dir / RESULTS_FILE, result)
        _figures(model, data, result, thresholds, image_size, figures, output_dir / "figures")
    return result


def _figures(model, data: WsolData, result: dict, thresholds: np.ndarray, size: int, count: int, folder: Path) -> None:
    primary = "map" if "map" in result["per_map"] else "head_mean"
    index = result["per_map"][primary]["best_threshold_index"].get("50")
    if index is None or not count:
        return
    dataset = WsolImages(data, range(min(count, len(data))), size)
    for i in range(len(dataset)):
        tensor, _ = dataset[i]
        image_id = data.image_ids[i]
        maps = _with_head_mean(attention_maps(model, tensor[None]))[0]
        quantized = _quantized(maps[-1], size)
        gt = resize_boxes(data.boxes[image_id], data.sizes[image_id], (size, size))
        boxes = contour_boxes(quantized > int(thresholds[index] * int(quantized.max())))
        best = boxes[wsol_box_iou(boxes, gt).max(axis=1).argmax()]
        _, image, _ = data[i]
        # wsolevaluation's boxes count their last pixel: x1 + 1 is the edge drawn.
        draw_boxes(image.resize((size, size), Image.BILINEAR),
                   {"gt": (gt + [0, 0, 1, 1], COLOURS["gt"]), primary: ([best + [0, 0, 1, 1]], COLOURS["pred"])},
                   folder / figure_name(image_id))


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-localization",
                        description="Localisation: MaxBoxAccV2 of attention maps (SimPool Table 5)")
    add_model_flags(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", required=True, help="image root of the metadata's ids (CUB_200_2011/images; "
                       "for ImageNet the folder holding val/)")
    group.add_argument("--metadata", required=True, help="wsolevaluation split folder with image_ids.txt, "
                       "class_labels.txt, image_sizes.txt, localization.txt (e.g. metadata/CUB/test)")
    group.add_argument("--image_size", default=224, type=int, help="images are resized to this square (224)")
    group.add_argument("--batch_size_per_gpu", default=32, type=int, help="images per forward pass")
    group.add_argument("--num_workers", default=4, type=int, help="image decoding workers per process")
    group = parser.add_argument_group("protocol")
    group.add_argument("--cam_curve_interval", default=0.01, type=float, help="score-map threshold step (0.01)")
    group.add_argument("--iou_threshold_list", default=list(IOU_THRESHOLDS), type=int, nargs="+",
                       help="IoU thresholds in percent (30 50 70)")
    group.add_argument("--figures", default=4, type=int, help="draw the boxes on this many images")
    group.add_argument("--output_dir", required=True, help=f"{RESULTS_FILE}, per-image results and figures/")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_distributed_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    check_ranges(args, {"image_size": IMAGE_SIDE, "num_workers": WORKERS})
    if args.image_size < 1 or args.batch_size_per_gpu < 1 or args.num_workers < 0 or args.figures < 0:
        raise ConfigError("--image_size and --batch_size_per_gpu must be positive, --num_workers and --figures "
                             ">= 0")
    if not 0.0 < args.cam_curve_interval < 1.0:
        raise ConfigError(f"--cam_curve_interval must be in (0, 1), got {args.cam_curve_interval}")
    if any(not 0 < t <= 100 for t in args.iou_threshold_list):
        raise ConfigError(f"--iou_threshold_list takes percents in (0, 100], got {args.iou_threshold_list}")


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, with ``error: ...`` on stderr)."""
    args = get_args_parser().parse_args(argv)
    try:
        check_flags(args)
        data = read_wsol(args.data_path, args.metadata)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    try:
        model, source, output = checked_frozen_model(args, dist_info.device)
        check_applies(model, args.image_size)
        log.info("MaxBoxAccV2 of %s (%s mode) from %s on %d images of %s", source.arch, source.mode,
                 source.weights or "random initialisation", len(data), args.metadata)
        output.claim()
        result = run_localization(
            model, source.as_dict(), data, args.output_dir, image_size=args.image_size,
            interval=args.cam_curve_interval, iou_thresholds=args.iou_threshold_list,
            batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, figures=args.figures,
            progress=not args.no_progress)
    except ValueError as err:
        end_process()
        return bad_input(err)
    for row, value in result["rows"].items():
        log.info("MaxBoxAccV2 %-20s %6.2f", row, value)
    log.info("results written to %s", Path(args.output_dir) / RESULTS_FILE)
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
