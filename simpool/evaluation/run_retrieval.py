"""Image retrieval on revisited Oxford / Paris: ``simpool-retrieval`` (``python -m simpool.evaluation.run_retrieval``).

DINO's ``eval_image_retrieval.py`` on any backbone ``load_model`` reads (the protocol:
:mod:`simpool.evaluation.retrieval`); it takes DINO's flags (``--imsize``, ``--multiscale``, ``--use_cuda``, ...).
Prints and writes ``OUTPUT_DIR/retrieval_<dataset>.json``: mAP and mP@1/5/10 in the Easy, Medium and Hard setups
(fractions). Features are cached in ``OUTPUT_DIR/features`` (``--cache_dir``): a rerun embeds nothing again, and a
``--multiscale True`` run after a single-scale one embeds only the two new scales.

Usage::

    simpool-retrieval --pretrained_weights runs/vits/checkpoint.pth --data_path /data/revisitop \\
        --dataset roxford5k --imsize 224 --multiscale False --output_dir runs/vits/retrieval
    torchrun --nproc_per_node=4 -m simpool.evaluation.run_retrieval --pretrained_weights exports/vits \\
        --data_path /data/revisitop --dataset rparis6k --distractors_path /data/revisitop/revisitop1m
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from simpool.data.revisitop import DATASETS, read_distractors, read_revisited
from simpool.evaluation.common import add_data_flags, checked_frozen_model, parse_flags, write_json
from simpool.evaluation.feature_cache import model_identity
from simpool.evaluation.retrieval import run_retrieval
from simpool.run.config import ConfigError, FlagParser, bad_input
from simpool.run.flags import add_distributed_flags, add_model_flags, bool_flag, require_weights
from simpool.run.process import driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_retrieval")

RESULTS_FILE = "retrieval_{dataset}.json"  # one per data set, so both can share an --output_dir


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-retrieval", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    add_data_flags(parser, batch_size=32)
    parser.set_defaults(num_workers=4)
    parser.add_argument("--imsize", dest="image_size", type=int, default=argparse.SUPPRESS,
                        help="DINO's name of --image_size: the long side images are shrunk to (default 224)")
    group = parser.add_argument_group("protocol")
    group.add_argument("--dataset", default="roxford5k", choices=DATASETS)
    group.add_argument("--multiscale", default=False, type=bool_flag, help="mean of the features at 1, 1/sqrt(2), 1/2")
    group.add_argument("--crop_queries", default=False, type=bool_flag,
                       help="crop queries to their bbx (revisitop's standard; DINO embeds them whole)")
    group.add_argument("--distractors_path", default=None,
                       help="revisitop1m folder (revisitop1m.txt + jpg/) or a folder of images added to the database")
    group.add_argument("--use_cuda", default=True, type=bool_flag, help="False: run on the CPU even with a GPU")
    group.add_argument("--output_dir", default=".", help="results JSON and the feature cache go here")
    group.add_argument("--cache_dir", default=None, help="feature cache (default: OUTPUT_DIR/features)")
    add_distributed_flags(parser)
    return parser


def format_scores(result: dict[str, Any]) -> str:
    """DINO's two lines, with the Easy setup added."""
    setups = ("easy", "medium", "hard")
    maps = ", ".join(f"{s[0].upper()}: {100 * result[s]['map']:.2f}" for s in setups)
    kappas = list(result["medium"]["mp_at_k"])
    mpk = ", ".join(f"{s[0].upper()}: {[round(100 * v, 2) for v in result[s]['mp_at_k'].values()]}" for s in setups)
    return f">> {result['dataset']}: mAP {maps}\n>> {result['dataset']}: mP@k{kappas} {mpk}"


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data or weights, found before any model is built)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        require_weights(args)
        if not args.data_path:
            raise ConfigError("--data_path is required: the folder holding roxford5k/ and rparis6k/")
        data = read_revisited(args.data_path, args.dataset)
        if args.crop_queries and any(entry["bbx"] is None for entry in data.gnd):
            raise ConfigError(f"--crop_queries: gnd_{args.dataset}.pkl has queries without a bbx")
        distractors = read_distractors(args.distractors_path) if args.distractors_path else []
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
    log.info("retrieval on %s (%d queries, %d database images + %d distractors) with %s (%s mode) from %s",
             data.name, len(data.qimlist), len(data.imlist), len(distractors), source.arch, source.mode,
             source.weights or "random initialisation")
    result = run_retrieval(model, data, args.cache_dir or output_dir / "features",
                           model_identity(model, source.as_dict(), getattr(args, "seed", 0)),
                           imsize=args.image_size, multiscale=args.multiscale, crop_queries=args.crop_queries,
                           distractors=distractors, batch_size=args.batch_size_per_gpu,
                           num_workers=args.num_workers, device=device)
    log.info("%s", format_scores(result))
    write_json(output_dir / RESULTS_FILE.format(dataset=data.name),
               {**result, **source.as_dict(), "data_path": str(args.data_path)})
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
