"""Copy detection on Copydays: ``simpool-copy-detection`` (``python -m simpool.evaluation.run_copy_detection``).

DINO's ``eval_copy_detection.py`` on any backbone ``load_model`` reads (the protocol:
:mod:`simpool.evaluation.copy_detection`), with DINO's flags. Prints the mAP of every block ("strong" is the
headline) and writes ``OUTPUT_DIR/copy_detection.json``. Features are cached in ``OUTPUT_DIR/features``
(``--cache_dir``): reruns, and runs with other whitening or distractor folders, embed only what is new.

Usage::

    simpool-copy-detection --pretrained_weights runs/vitb8/checkpoint.pth --data_path /data/copydays \\
        --whitening_path /data/yfcc_20k --distractors_path /data/yfcc_10k --output_dir runs/vitb8/copydays
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from simpool.data.copydays import list_images, read_copydays
from simpool.evaluation.common import add_data_flags, checked_frozen_model, parse_flags, write_json
from simpool.evaluation.copy_detection import run_copy_detection
from simpool.evaluation.feature_cache import model_identity
from simpool.run.config import ConfigError, FlagParser, bad_input
from simpool.run.flags import add_distributed_flags, add_model_flags, bool_flag, require_weights
from simpool.run.process import driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_copy_detection")
RESULTS_FILE = "copy_detection.json"


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-copy-detection", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    add_data_flags(parser, batch_size=16)
    parser.set_defaults(image_size=320, num_workers=4)
    parser.add_argument("--imsize", dest="image_size", type=int, default=argparse.SUPPRESS,
                        help="DINO's name of --image_size: the square side images are resized to (default 320)")
    group = parser.add_argument_group("protocol")
    group.add_argument("--whitening_path", default=None,
                       help="folder of images to learn the PCA whitening on (DINO: 20k YFCC100M images); "
                       "without it the features are not whitened")
    group.add_argument("--distractors_path", default=None,
                       help="folder of images added to the database (DINO: 10k YFCC100M images)")
    group.add_argument("--gem_p", default=4.0, type=float, help="GeM exponent of the pooled patch tokens")
    group.add_argument("--whitening_power", default=0.5, type=float, help="eigenvalue power of the whitening")
    group.add_argument("--topk", default=20, type=int, help="results scored per query")
    group.add_argument("--use_cuda", default=True, type=bool_flag, help="False: run on the CPU even with a GPU")
    group.add_argument("--output_dir", default=".", help=f"{RESULTS_FILE} and the feature cache go here")
    group.add_argument("--cache_dir", default=None, help="feature cache (default: OUTPUT_DIR/features)")
    add_distributed_flags(parser)
    return parser


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, found before any model is built)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        require_weights(args)
        if not args.data_path:
            raise ConfigError("--data_path is required: the Copydays folder holding original/ and strong/")
        if args.gem_p <= 0 or args.topk < 1 or args.whitening_power < 0:
            raise ConfigError("--gem_p must be > 0, --topk >= 1 and --whitening_power >= 0")
        copydays = read_copydays(args.data_path)
        for flag, path in (("--whitening_path", args.whitening_path), ("--distractors_path", args.distractors_path)):
            if path:
                list_images(path, flag)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    device = dist_info.device if args.use_cuda else torch.device("cpu")
    try:
        model, source, output = checked_frozen_model(args, device, cache_dir=args.cache_dir)
    except ValueError as err:
        end_process()
        return bad_input(err)
    output_dir = output.claim()
    log.info("copy detection on %s (%d blocks) with %s (%s mode) from %s", copydays.root, len(copydays.blocks),
             source.arch, source.mode, source.weights or "random initialisation")
    result = run_copy_detection(model, copydays, args.cache_dir or output_dir / "features",
                                model_identity(model, source.as_dict(), getattr(args, "seed", 0)),
                                distractors_path=args.distractors_path, whitening_path=args.whitening_path,
                                imsize=args.image_size, gem_p=args.gem_p, whitening_power=args.whitening_power,
                                topk=args.topk, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                                device=device)
    for block, value in result["map"].items():
        log.info("eval on %s mAP=%.3f", block, value)
    write_json(output_dir / RESULTS_FILE, {**result, **source.as_dict(), "data_path": str(args.data_path),
                                           "whitening_path": args.whitening_path,
                                           "distractors_path": args.distractors_path})
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
