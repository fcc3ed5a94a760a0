"""Small-budget recipe sweep on Fashion-MNIST (CPU): which DINO+SimPool settings beat raw pixels' k-NN, and how fast.

Each variant is ``configs/demo.yaml`` plus flag overrides, trained by ``train_dino.py`` in its own subprocess
(niced) under a wall-time cap; its online k-NN (teacher backbone, 3,000 train / 3,000 test images, weighted
k-NN as the demo) is read back from ``log.txt`` with the random-init and raw-pixel baselines of the same run.
One JSON line per variant goes to ``--results`` and a Markdown table is printed.

    python benchmarks/recipe_sweep.py --variants demo vit_p4 --budget 180 --results /tmp/sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> flags over configs/demo.yaml. On a 2-core VM shared with three other engineers' jobs (load 8-11) a
# run may take <= 3 min of wall time, which there is only 30-60 CPU-seconds (8-12 img/s instead of ~200 idle).
# "init_*": k-NN of the network at random initialisation (and raw pixels), one training step then exit.
# Others: 1,000 training images (100 per class), 1 epoch at batch 64 (15 steps), k-NN at the end.
INIT = ["--knn_baselines", "True", "--exit_after_iterations", "1", "--num_workers", "1", "--batch_size_per_gpu", "16"]
SHORT = ["--subset", "100", "--num_workers", "1", "--log_every", "3", "--epochs", "1", "--batch_size_per_gpu", "64",
         "--warmup_epochs", "0", "--freeze_last_layer", "0", "--knn_baselines", "False"]
RESNET = ["--arch", "resnet18", "--model_overrides", "layers=[1,1,1,1]", "output_stride=8"]
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "init_vit_p7": INIT,
    "init_vit_p4": [*INIT, "--patch_size", "4"],
    "init_vit_p7_official": [*INIT, "--mode", "official"],
    "init_resnet_os8": [*INIT, *RESNET],
    "init_resnet_os32": [*INIT, "--arch", "resnet18", "--model_overrides", "layers=[1,1,1,1]"],
    "init_resnet_os8_official": [*INIT, *RESNET, "--mode", "official"],
    "vit_base": SHORT,
    "vit_nobn": [*SHORT, "--use_bn_in_head", "False"],
    "vit_out256": [*SHORT, "--out_dim", "256"],
    "vit_tt07": [*SHORT, "--teacher_temp", "0.07", "--warmup_teacher_temp", "0.07"],
    "resnet_base": [*SHORT, *RESNET, "--lr", "0.004"],
    "resnet_out256": [*SHORT, *RESNET, "--lr", "0.004", "--out_dim", "256"],
    "resnet_2local": [*SHORT, *RESNET, "--lr", "0.004", "--local_crops_number", "2"],
    "resnet_bs32": [*SHORT, *RESNET, "--lr", "0.004", "--batch_size_per_gpu", "32"],
    "resnet_bs32_lr2x": [*SHORT, *RESNET, "--lr", "0.008", "--batch_size_per_gpu", "32"],
    "resnet_bs32_out256": [*SHORT, *RESNET, "--lr", "0.004", "--batch_size_per_gpu", "32", "--out_dim", "256"],
    "resnet_bs16": [*SHORT, *RESNET, "--lr", "0.004", "--batch_size_per_gpu", "16"],
    # demo candidates (k-NN every epoch, baselines on): 4,000 images, 2 epochs
    "demo_resnet": [*RESNET, "--subset", "400", "--epochs", "2", "--batch_size_per_gpu", "32", "--lr", "0.008",
                    "--local_crops_number", "2", "--eval_every", "1", "--warmup_epochs", "0", "--log_every", "25"],
    "demo_resnet_small": [*RESNET, "--subset", "200", "--epochs", "2", "--batch_size_per_gpu", "32", "--lr", "0.008",
                          "--local_crops_number", "2", "--eval_every", "1", "--warmup_epochs", "0", "--log_every",
                          "25", "--knn_baselines", "False", "--freeze_last_layer", "0"],
}


def read_knn(run_dir: Path) -> dict:
    """{"random_init": {k: top1}, "raw_pixels": {...}, "trained": {...}, "epochs": n} from log.txt."""
    out: dict = {"epochs": 0}
    lines = (run_dir / "log.txt").read_text().splitlines() if (run_dir / "log.txt").is_file() else []
    for line in lines:
        entry = json.loads(line)
        if "knn_baselines" in entry:
            for name, table in entry["knn_baselines"].items():
                out[name] = {k: v[0] for k, v in table.items()}
        if entry.get("knn"):
            out["trained"] = {k: v[0] for k, v in entry["knn"].items()}
        if entry.get("epoch", -1) >= 0:
            out["epochs"] = entry["epoch"] + 1
            out["train_entropy"] = entry.get("train_entropy")
    return out


def run_variant(name: str, flags: list[str], out_root: Path, budget: float, threads: int) -> dict:
    run_dir = out_root / name
    command = ["nice", "-n", "5", sys.executable, str(REPO / "train_dino.py"), "--config",
               str(REPO / "configs" / "demo.yaml"), "--output_dir", str(run_dir), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=budget)
        code = result.returncode
        tail = (result.stdout + result.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        code, tail = "timeout", []
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run and its loader workers, once waited for
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    return {"name": name, "flags": flags, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "code": code,
            "tail": tail,
            "load_avg": os.getloadavg()[0], **read_knn(run_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget", type=float, default=180.0, help="wall-time cap per run, seconds")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--results", type=Path, default=Path("runs/sweep/results.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args(argv)
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    print("| variant | flags over demo.yaml | epochs | wall s | CPU s | 10-NN | 20-NN | random init 10-NN | "
          "raw pixels 10-NN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in opts.variants:
        row = run_variant(name, VARIANTS[name], opts.out, opts.budget, opts.threads)
        with opts.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        trained = row.get("trained", {})
        print(f"| {name} | `{' '.join(row['flags'])}` | {row['epochs']} | {row['wall_s']} | {row['cpu_s']} | "
              f"{trained.get('10', '-')} | "
              f"{trained.get('20', '-')} | {row.get('random_init', {}).get('10', '-')} | "
              f"{row.get('raw_pixels', {}).get('10', '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
