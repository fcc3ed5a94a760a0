"""Training curves of one or more DINO runs as one PNG: ``utils/plot_log.py RUN_DIR [RUN_DIR ...]``.

    python utils/plot_log.py runs/demo                        # writes runs/demo/curves.png
    python utils/plot_log.py runs/a runs/b --out compare.png  # runs overlaid, one colour each

Reads what ``train_dino.py`` writes (``simpool.run.log``): ``progress.jsonl`` (one line per log step) for the
per-step curves, ``log.txt`` (one line per epoch) for the k-NN and, in older runs without ``progress.jsonl``,
the per-epoch curves; ``args.yaml`` for K (``out_dim``). Panels: loss; teacher entropy with the uniform-
collapse band (H >= 0.95 log K); KL with its band (KL <= 0.1 log K); prototypes in use with the one-prototype
band (<= 2); lr, weight decay and teacher momentum; k-NN top-1 per epoch with the random-init and raw-pixel
lines (dashed, dotted) when the run measured them; img/s; data-wait %. The bands are those of
``simpool.dino.collapse`` (a run sitting in one of them for several log points gets the collapse alarm).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from simpool.run.config import FlagParser, bad_input

# The defaults of simpool.dino.collapse.collapse_mode, drawn as bands.
UNIFORM_ENTROPY, UNIFORM_KL, ONE_PROTOTYPE = 0.95, 0.1, 2.0


class RunDirError(ValueError):
    """A folder without the logs of a run."""


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """{"name", "out_dim", "steps": per-log-step rows, "epochs": per-epoch rows, "baselines": {...} or None}."""
    run_dir = Path(run_dir)
    log, progress = _json_lines(run_dir / "log.txt"), _json_lines(run_dir / "progress.jsonl")
    if not log and not progress:
        raise RunDirError(f"{run_dir} has neither log.txt nor progress.jsonl: pass the --output_dir of a "
                          "train_dino.py run")
    args_file = run_dir / "args.yaml"
    args = yaml.safe_load(args_file.read_text()) if args_file.is_file() else {}
    baselines = next((row["knn_baselines"] for row in log if row.get("knn_baselines")), None)
    epochs = [row for row in log if row.get("epoch", -1) >= 0]
    return {"name": run_dir.name or str(run_dir), "out_dim": args.get("out_dim"), "steps": progress,
            "epochs": epochs, "baselines": baselines}


def _series(run: dict[str, Any], step_key: str, epoch_key: str) -> tuple[list[float], list[float], str]:
    """(x, y, x label) of one quantity: per log step when progress.jsonl has it, else per epoch."""
    rows = [r for r in run["steps"] if r.get(step_key) is not None]
    if rows:
        return [r["iteration"] for r in rows], [r[step_key] for r in rows], "iteration"
    rows = [r for r in run["epochs"] if r.get(epoch_key) is not None]
    return [r["epoch"] + 1 for r in rows], [r[epoch_key] for r in rows], "epoch"


def plot_runs(runs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    ax = dict(zip(["loss", "entropy", "kl", "protos", "sched", "knn", "rate", "wait"], axes.flat))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_data = {"sched", "knn"}
    for i, run in enumerate(runs):
        c, name = colours[i % len(colours)], run["name"]
        for key, step_key, epoch_key in [("loss", "loss", "train_loss"), ("entropy", "entropy", "train_entropy"),
                                         ("kl", "KL", "train_KL_div"),
                                         ("protos", "prototypes", "train_prototypes_in_use"),
                                         ("rate", "img/s", None), ("wait", "data%", None)]:
            x, y, xlabel = _series(run, step_key, epoch_key or "-")
            if y:
                ax[key].plot(x, y, color=c, label=name, marker="o" if len(y) < 3 else None, ms=4)
                ax[key].set_xlabel(xlabel)
                has_data.add(key)
        for step_key, epoch_key, style, label in [("lr", "train_lr", "-", "lr"), ("wd", "train_wd", "--", "wd")]:
            x, y, xlabel = _series(run, step_key, epoch_key)
            ax["sched"].plot(x, y, style, color=c, label=f"{label} ({name})")
            ax["sched"].set_xlabel(xlabel)
        x, y, _ = _series(run, "momentum", "-")
        if y:
            if "momentum" not in ax:
                ax["momentum"] = ax["sched"].twinx()
            twin = ax["momentum"]
            twin.plot(x, y, ":", color=c, label=f"teacher momentum ({name})")
            twin.set_ylabel("teacher momentum (dotted)")
        knn = [(r["epoch"] + 1, r["knn"]) for r in run["epochs"] if r.get("knn")]
        ks = sorted({k for _, table in knn for k in table}, key=int)
        for j, k in enumerate(ks[:2]):
            pts = [(e, t[k][0]) for e, t in knn if k in t]
            ax["knn"].plot(*zip(*pts), "o-" if j == 0 else "s--", color=c, label=f"{k}-NN ({name})")
        if run["baselines"]:
            k = ks[0] if ks else min(run["baselines"].get("raw_pixels", {"": 0}), key=lambda v: int(v or 0))
            for base, style in [("random_init", "--"), ("raw_pixels", ":")]:
                if k in run["baselines"].get(base, {}):
                    ax["knn"].axhline(run["baselines"][base][k][0], ls=style, color=c, lw=1,
                                      label=f"{k}-NN {base.replace('_', ' ')} ({name})")
    _collapse_bands(ax, [r["out_dim"] for r in runs if r["out_dim"]])
    for key in set(ax) - has_data - {"momentum"}:
        ax[key].clear()
        ax[key].text(0.5, 0.5, "not in these logs\n(runs before progress.jsonl)", ha="center", va="center",
                     transform=ax[key].transAxes, color="gray")
    titles = {"loss": "DINO loss", "entropy": "teacher entropy H(q) (nats)", "kl": "KL(q || p) (nats)",
              "protos": "prototypes in use, exp H(mean q)", "sched": "lr (solid), weight decay (dashed)",
              "knn": "k-NN top-1 (%) per epoch", "rate": "throughput (img/s)", "wait": "data wait (% of wall)"}
    for key, title in titles.items():
        ax[key].set_title(title)
        ax[key].grid(alpha=0.3)
    if "protos" in has_data:
        ax["protos"].set_yscale("log")
    ax["sched"].set_yscale("log")
    for key, where in (("loss", "best"), ("knn", "best"), ("sched", "lower left"), ("protos", "best")):
        if ax[key].get_legend_handles_labels()[0]:
            ax[key].legend(fontsize=7, loc=where)
    fig.suptitle("  |  ".join(r["name"] for r in runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _collapse_bands(ax: dict, out_dims: list[int]) -> None:
    """Shade the collapse regions of simpool.dino.collapse (for the largest K when runs differ)."""
    if out_dims:
        log_k = math.log(max(out_dims))
        ax["entropy"].axhspan(UNIFORM_ENTROPY * log_k, log_k * 1.02, color="red", alpha=0.12,
                              label="uniform collapse")
        ax["entropy"].axhline(log_k, color="red", lw=0.8)
        ax["entropy"].text(0.01, log_k, " log K", color="red", va="bottom",
                           transform=ax["entropy"].get_yaxis_transform())
        ax["kl"].axhspan(0, UNIFORM_KL * log_k, color="red", alpha=0.12, label="uniform collapse (with high H)")
        ax["entropy"].legend(fontsize=7, loc="lower right")
        ax["kl"].legend(fontsize=7, loc="upper right")
    ax["protos"].axhspan(0.9, ONE_PROTOTYPE, color="purple", alpha=0.15, label="one-prototype collapse")


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser("plot_log.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="output_dir(s) of train_dino.py runs")
    parser.add_argument("--out", default=None, help="PNG to write (default: FIRST_RUN_DIR/curves.png)")
    opts = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in opts.run_dirs]
    except RunDirError as err:
        return bad_input(err)
    out = plot_runs(runs, Path(opts.out) if opts.out else Path(opts.run_dirs[0]) / "curves.png")
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
