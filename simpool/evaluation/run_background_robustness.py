"""Background robustness (SimPool Table 7): accuracy of a frozen backbone + its linear probe on ImageNet-9 and its
background variants (MadryLab/backgrounds_challenge).

The data as distributed: ``--data_path`` the folder holding ``original/``, ``mixed_same/``, ``mixed_rand/``,
``mixed_next/``, ... each with ``val/<NN_class>/`` (:mod:`simpool.data.bg_challenge`); every variant found is
scored, or those of ``--variants``. The classifier: the backbone of ``--pretrained_weights`` and the head that
``eval_linear.py`` saved in ``--probe`` (its ``--output_dir``), trained on ImageNet-1k (1000 classes, mapped to the
nine super-classes, the paper's protocol) or on IN-9 itself (9 classes). Official ViTs take the probe's
``--n_last_blocks`` / ``--avgpool_patchtokens`` (the probe does not record them; a mismatch of the feature size is
an error). Images: ``ToTensor`` + ImageNet normalisation (the release's images are already 224 x 224; other sizes are
resized and centre-cropped to ``--image_size``).

Files in ``--output_dir``: ``background_robustness.json`` (accuracy per variant, the table's IN-9 / Mixed-Same /
Mixed-Rand / Mixed-Next and BG-gap, images per variant) and ``background_robustness.rank0.jsonl`` (each finished
variant, so that a rerun skips it).

Usage::

    simpool-background-robustness --pretrained_weights runs/vits/checkpoint.pth --probe runs/vits/linear \\
        --data_path /data/bg_challenge --output_dir runs/vits/in9
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from torchvision import transforms
from tqdm import tqdm

from simpool.data.bg_challenge import IN9_CLASSES, find_variants, in9_folder
from simpool.data.every_item import every_item
from simpool.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from simpool.evaluation.background_robustness import ProbeHead, load_probe_head
from simpool.evaluation.common import checked_frozen_model, write_json
from simpool.evaluation.features import IMAGENET_MEAN, IMAGENET_STD, feature_fn
from simpool.run import ItemResults, changes, weights_identity
from simpool.run.config import IMAGE_SIDE, WORKERS, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_distributed_flags, add_model_flags, bool_flag, require_weights
from simpool.run.model_check import check_image_size
from simpool.run.process import data_errors_agreed, driver, end_process, start_process

log = logging.getLogger("simpool.evaluation.run_background_robustness")
RESULTS_FILE = "background_robustness.json"
TABLE = (("IN-9", "original"), ("Mixed-Same", "mixed_same"), ("Mixed-Rand", "mixed_rand"),
         ("Mixed-Next", "mixed_next"))

__all__ = ["check_probe", "get_args_parser", "in9_transform", "main", "probe_features", "run_background_robustness"]


def probe_features(model: torch.nn.Module, n_last_blocks: int = 4, avgpool_patchtokens: bool = False):
    """(images -> features, their size) as ``eval_linear.py`` fed its probe: official ViTs concatenate the [CLS]
    tokens of the last ``n_last_blocks`` blocks (+ the mean patch token), other models use their pooled output."""
    official_vit = getattr(model, "mode", None) == "official" and hasattr(model, "last_block_outputs")
    blocks = n_last_blocks if official_vit else 1
    return (feature_fn(model, blocks, avgpool_patchtokens and official_vit),
            model.embed_dim * (blocks + int(avgpool_patchtokens and official_vit)))


def check_probe(head: ProbeHead, source: dict[str, Any], feature_dim: int) -> None:
    """The probe must have been trained on these weights' features, of this size."""
    found = changes(weights_identity(head.source), weights_identity(source)) if head.source else []
    if found:
        raise ConfigError(f"--probe holds a head trained on other features ({', '.join(found)}): pass the probe "
                             "trained on --pretrained_weights")
    if head.n_features != feature_dim:
        raise ConfigError(f"--probe takes {head.n_features}-d features, the model gives {feature_dim}: pass the "
                             "--n_last_blocks / --avgpool_patchtokens the probe was trained with")


def in9_transform(image_size: int) -> transforms.Compose:
    """``ToTensor`` + ImageNet normalisation (the challenge's test transform); images not at ``image_size`` are
    resized and centre-cropped to it first (a no-op on the release's 224 x 224 images)."""
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def _score_variant(features, head: ProbeHead, data, batch_size: int, num_workers: int, device: torch.device,
                   progress: bool, name: str) -> dict[str, Any]:
    """Per-class correct / total counts of this rank's share, summed over ranks."""
    mine = Subset(data, range(get_rank(), len(data), get_world_size()))
    counts = torch.zeros(2, len(IN9_CLASSES), dtype=torch.int64, device=device)
    loader = every_item(mine, batch_size=batch_size, num_workers=num_workers)
    with data_errors_agreed():  # an unreadable image on one rank stops every rank before the sum
        for images, targets in tqdm(loader, disable=not (progress and is_main_process()), desc=name):
            targets = targets.to(device)
            correct = head.in9_predictions(features(images.to(device)).float()) == targets
            counts[0].index_add_(0, targets, correct.long())
            counts[1].index_add_(0, targets, torch.ones_like(targets))
    counts = all_reduce_sum(counts).cpu()
    return {"correct": int(counts[0].sum()), "total": int(counts[1].sum()),
            "accuracy": 100.0 * float(counts[0].sum()) / max(1, int(counts[1].sum())),
            "per_class_correct": counts[0].tolist(), "per_class_total": counts[1].tolist()}


