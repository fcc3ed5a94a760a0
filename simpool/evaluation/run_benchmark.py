"""simpool-benchmark: SimPool's tables for one or more weights from one command.

For every ``--weights`` (anything ``load_model`` reads; ``--random_init`` adds each one's network at random
initialisation) and every entry of the suite YAML (``configs/benchmark_paper.yaml``: k-NN, linear probe,
localisation, object discovery on VOC07 / VOC12 / COCO20k, ImageNet-9) whose data is under ``--data_root`` in its
authors' layout, runs the entry's evaluator with ``--output_dir OUTPUT_DIR/<weights>/<entry>/``, and writes
``OUTPUT_DIR/benchmark.md`` and ``benchmark.json``: the paper's tables, a row per weights, with the data set sizes
used (rewritten after every run, so the table fills as it goes). A rerun skips what is finished (each evaluator's
result file) and resumes what was cut short (each evaluator's own resume); a data set missing under the root is a
skipped column with its reason, not a failure.

Bad input -- a suite naming an unknown evaluator or flag, a root with none of the suite's data, missing weights, a
localisation / discovery / IN-9 data set in a wrong layout (each is read up front), an output folder holding another
run's results -- is one ``error:`` line (exit 2) before any model is built. The k-NN and linear-probe data are read
by their evaluators (listing ImageNet twice would cost minutes): a wrong layout there fails that cell, with the
evaluator's ``error:`` line as its reason. Exit 1 when some evaluator failed (its reason is in the table), else 0.

Usage::

    simpool-benchmark --weights runs/vits_official/checkpoint.pth runs/vits_simpool/checkpoint.pth \\
        --data_root /data --output_dir runs/bench
    python -m simpool.evaluation.run_benchmark --weights tests/fixtures/demo_backbone --random_init \\
        --suite configs/benchmark_demo.yaml --data_root runs/gen --output_dir runs/bench_demo
    simpool-benchmark ... --nproc_per_node 8         # each evaluator under torchrun on 8 processes
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

from simpool.evaluation.benchmark.cells import check_data, plan, run_pending, torchrun_launcher
from simpool.evaluation.benchmark.rows import build_rows
from simpool.evaluation.benchmark.suite import read_suite
from simpool.evaluation.benchmark.table import JSON_FILE, MARKDOWN_FILE, table_payload, write_tables
from simpool.run.config import AT_LEAST_ONE, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_backbone_flags
from simpool.run.log import setup_logging
from simpool.run.output import OutputFolder
from simpool.run.process import driver

log = logging.getLogger("simpool.evaluation.run_benchmark")
PAPER_SUITE = Path(__file__).resolve().parents[2] / "configs" / "benchmark_paper.yaml"

__all__ = ["get_args_parser", "main"]


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-benchmark", description="SimPool's tables (localisation, object discovery, "
                        "background robustness, k-NN, linear probe) for several weights side by side")
    group = parser.add_argument_group("rows")
    group.add_argument("--weights", default=[], nargs="+", help="checkpoints or export folders, a row each")
    group.add_argument("--names", default=None, nargs="+", help="row names, one per --weights (default: from the "
                       "path: runs/demo/checkpoint.pth -> demo)")
    group.add_argument("--random_init", action="store_true", help="also each weights' network at random "
                       "initialisation (without --weights: the network of --arch/--mode/...)")
    group.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                       help="which network of a training checkpoint")
    add_backbone_flags(parser, what="every row (backbone-only files need --arch and --mode)")
    group = parser.add_argument_group("suite and data")
    group.add_argument("--suite", default=str(PAPER_SUITE), help="suite YAML (default: configs/benchmark_paper.yaml)")
    group.add_argument("--data_root", required=True, help="the folder the suite's data paths are under")
    group.add_argument("--output_dir", required=True, help=f"{MARKDOWN_FILE}, {JSON_FILE} and a folder per weights "
                       "and entry")
    group = parser.add_argument_group("resources (passed to the evaluators that take them)")
    group.add_argument("--num_workers", default=None, type=int, help="image decoding workers per process")
    group.add_argument("--batch_size_per_gpu", default=None, type=int,
                       help="images per forward pass (not the linear probe's, whose lr scales with it: the suite's)")
    group.add_argument("--no_progress", action="store_true", help="no progress bars")
    group.add_argument("--nproc_per_node", default=1, type=int,
                       help="run each evaluator under torchrun on this many processes (1: in this process)")
    group.add_argument("--launcher", default=None,
                       help="run each evaluator as '<launcher> -m <evaluator> ...', e.g. 'srun python' in a SLURM "
                       "allocation, 'torchrun --nnodes 1 --nproc_per_node 8'")
    group.add_argument("--plan", action="store_true", help="print what would run (and the commands), run nothing")
    return parser


def _refuse_launched() -> None:
    """One process cannot join a torchrun / srun process group twice: the benchmark starts the evaluators' groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_PROCID" in os.environ else 1
    if max(world, slurm) > 1:
        raise ConfigError(f"this environment describes {max(world, slurm)} processes (torchrun's WORLD_SIZE or "
                          "SLURM_NTASKS): run simpool-benchmark as one process and let it launch each evaluator "
                          "with --nproc_per_node N (torchrun) or --launcher 'srun python'")


