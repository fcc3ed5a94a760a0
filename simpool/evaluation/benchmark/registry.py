"""The evaluators ``simpool-benchmark`` runs: one :class:`Evaluator` entry each, saying how to find its data under
the data root, how to run it, and which values of its result JSON become which columns of which table.

A suite (:mod:`simpool.evaluation.benchmark.suite`) names evaluators by their key in :data:`EVALUATORS`; the
benchmark (:mod:`simpool.evaluation.benchmark.cells`) runs ``driver.main(argv)`` -- or ``python -m <driver> argv``
under a launcher -- with ``--output_dir`` a folder per weights and suite entry, and reads ``results_file`` there once it
exists. Column names are templates: ``{label}`` becomes the suite entry's label (``"LOST {label}"`` ->
``"LOST VOC07"``).

Adding an evaluator is one entry (the driver takes ``--pretrained_weights``/``--random_init`` and the model flags
of :func:`simpool.run.flags.add_model_flags`, and ``--output_dir``)::

    EVALUATORS["retrieval"] = Evaluator(
        driver="simpool.evaluation.run_retrieval",       # main(argv) -> exit code; also run as python -m
        results_file="retrieval.json",                     # in --output_dir once the run is finished
        data_flags=("data_path",),                         # flags the suite gives as paths under the data root
        table="Retrieval: mAP (%)",                        # the table its columns join (new titles follow TABLES)
        columns={"{label} medium": lambda r: r["rows"]["M"], "{label} hard": lambda r: r["rows"]["H"]},
        images=lambda r: r["num_images"],                  # data set size(s) the run used
        options=("num_workers", "no_progress"),            # benchmark-wide flags the driver takes
    )
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["EVALUATORS", "KNN_K", "OPTIONS", "TABLES", "Evaluator", "primary_row"]

# The tables of benchmark.md, in this order (the paper's Tables 5-7, then the classification protocols); a table
# title of an evaluator not listed here follows them.
LOCALIZATION = "Table 5: localisation, MaxBoxAccV2 (%)"
DISCOVERY = "Table 6: object discovery, CorLoc (%)"
ROBUSTNESS = "Table 7: background robustness, top-1 (%)"
CLASSIFICATION = "Classification: weighted k-NN (20-NN) and linear probe, top-1 (%)"
RETRIEVAL = "DINO: image retrieval, revisited mAP (%), Medium / Hard"
COPY_DETECTION = "DINO: copy detection (Copydays), mAP (%)"
VIDEO_SEGMENTATION = "DINO: video object segmentation (DAVIS 2017), J&F / J / F (%)"
TABLES = (LOCALIZATION, DISCOVERY, ROBUSTNESS, CLASSIFICATION, RETRIEVAL, COPY_DETECTION, VIDEO_SEGMENTATION)

# Benchmark-wide flags (resources, not protocol) that the command line passes to the drivers that take them.
OPTIONS = ("num_workers", "batch_size_per_gpu", "no_progress")
KNN_K = 20  # DINO's tables report the 20-NN top-1


@dataclass(frozen=True)
class Evaluator:
    """How the benchmark runs one evaluator and reads its table cells (see the module docstring)."""

    driver: str
    results_file: str
    data_flags: tuple[str, ...]
    table: str
    columns: Mapping[str, Callable[[dict], float | None]]
    images: Callable[[dict], int | dict[str, int]]
    options: tuple[str, ...] = ()
    # flag -> evaluator key: the flag takes the output folder of a suite entry of that evaluator (IN-9's probe)
    inputs: Mapping[str, str] = field(default_factory=dict)
    # name of the driver's function that checks parsed flags (raises ValueError), run when the suite is read
    check_flags: str | None = None
    # reads the data the parsed flags name (raises DataError), before any model is built
    check_data: Callable[[argparse.Namespace], Any] | None = None
    # values kept in benchmark.json beside the columns (the evaluator's other rows)
    details: Callable[[dict], dict[str, Any]] = lambda result: dict(result.get("rows") or {})

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.driver)


def primary_row(rows: Mapping[str, float], single: str, head_mean: str) -> float | None:
    """The row of a map-based table: ``single`` for one map (SimPool's ``a``), else ``head_mean`` (an official
    ViT's [CLS] attention averaged over heads); the best head stays in the details."""
    return rows[single] if single in rows else rows.get(head_mean)


def _knn_top1(result: dict) -> float | None:
    """The 20-NN top-1 (None when the run had no k = 20: too few train images, or not asked for)."""
    chosen = (result.get("results") or {}).get(str(KNN_K))
    return None if chosen is None else chosen["top1"]


def _check_wsol(args: argparse.Namespace) -> None:
    from simpool.data.wsol import read_wsol

    read_wsol(args.data_path, args.metadata)


def _check_discovery(args: argparse.Namespace) -> None:
    from simpool.evaluation.run_object_discovery import load_discovery_data

    load_discovery_data(args.data_path, args.split, args.year, args.no_hard, args.annotations, args.image_list)


def _check_in9(args: argparse.Namespace) -> None:
    from simpool.data.bg_challenge import find_variants, in9_folder

    for path in find_variants(args.data_path, args.variants).values():
        in9_folder(path)


def _check_revisited(args: argparse.Namespace) -> None:
    from simpool.data.revisitop import read_distractors, read_revisited

    read_revisited(args.data_path, args.dataset)
    if args.distractors_path:
        read_distractors(args.distractors_path)


def _check_copydays(args: argparse.Namespace) -> None:
    from simpool.data.copydays import list_images, read_copydays

    read_copydays(args.data_path)
    for flag, path in (("--whitening_path", args.whitening_path), ("--distractors_path", args.distractors_path)):
        if path:
            list_images(path, flag)


def _check_davis(args: argparse.Namespace) -> None:
    from simpool.data.davis import read_davis

    read_davis(args.data_path, args.split, videos=args.videos)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


EVALUATORS: dict[str, Evaluator] = {
    "knn": Evaluator(
        driver="simpool.evaluation.run_knn", results_file="knn.json", data_flags=("data_path",),
        table=CLASSIFICATION, columns={"k-NN {label}": _knn_top1},
        images=lambda r: {"train": r["num_train"], "val": r["num_val"]},
        options=("num_workers", "batch_size_per_gpu"), check_flags="check_knn_flags",
        details=lambda r: {f"{k}-NN top-1": v["top1"] for k, v in (r.get("results") or {}).items()}),
    "linear": Evaluator(
        driver="simpool.evaluation.run_linear", results_file="linear.json", data_flags=("data_path",),
        table=CLASSIFICATION, columns={"linear {label}": lambda r: r["best_top1"]},
        images=lambda r: {"train": r["num_train"], "val": r["num_val"]},
        # not batch_size_per_gpu: the probe's lr scales with the global batch, so it is protocol (suite flags)
        options=("num_workers",), check_flags="check_linear_flags",
        details=lambda r: {f"lr {lr}": v for lr, v in r["best_top1_per_lr"].items()}),
    "localization": Evaluator(
        driver="simpool.evaluation.run_localization", results_file="localization.json",
        data_flags=("data_path", "metadata"), table=LOCALIZATION,
        columns={"{label}": lambda r: primary_row(r["rows"], "map", "head-mean map")},
        images=lambda r: r["num_images"], options=OPTIONS, check_flags="check_flags", check_data=_check_wsol),
    "object_discovery": Evaluator(
        driver="simpool.evaluation.run_object_discovery", results_file="object_discovery.json",
        data_flags=("data_path", "annotations", "image_list"), table=DISCOVERY,
        columns={"DINO-seg {label}": lambda r: primary_row(r["rows"], "DINO-seg", "DINO-seg head-mean map"),
                 "LOST {label}": lambda r: r["rows"].get("LOST")},
        images=lambda r: r["num_images"], options=("num_workers", "no_progress"), check_flags="check_flags",
        check_data=_check_discovery),
    "background_robustness": Evaluator(
        driver="simpool.evaluation.run_background_robustness", results_file="background_robustness.json",
        data_flags=("data_path",), table=ROBUSTNESS,
        columns={name: (lambda r, name=name: r["rows"].get(name))
                 for name in ("IN-9", "Mixed-Same", "Mixed-Rand", "Mixed-Next", "BG-Gap")},
        images=lambda r: r["num_images"], options=OPTIONS, inputs={"probe": "linear"}, check_data=_check_in9,
        details=lambda r: {f"accuracy {k}": v for k, v in r["accuracy"].items()}),
    "retrieval": Evaluator(
        driver="simpool.evaluation.run_retrieval", results_file="retrieval_{dataset}.json",
        data_flags=("data_path", "distractors_path"), table=RETRIEVAL,
        columns={"{label} M": lambda r: _percent(r["medium"]["map"]),
                 "{label} H": lambda r: _percent(r["hard"]["map"])},
        images=lambda r: {"queries": r["num_queries"], "database": r["database_size"]},
        options=("num_workers", "batch_size_per_gpu"), check_data=_check_revisited,
        details=lambda r: {f"{setup} mAP": _percent(r[setup]["map"]) for setup in ("easy", "medium", "hard")}),
    "copy_detection": Evaluator(
        driver="simpool.evaluation.run_copy_detection", results_file="copy_detection.json",
        data_flags=("data_path", "whitening_path", "distractors_path"), table=COPY_DETECTION,
        columns={"{label} strong": lambda r: _percent(r["map"].get("strong"))},
        images=lambda r: {"queries": sum(r["num_queries"].values()), "database": r["database_size"],
                          "whitening": r["num_whitening"]},
        options=("num_workers", "batch_size_per_gpu"), check_data=_check_copydays,
        details=lambda r: {f"mAP {block}": _percent(v) for block, v in r["map"].items()}),
    "video_segmentation": Evaluator(
        driver="simpool.evaluation.run_video_segmentation", results_file="video_segmentation.json",
        data_flags=("data_path",), table=VIDEO_SEGMENTATION,
        columns={f"{name} {{label}}": (lambda r, key=f"{name}-Mean": _percent(r.get(key)))
                 for name in ("J&F", "J", "F")},
        images=lambda r: {"videos": r["num_videos"], "frames": r["num_frames"]},
        options=("batch_size_per_gpu",), check_flags="check_flags", check_data=_check_davis,
        details=lambda r: {k: v for k, v in r.items() if k.endswith(("-Recall", "-Decay"))}),
}