def run_background_robustness(
    model: torch.nn.Module,
    source: dict[str, Any],
    variants: dict[str, Path],
    head: ProbeHead,
    output_dir: str | Path,
    *,
    data_path: str = "",
    probe: str = "",
    image_size: int = 224,
    n_last_blocks: int = 4,
    avgpool_patchtokens: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy on each variant (``{name: <variant>/val}``), resuming finished variants from ``output_dir``;
    collective under torchrun. Returns (on every rank) the dict rank 0 writes to ``background_robustness.json``."""
    features, dim = probe_features(model, n_last_blocks, avgpool_patchtokens)
    check_probe(head, source, dim)
    device = next(model.parameters()).device
    head.linear.to(device)
    output_dir = Path(output_dir)
    protocol = {"image_size": image_size, "probe": str(Path(probe).resolve()) if probe else "", "probe_lr": head.lr,
                "probe_classes": head.num_labels, "n_last_blocks": n_last_blocks,
                "avgpool_patchtokens": avgpool_patchtokens}
    datasets = {name: in9_folder(path, in9_transform(image_size)) for name, path in variants.items()}
    identity = {**weights_identity(source), **protocol, "data_path": str(Path(data_path).resolve()) if data_path
                else "", "num_images": {name: len(d) for name, d in datasets.items()}}
    items = ItemResults(output_dir, "background_robustness", identity).open()
    for name in items.todo(list(datasets)):  # the same list on every rank; rank 0 records
        record = _score_variant(features, head, datasets[name], batch_size, num_workers, device, progress, name)
        log.info("%s: %.2f%% of %d images", name, record["accuracy"], record["total"])
        if is_main_process():
            items.add(name, record)
    records = items.gather()
    accuracy = {name: records[name]["accuracy"] for name in datasets}
    rows = {label: accuracy[v] for label, v in TABLE if v in accuracy}
    if "mixed_same" in accuracy and "mixed_rand" in accuracy:
        rows["BG-Gap"] = accuracy["mixed_same"] - accuracy["mixed_rand"]
    result = {"evaluator": "background_robustness", **source, "data_path": data_path, **protocol,
              "num_images": {name: records[name]["total"] for name in datasets}, "accuracy": accuracy,
              "per_variant": {name: records[name] for name in datasets}, "rows": rows}
    if is_main_process():
        write_json(output_dir / RESULTS_FILE, result)
    return result


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-background-robustness",
                        description="Background robustness on ImageNet-9 and its variants (SimPool Table 7)")
    add_model_flags(parser)
    group = parser.add_argument_group("data and probe")
    group.add_argument("--data_path", required=True, help="the backgrounds challenge folder (original/, mixed_rand/, "
                       "... each with val/<NN_class>/)")
    group.add_argument("--variants", default=None, nargs="+", help="variants to score (default: every one found)")
    group.add_argument("--probe", required=True, help="--output_dir of eval_linear.py for these weights (its "
                       "checkpoint.pth.tar), trained on ImageNet-1k or on IN-9")
    group.add_argument("--probe_lr", default=None, type=float,
                       help="the probe's head of this lr (default: the best of its last evaluation)")
    group.add_argument("--n_last_blocks", default=4, type=int, help="official ViTs: as the probe was trained (4)")
    group.add_argument("--avgpool_patchtokens", default=False, type=bool_flag, help="official ViTs: as the probe")
    group.add_argument("--image_size", default=224, type=int, help="images of another size are resized and "
                       "centre-cropped to this")
    group.add_argument("--batch_size_per_gpu", default=64, type=int, help="images per forward pass")
    group.add_argument("--num_workers", default=4, type=int, help="image decoding workers per process")
    group.add_argument("--output_dir", required=True, help=f"{RESULTS_FILE} and the finished variants")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_distributed_flags(parser)
    return parser


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, data, probe or weights, with ``error: ...`` on stderr)."""
    args = get_args_parser().parse_args(argv)
    try:
        require_weights(args)
        check_ranges(args, {"image_size": IMAGE_SIDE, "num_workers": WORKERS})
        if args.image_size < 1 or args.batch_size_per_gpu < 1 or args.num_workers < 0 or args.n_last_blocks < 1:
            raise ConfigError("--image_size, --batch_size_per_gpu and --n_last_blocks must be positive, "
                                 "--num_workers >= 0")
        variants = find_variants(args.data_path, args.variants)
        for path in variants.values():
            in9_folder(path)  # class folders that do not map are an error now, before any model
        head = load_probe_head(args.probe, args.probe_lr)
    except ValueError as err:
        return bad_input(err)
    dist_info = start_process(args.dist_url)
    try:
        model, source, output = checked_frozen_model(args, dist_info.device)
        check_image_size(model, args.image_size)
        log.info("IN-9 accuracy of %s (%s mode) from %s with the probe of %s (lr %g, %d classes) on %s", source.arch,
                 source.mode, source.weights or "random initialisation", args.probe, head.lr, head.num_labels,
                 ", ".join(variants))
        output.claim()
        result = run_background_robustness(
            model, source.as_dict(), variants, head, args.output_dir, data_path=args.data_path, probe=args.probe,
            image_size=args.image_size, n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
            batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, progress=not args.no_progress)
    except ValueError as err:
        end_process()
        return bad_input(err)
    for row, value in result["rows"].items():
        log.info("%-12s %6.2f", row, value)
    log.info("results written to %s", Path(args.output_dir) / RESULTS_FILE)
    end_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
