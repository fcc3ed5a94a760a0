"""``python -m simpool.evaluation.run_attention`` / ``simpool-attention``: attention-map quality of a frozen
backbone (Jaccard with object masks, CorLoc) on VOC-style folders, COCO-style JSON, or fashion-on-photos.

The scores and which map each model gives: :mod:`simpool.evaluation.attention`. Results are printed and written
to ``attention.json`` beside the weights (or ``--output``).

Usage::

    python -m simpool.evaluation.run_attention --pretrained_weights runs/vit/checkpoint.pth \
        --data_path /data/VOC2012 --image_size 224 --output attention.json
    python -m simpool.evaluation.run_attention --pretrained_weights runs/vit/checkpoint.pth \
        --data_path /data/coco/val2017 --annotations /data/coco/annotations/instances_val2017.json
    python -m simpool.evaluation.run_attention --pretrained_weights exports/vit --data_path fashion-on-photos:200 \
        --image_size 96
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from simpool.evaluation.attention_scores import (
    DEFAULT_FASHION_IMAGES,
    FASHION_ON_PHOTOS,
    evaluate_attention,
    format_table,
    load_mask_samples,
)
from simpool.evaluation.common import build_model, results_folder, write_json
from simpool.run.config import AT_LEAST_ONE, IMAGE_SIDE, ConfigError, FlagParser, Range, bad_input, check_ranges
from simpool.run.flags import add_distributed_flags, add_model_flags, backbone_parameters, require_weights
from simpool.run.output import OutputFolder
from simpool.run.process import driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_attention")  # not __name__: "__main__" under python -m

RESULTS_FILE = "attention.json"


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-attention", description="Attention-map quality: Jaccard with object masks and CorLoc")
    add_model_flags(parser)
    group = parser.add_argument_group("data and scoring")
    group.add_argument("--data_path", default=None, type=str,
                       help=f"VOC-style folder (JPEGImages/ + SegmentationObject/ PNG masks), a folder of images "
                            f"with --annotations (COCO JSON), or {FASHION_ON_PHOTOS}[:N] (N generated test images, "
                            f"default {DEFAULT_FASHION_IMAGES})")
    group.add_argument("--annotations", default=None, type=str,
                       help="COCO-style instances JSON for the images in --data_path (boxes; polygons when "
                            "present): CorLoc against the boxes, Jaccard against polygons or filled boxes")
    group.add_argument("--image_size", default=224, type=int,
                       help="shorter image side fed to the model (rounded to the patch size); fashion-on-photos "
                            "images are rendered at this size")
    group.add_argument("--keep", default=0.6, type=float, help="attention mass kept by the mask (DINO: 0.6)")
    group.add_argument("--batch_size", default=32, type=int, help="images per forward pass (same-size images)")
    group.add_argument("--output", default=None, type=str,
                       help=f"JSON file for the results (default: {RESULTS_FILE} beside --pretrained_weights)")
    add_distributed_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    if not args.data_path:
        raise ConfigError(f"--data_path is required: a VOC-style folder or {FASHION_ON_PHOTOS}[:N]")
    check_ranges(args, {"image_size": IMAGE_SIDE, "batch_size": AT_LEAST_ONE, "keep": Range(0, 1, low_open=True)})


def output_path(args: argparse.Namespace) -> Path | None:
    if args.output:
        return Path(args.output)
    if args.pretrained_weights:
        return results_folder(args.pretrained_weights) / RESULTS_FILE
    return None  # --random_init without --output: nothing to write beside


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, with ``error: ...`` on stderr)."""
    args = get_args_parser().parse_args(argv)
    try:
        check_flags(args)
        samples = load_mask_samples(args.data_path, args.image_size, annotations=args.annotations)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    try:
        path = output_path(args)
        if path is not None:  # one file, written whole: its folder is checked, not locked
            where = "--output" if args.output else f"{RESULTS_FILE} goes beside the weights, in"
            OutputFolder(path.parent, flag=where, fix="pass another --output").check(lock=False)
        backbone_parameters(args)  # the model's values, before its weights are read
        model, source = build_model(args, dist_info.device)
        log.info("scoring the attention maps of %s (%s mode) from %s on %d images of %s", source.arch, source.mode,
                 source.weights or "random initialisation", len(samples), args.data_path)
        result = evaluate_attention(model, samples, args.image_size, args.keep, args.batch_size)
    except ValueError as err:  # DataError, CheckpointError and ConfigError are ValueErrors
        end_process()
        return bad_input(err)
    if dist_info.is_main:
        log.info(format_table(result["rows"], args.keep))
    if path is not None:
        payload = {**source.as_dict(), "data_path": args.data_path, "image_size": args.image_size,
                   "map": "simpool attention a" if source.mode == "simpool" else "[CLS] self-attention",
                   **result}
        write_json(path, payload)
        log.info(f"results written to {path}")
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
