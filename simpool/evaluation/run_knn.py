"""Weighted k-NN evaluation of a frozen backbone (DINO's ``eval_knn.py``), behind ``eval_knn.py``.

Protocol: embed ``train/`` and ``val/`` with the evaluation transform (resize to 256/224 of ``--image_size``,
centre crop), take the backbone's output (the SimPool vector, or the [CLS] token in official mode),
L2-normalise it, and classify every val image by the temperature-weighted vote of its ``k`` nearest train
images (formula in :mod:`simpool.evaluation.knn`). One search serves every ``--nb_knn``.

Results are printed as a table and written to ``knn.json`` beside the weights (the export folder, or the
checkpoint's folder), or into ``--output_dir`` when given.

Usage::

    torchrun --nproc_per_node=4 eval_knn.py --pretrained_weights runs/vits/checkpoint.pth \
        --data_path /imagenet
    python -m simpool.evaluation.run_knn --random_init --arch vit_small --data_path fashion-mnist

``--dump_features DIR`` saves ``DIR/train.pth`` and ``DIR/val.pth`` ({"features", "labels"}, normalised);
``--load_features DIR`` reads them back and runs the k-NN without a model or images.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from simpool.distributed import is_main_process
from simpool.evaluation.common import (
    add_data_flags,
    build_model,
    labelled_splits,
    parse_flags,
    results_folder,
    write_json,
)
from simpool.evaluation.features import eval_transform, extract_features, load_features, save_features
from simpool.evaluation.knn import knn_on_features
from simpool.run.config import AT_LEAST_ONE, TEMPERATURE, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_distributed_flags, add_model_flags, backbone_parameters, bool_flag, require_weights
from simpool.run.model_check import check_image_size
from simpool.run.output import OutputFolder, float32_bytes
from simpool.run.process import driver, end_process, start_process

log = logging.getLogger(__name__)

RESULTS_FILE = "knn.json"
SPLIT_FILES = {"train": "train.pth", "val": "val.pth"}


def get_args_parser() -> FlagParser:
    parser = FlagParser("eval_knn.py", description="Weighted k-NN evaluation on frozen features (DINO protocol)")
    add_model_flags(parser)
    add_data_flags(parser, batch_size=128)
    group = parser.add_argument_group("k-NN")
    group.add_argument(
        "--nb_knn",
        default=[10, 20, 100, 200],
        nargs="+",
        type=int,
        help="numbers of neighbours (all served by one search)",
    )
    group.add_argument("--temperature", default=0.07, type=float, help="temperature T of the exp(s / T) vote")
    group.add_argument(
        "--use_cuda",
        default=True,
        type=bool_flag,
        help="search on the GPU when the features are there (False: faiss on the CPU)",
    )
    group.add_argument(
        "--dump_features",
        default=None,
        help="save the normalised train/val features and labels into this folder",
    )
    group.add_argument(
        "--load_features",
        default=None,
        help="read features saved by --dump_features from this folder and skip the model",
    )
    group.add_argument(
        "--output_dir", default=None, help=f"folder for {RESULTS_FILE} (default: beside --pretrained_weights)"
    )
    add_distributed_flags(parser)
    return parser


def check_knn_flags(args: argparse.Namespace) -> None:
    check_ranges(args, {"nb_knn": AT_LEAST_ONE, "temperature": TEMPERATURE})
    if args.load_features:
        folder = Path(args.load_features)
        missing = [str(folder / name) for name in SPLIT_FILES.values() if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"--load_features: {', '.join(missing)} not found (write them with --dump_features)"
            )
    else:
        require_weights(args)


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------
def read_dumped_features(folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: load_features(Path(folder) / file) for name, file in SPLIT_FILES.items()}


def dump_features(folder: str, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    if is_main_process():
        for name, file in SPLIT_FILES.items():
            save_features(Path(folder) / file, *splits[name])
        log.info("features saved in %s", folder)


# ----------------------------------------------------------------------------------------------------------
# k-NN and report
# ----------------------------------------------------------------------------------------------------------
def format_table(results: dict[int, tuple[float, float]], temperature: float) -> str:
    lines = [f"weighted k-NN, T = {temperature}", f"{'k':>6} {'top-1':>8} {'top-5':>8}"]
    lines += [f"{k:>6} {top1:>8.2f} {top5:>8.2f}" for k, (top1, top5) in results.items()]
    return "\n".join(lines)


def run_knn(args: argparse.Namespace, splits: dict[str, tuple], device: torch.device) -> dict[int, tuple]:
    """{k: (top1, top5)} for every usable --nb_knn from one search; on the GPU with --use_cuda and a GPU."""
    if not (args.use_cuda and device.type == "cuda"):
        device = torch.device("cpu")  # faiss' BLAS search
    return knn_on_features(splits["train"], splits["val"], args.nb_knn, args.temperature, device)


def results_path(args: argparse.Namespace) -> Path | None:
    if args.output_dir:
        return Path(args.output_dir) / RESULTS_FILE
    if args.pretrained_weights:
        return results_folder(args.pretrained_weights) / RESULTS_FILE
    if args.load_features:
        return Path(args.load_features) / RESULTS_FILE
    return None  # --random_init without --output_dir: no weights to write beside


def report(
    args: argparse.Namespace, splits: dict[str, tuple], results: dict[int, tuple], info: dict[str, Any]
) -> None:
    log.info(format_table(results, args.temperature))
    path = results_path(args)
    if path is None:
        return
    write_json(
        path,
        {
            **info,
            "temperature": args.temperature,
            "num_train": int(splits["train"][0].shape[0]),
            "num_val": int(splits["val"][0].shape[0]),
            "results": {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in results.items()},
        },
    )
    log.info("results written to %s", path)


def check_results_folder(args: argparse.Namespace) -> OutputFolder | None:
    """Collective: where ``knn.json`` goes, checked before any feature is extracted (an explicit ``--output_dir`` is
    also locked: one run per folder); beside the weights it is only checked to be writable (a training run may be
    using that folder). Returns the folder to claim before writing, if any."""
    if args.output_dir:
        return OutputFolder(args.output_dir).check()
    path = results_path(args)
    if path is not None:
        OutputFolder(path.parent, flag=f"{RESULTS_FILE} goes beside the weights, in", fix="pass --output_dir").check(
            lock=False)
    return None


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point of eval_knn.py; returns the exit code (2: bad input, reported before any extraction)."""
    try:
        args = parse_flags(get_args_parser(), argv)
        check_knn_flags(args)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    dump = None
    try:
        output = check_results_folder(args)
        if not args.load_features:
            backbone_parameters(args)  # the model's values, before any data or weights are read
    except ValueError as err:
        end_process()
        return bad_input(err)
    if args.load_features:
        splits, info = read_dumped_features(args.load_features), {"features": args.load_features}
    else:
        try:
            # Bad data stop the run before the model is built, weights that do not fit before anything is embedded.
            train, val, num_classes = labelled_splits(args, eval_transform(args.image_size))
            model, source = build_model(args, dist_info.device)
            check_image_size(model, args.image_size)
            if args.dump_features:
                values = (len(train) + len(val)) * (model.embed_dim + 1)  # features and labels
                dump = OutputFolder(args.dump_features, float32_bytes(values), flag="--dump_features").check()
        except ValueError as err:
            end_process()
            return bad_input(err)
        log.info(
            f"evaluating {source.arch} ({source.mode} mode, gamma {source.gamma}) from "
            f"{source.weights or 'random initialisation'}: {len(train)} train / {len(val)} val images, "
            f"{num_classes} classes"
        )
        info = {**source.as_dict(), "num_classes": num_classes, "image_size": args.image_size}
        splits = {  # L2-normalised (normalize=True): the k-NN compares cosine similarities; on every rank
            name: extract_features(model, dataset, args.batch_size_per_gpu, args.num_workers, dist_info.device)
            for name, dataset in (("train", train), ("val", val))
        }
        if dump is not None:
            dump.claim()
            dump_features(args.dump_features, splits)
    if output is not None:
        output.claim()
    if is_main_process():  # every rank holds all the features: one search is enough
        report(args, splits, run_knn(args, splits, dist_info.device), info)
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
