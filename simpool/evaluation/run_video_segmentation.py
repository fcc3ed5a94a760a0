"""Video object segmentation on DAVIS 2017: ``simpool-video-segmentation``
(``python -m simpool.evaluation.run_video_segmentation``).

DINO's ``eval_video_segmentation.py`` on any backbone ``load_model`` reads (the protocol:
:mod:`simpool.evaluation.video_segmentation`), with DINO's flags. Writes ``OUTPUT_DIR/<video>/<frame>.png``
(indexed PNGs in the DAVIS palette, frame 0 the given annotation, as DINO writes them) and, where every frame is
annotated (train, val), scores them (J, F, J&F: :mod:`simpool.evaluation.davis_metrics`) into
``OUTPUT_DIR/video_segmentation.json``. Videos are shared out over torchrun ranks; a rerun skips the videos already
done (``OUTPUT_DIR/davis.rank<R>.jsonl``).

Usage::

    simpool-video-segmentation --pretrained_weights runs/vits/checkpoint.pth --data_path /data/DAVIS \\
        --output_dir runs/vits/davis
    torchrun --nproc_per_node=4 -m simpool.evaluation.run_video_segmentation --pretrained_weights exports/vits \\
        --data_path /data/DAVIS --output_dir runs/vits/davis
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from simpool.data.davis import read_davis
from simpool.evaluation.common import checked_frozen_model, write_json
from simpool.evaluation.feature_cache import model_identity
from simpool.evaluation.video_segmentation import FORMAT, run_video_segmentation
from simpool.run import ItemResults
from simpool.run.config import ConfigError, FlagParser, bad_input
from simpool.run.flags import add_distributed_flags, add_model_flags, bool_flag, require_weights
from simpool.run.process import driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_video_segmentation")
RESULTS_FILE = "video_segmentation.json"


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-video-segmentation", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None, help="DAVIS folder: JPEGImages/480p, Annotations/480p, ImageSets")
    group.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt lists the videos")
    group.add_argument("--videos", default=None, nargs="+", help="segment only these videos")
    group.add_argument("--short_side", default=480, type=int,
                       help="frames' short side after resizing (the long side: a multiple of 64)")
    group.add_argument("--bs", "--batch_size_per_gpu", dest="batch_size", default=6, type=int,
                       help="frames embedded together (memory, not results)")
    group = parser.add_argument_group("protocol")
    group.add_argument("--n_last_frames", default=7, type=int, help="previous frames propagated from")
    group.add_argument("--size_mask_neighborhood", default=12, type=int,
                       help="source patches within this many rows/columns of the target (0: all)")
    group.add_argument("--topk", default=5, type=int, help="sources kept per target patch")
    group.add_argument("--temperature", default=0.1, type=float, help="affinity exp(similarity / temperature)")
    group.add_argument("--chunk", default=1024, type=int, help="target patches per affinity block (memory)")
    group.add_argument("--use_cuda", default=True, type=bool_flag, help="False: run on the CPU even with a GPU")
    group.add_argument("--output_dir", default=".", help="one folder of PNGs per video, and the scores")
    add_distributed_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    require_weights(args)
    if not args.data_path:
        raise ConfigError("--data_path is required: the DAVIS folder holding JPEGImages/480p and Annotations/480p")
    for name in ("short_side", "batch_size", "topk", "chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.n_last_frames < 0 or args.size_mask_neighborhood < 0 or args.temperature <= 0:
        raise ConfigError("--n_last_frames and --size_mask_neighborhood must be >= 0, --temperature > 0")


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the segmentations depend on (recorded with the results: a rerun must not change them)."""
    names = ("short_side", "n_last_frames", "size_mask_neighborhood", "topk", "temperature")
    return {name: getattr(args, name) for name in names}


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, found before any model is built)."""
    try:
        args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
        check_flags(args)
        videos = read_davis(args.data_path, args.split, videos=args.videos)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    device = dist_info.device if args.use_cuda else torch.device("cpu")
    output_dir = Path(args.output_dir)
    try:
        model, source, output = checked_frozen_model(args, device)
        identity = {"format": FORMAT, **model_identity(model, source.as_dict(), getattr(args, "seed", 0)),
                    "data_path": str(Path(args.data_path).resolve()), **protocol(args)}
        ItemResults(output_dir, "davis", identity).check()
    except ValueError as err:
        end_process()
        return bad_input(err)
    output.claim()
    log.info("video segmentation of %d videos with %s (%s mode) from %s", len(videos), source.arch, source.mode,
             source.weights or "random initialisation")
    result = run_video_segmentation(model, videos, output_dir, identity, batch_size=args.batch_size, chunk=args.chunk,
                                    device=device, **protocol(args))
    if "J&F-Mean" in result:
        log.info("J&F-Mean %.3f  J-Mean %.3f  J-Recall %.3f  J-Decay %.3f  F-Mean %.3f  F-Recall %.3f  F-Decay %.3f",
                 *(result[k] for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
                                       "F-Decay")))
    write_json(output_dir / RESULTS_FILE, {**result, **source.as_dict(), "data_path": str(args.data_path)})
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
