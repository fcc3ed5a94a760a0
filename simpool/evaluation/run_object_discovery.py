"""Object discovery (SimPool Table 6): CorLoc of LOST and DINO-seg on VOC07 / VOC12 ``trainval`` and COCO20k.

The data as distributed: PASCAL VOC (``--data_path VOCdevkit/VOC2007 --split trainval``: ``Annotations/*.xml``,
``ImageSets/Main/``, ``JPEGImages/``; :mod:`simpool.data.voc_boxes`) or COCO20k (``--data_path COCO/images/train2014
--annotations instances_train2014.json --image_list coco_20k_filenames.txt``, the list from valeoai/LOST;
:mod:`simpool.data.coco20k`). The protocol is :mod:`simpool.evaluation.object_discovery` (LOST's ``main_lost.py``):
full-resolution images, LOST on the last block's keys, DINO-seg on the model's attention maps, CorLoc at IoU 0.5.

Files in ``--output_dir``: ``object_discovery.json`` (the table's rows, CorLoc per method and map, data set sizes),
``object_discovery.rank<R>.jsonl`` (each image's boxes, so that a rerun skips finished images) and
``figures/`` (boxes on the first ``--figures`` images: ground truth green, LOST red, DINO-seg blue).

Usage::

    torchrun --nproc_per_node=4 -m simpool.evaluation.run_object_discovery \\
        --pretrained_weights runs/vits/checkpoint.pth --data_path /data/VOCdevkit/VOC2007 \\
        --output_dir runs/vits/discovery_voc07
    simpool-object-discovery --pretrained_weights exports/vit --data_path /data/COCO/images/train2014 \\
        --annotations /data/COCO/annotations/instances_train2014.json --image_list coco_20k_filenames.txt \\
        --output_dir runs/vit/discovery_coco20k
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from simpool.attention_maps import model_stride
from simpool.data.coco20k import read_coco20k
from simpool.data.every_item import every_item
from simpool.data.voc_boxes import read_voc_boxes
from simpool.distributed import is_main_process
from simpool.evaluation.box_figures import COLOURS, draw_boxes, figure_name
from simpool.evaluation.common import checked_frozen_model, write_json
from simpool.evaluation.object_discovery import corloc_summary, discover
from simpool.run import ItemResults, shard, weights_identity
from simpool.run.config import IMAGE_SIDE, WORKERS, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_distributed_flags, add_model_flags, require_weights
from simpool.run.process import data_errors_agreed, driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_object_discovery")
RESULTS_FILE = "object_discovery.json"

__all__ = ["check_applies", "get_args_parser", "load_discovery_data", "main", "run_object_discovery"]


def load_discovery_data(data_path: str, split: str = "trainval", year: str | None = None, no_hard: bool = False,
                        annotations: str | None = None, image_list: str | None = None):
    """COCO20k when ``annotations`` is given, else a VOC split (a ``DataError`` names the file and the fix)."""
    if annotations is not None:
        return read_coco20k(data_path, annotations, image_list)
    if image_list is not None:
        raise ConfigError("--image_list goes with --annotations (COCO20k); VOC's list is --split")
    return read_voc_boxes(data_path, split, year, no_hard)


def check_applies(model: torch.nn.Module, lost_source: str = "block", which: str = "k") -> None:
    """Official-mode convnets have neither an attention map (DINO-seg) nor patch keys (LOST); SimPool's own
    features need a SimPool model, and have no per-patch query."""
    simpool = getattr(model, "simpool", None)
    if not hasattr(model, "blocks") and simpool is None:
        raise ConfigError(f"{model.arch} in official mode pools by averaging: it has no attention map for DINO-seg "
                             "and no patch keys for LOST; evaluate a ViT or a SimPool model")
    if lost_source == "simpool" and (simpool is None or which == "q"):
        raise ConfigError("--lost_features simpool takes SimPool's keys (k) or values (v) of a SimPool model: use "
                             "--lost_features block, or --which_features k/v with --mode simpool weights")


def _first(batch: list) -> Any:
    return batch[0]


def run_object_discovery(
    model: torch.nn.Module,
    source: dict[str, Any],
    data,
    output_dir: str | Path,
    *,
    data_path: str = "",
    image_size: int | None = None,
    k_patches: int = 100,
    which: str = "k",
    lost_source: str = "block",
    keep: float = 0.6,
    figures: int = 4,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image of ``data`` (``data.names`` the image ids, items ``(name, PIL image, gt boxes (k, 4))``: a
    :func:`load_discovery_data` result), resuming from ``output_dir``; collective under torchrun. Returns (on every
    rank) the dict written to ``object_discovery.json`` by rank 0."""
    check_applies(model, lost_source, which)
    output_dir = Path(output_dir)
    protocol = {"image_size": image_size, "k_patches": k_patches, "which": which, "lost_source": lost_source,
                "keep": keep, "corloc_iou": 0.5}
    names = list(data.names)  # the items' ids
    identity = {**weights_identity(source), **protocol, "data_path": str(Path(data_path).resolve()) if data_path
                else "", "num_images": len(data), "images_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    items = ItemResults(output_dir, "object_discovery", identity).open()
    position = {name: i for i, name in enumerate(names)}
    mine = [position[name] for name in shard(items.todo(names))]
    patch_size = model_stride(model)
    loader = every_item(torch.utils.data.Subset(data, mine), batch_size=1, num_workers=num_workers,
                        collate_fn=_first)
    with data_errors_agreed():  # an unreadable image on one rank stops every rank before the gather
        for name, image, gt in tqdm(loader, total=len(mine), disable=not (progress and is_main_process()),
                                    desc="object discovery"):
            items.add(name, discover(model, image, patch_size, gt, image_size, k_patches, which, lost_source, keep))
    records = items.gather()
    summary = corloc_summary(records[name] for name in names)
    result = {"evaluator": "object_discovery", **source, "data_path": data_path, **protocol, **summary}
    if is_main_process():
        write_json(output_dir / RESULTS_FILE, result)
        _figures(data, names[:figures], records, output_dir / "figures")
    return result


def _figures(data, names: list[str], records: dict[str, dict], folder: Path) -> None:
    for index, name in enumerate(names):
        _, image, gt = data[index]
        boxes = records[name]["boxes"]
        dinoseg = boxes.get("dinoseg:map", boxes.get("dinoseg:head_mean"))
        groups = {"gt": (gt, COLOURS["gt"]), "DINO-seg": ([dinoseg], COLOURS["second"])}
        if "lost" in boxes:
            groups["LOST"] = ([boxes["lost"]], COLOURS["pred"])
        draw_boxes(image, groups, folder / figure_name(name))


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-object-discovery",
                        description="Object discovery: CorLoc of LOST and DINO-seg (SimPool Table 6)")
    add_model_flags(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", required=True, help="VOCdevkit/VOC2007 (or VOCdevkit, or the folder above it), "
                       "or with --annotations the COCO image folder (COCO/images/train2014)")
    group.add_argument("--split", default="trainval", help="VOC: the ImageSets/Main list (LOST: trainval)")
    group.add_argument("--year", default=None, help="VOC: 2007 or 2012 when --data_path holds both")
    group.add_argument("--no_hard", action="store_true",
                       help="VOC: drop difficult/truncated objects and images left without one (LOST's --no_hard)")
    group.add_argument("--annotations", default=None, help="COCO instances JSON (instances_train2014.json)")
    group.add_argument("--image_list", default=None, help="COCO20k file list (LOST's coco_20k_filenames.txt)")
    group.add_argument("--image_size", default=None, type=int,
                       help="resize the shorter side to this (default: full resolution, as LOST)")
    group.add_argument("--num_workers", default=4, type=int, help="image decoding workers per process")
    group = parser.add_argument_group("protocol")
    group.add_argument("--k_patches", default=100, type=int, help="LOST: lowest-degree patches in the expansion")
    group.add_argument("--which_features", default="k", choices=["k", "q", "v"], help="LOST: which of q/k/v")
    group.add_argument("--lost_features", default="block", choices=["block", "simpool"],
                       help="block: the last block's attention keys (LOST's definition; same feature for official "
                            "and SimPool ViTs); simpool: SimPool's W_K LN(x) (k) or LN(x) (v)")
    group.add_argument("--keep", default=0.6, type=float, help="DINO-seg: attention mass kept (0.6)")
    group.add_argument("--figures", default=4, type=int, help="draw the boxes on this many images")
    group.add_argument("--output_dir", required=True, help=f"{RESULTS_FILE}, per-image results and figures/")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_distributed_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    check_ranges(args, {"image_size": IMAGE_SIDE, "num_workers": WORKERS})
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image_size must be positive, got {args.image_size}")
    if args.k_patches < 1 or args.num_workers < 0 or args.figures < 0:
        raise ConfigError("--k_patches must be >= 1, --num_workers and --figures >= 0")
    if not 0.0 < args.keep <= 1.0:
        raise ConfigError(f"--keep must be a mass fraction in (0, 1], got {args.keep}")


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, with ``error: ...`` on stderr)."""
    args = get_args_parser().parse_args(argv)
    try:
        check_flags(args)
        data = load_discovery_data(args.data_path, args.split, args.year, args.no_hard, args.annotations,
                                   args.image_list)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    try:
        model, source, output = checked_frozen_model(args, dist_info.device)
        check_applies(model, args.lost_features, args.which_features)
        log.info("object discovery with %s (%s mode) from %s on %d images of %s", source.arch, source.mode,
                 source.weights or "random initialisation", len(data), args.data_path)
        output.claim()
        result = run_object_discovery(
            model, source.as_dict(), data, args.output_dir, data_path=args.data_path, image_size=args.image_size,
            k_patches=args.k_patches, which=args.which_features, lost_source=args.lost_features, keep=args.keep,
            figures=args.figures, num_workers=args.num_workers, progress=not args.no_progress)
    except ValueError as err:
        end_process()
        return bad_input(err)
    for row, value in result["rows"].items():
        log.info("CorLoc %-40s %6.2f", row, value)
    log.info("results written to %s", Path(args.output_dir) / RESULTS_FILE)
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