def _options(args) -> list[str]:
    words = ["--num_workers", str(args.num_workers)] if args.num_workers is not None else []
    words += ["--batch_size_per_gpu", str(args.batch_size_per_gpu)] if args.batch_size_per_gpu is not None else []
    return words + (["--no_progress"] if args.no_progress else [])


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad input, before any model; 1: an evaluator failed)."""
    args = get_args_parser().parse_args(argv)
    try:
        check_ranges(args, {"nproc_per_node": AT_LEAST_ONE, "batch_size_per_gpu": AT_LEAST_ONE})
        if args.num_workers is not None and args.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {args.num_workers}")
        launcher = shlex.split(args.launcher) if args.launcher else None
        if launcher and args.nproc_per_node > 1:
            raise ConfigError("--launcher and --nproc_per_node exclude each other: put the process count in the "
                              "launcher")
        launcher = launcher or (torchrun_launcher(args.nproc_per_node) if args.nproc_per_node > 1 else None)
        if launcher is None:
            _refuse_launched()
        suite = read_suite(args.suite)
        overrides = {k: v for item in args.model_overrides for k, v in item.items()}
        rows = build_rows(args.weights, args.names, args.random_init, args.checkpoint_key,
                          {"arch": args.arch, "mode": args.mode, "gamma": args.gamma, "patch_size": args.patch_size,
                           "overrides": overrides})
        cells = plan(suite, rows, args.data_root, args.output_dir, _options(args))
        check_data(cells)
        output = OutputFolder(args.output_dir).check()  # one benchmark per folder (each evaluator locks its own)
    except ValueError as err:
        return bad_input(err)
    setup_logging(0)

    def write() -> None:
        write_tables(args.output_dir, table_payload(suite, args.data_root, cells))

    counts = {s: sum(c.status == s for c in cells) for s in ("pending", "done", "skipped")}
    log.info("%s: %d rows x %d entries: %d to run, %d finished earlier, %d skipped (data not found)", suite.title,
             len(rows), len(suite.entries), counts["pending"], counts["done"], counts["skipped"])
    if args.plan:
        for cell in cells:
            log.info("%s / %s: %s%s", cell.row.name, cell.entry.name, cell.status,
                     f" ({cell.reason})" if cell.reason else f"\n    {cell.command}" * (cell.status == "pending"))
        return 0
    output.claim()
    write()
    run_pending(cells, write, launcher)
    write()
    failed = [c for c in cells if c.status == "failed"]
    log.info("table: %s (%d cells failed)", Path(args.output_dir) / MARKDOWN_FILE, len(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
