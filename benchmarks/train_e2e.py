"""End-to-end DINO training images/s from a folder of JPEGs: read + decode + multi-crop + step, as users run it.

Runs ``simpool.dino.run_train.main`` -- the code behind ``train_dino.py``, nothing re-assembled -- on an ImageFolder of
ImageNet-sized JPEGs (real photos from the scikit-image / scikit-learn wheels re-encoded at 500 x 375, quality 90,
linked ``--copies`` times so an epoch is long enough to measure) and reads the trainer's own throughput reports
(``img/s`` every ``--log_every`` steps, data wait included). Pipelines, measured in the same run:

  gpu  the default on CUDA: workers only read and decode (``DecodeForGPU``), the multi-crop runs batched on the
       device (``GPUMultiCrop``);
  cpu  ``--gpu_augment False``: workers run ``simpool.dino.augment.DataAugmentationDINO`` on PIL images, as the
       reference does with its own pipeline (the reference, measured end to end, ran at 304 img/s on an
       H200 host with 16 workers). Run without torch.compile: it is bound by the workers, and compiling would
       only add minutes of warm-up.

The first ``--warmup_steps`` steps (torch.compile, worker start-up, cuDNN autotuning) are left out; the rate is the
mean over the measured reports. Every pipeline runs in a fresh subprocess, so one's compiled graphs, cached
memory or threads cannot help or hurt the next.

    python benchmarks/train_e2e.py                                # CUDA host: ViT-S/16 SimPool, batch 100
    python benchmarks/train_e2e.py --tiny --device cpu            # smoke run: tiny ViT, proves the script works
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PIPELINES = {"gpu": ["--gpu_augment", "True"], "cpu": ["--gpu_augment", "False"]}
# ViT-S/16 SimPool with DINO's ViT-S recipe (2 x 224 + 6 x 96 crops, out_dim 65536), as in the GPU-speed issue.
FULL_FLAGS = ["--arch", "vit_small", "--patch_size", "16", "--mode", "simpool", "--out_dim", "65536",
              "--use_bn_in_head", "False", "--optimizer", "adamw", "--clip_grad", "3.0", "--local_crops_number", "6"]
TINY_FLAGS = ["--arch", "vit_tiny", "--patch_size", "8", "--mode", "simpool",
              "--model_overrides", "depth=1", "embed_dim=32", "num_heads=2", "img_size=32",
              "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
              "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2"]
# One progress line of simpool.run.log: "epoch 0 [25/200]  loss 10.9  lr 1e-05  img/s 2345  data% 3.1 ..."
PROGRESS = re.compile(r"^epoch \d+ \[(\d+)/\d+\].*?\bimg/s (\S+)\s+data% (\S+)", re.MULTILINE)


def write_jpeg_folder(root: Path, copies: int) -> int:
    """``root/train/<class>/`` holding ``copies`` links to each ImageNet-sized JPEG; returns the image count."""
    from benchmarks.data_pipeline import write_imagenet_sized_jpegs

    originals = root / "originals"
    originals.mkdir(parents=True)
    photos = write_imagenet_sized_jpegs(originals)
    count = 0
    for c in range(copies):
        folder = root / "train" / f"class_{c % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            (folder / f"{c:05d}_{photo.name}").symlink_to(photo)
            count += 1
    return count


def run_pipeline(name: str, opts: argparse.Namespace, data: Path, out: Path) -> dict:
    """One training run in a subprocess; returns the trainer's measured throughput reports."""
    steps = opts.warmup_steps + opts.steps
    flags = [*(TINY_FLAGS if opts.tiny else FULL_FLAGS), *PIPELINES[name],
             "--data_path", str(data), "--output_dir", str(out / name), "--batch_size_per_gpu", str(opts.batch),
             "--num_workers", str(opts.num_workers), "--epochs", "100", "--exit_after_iterations", str(steps),
             "--log_every", str(opts.log_every), "--eval_every", "0", "--saveckp_freq", "0", "--seed", "0"]
    if name == "cpu":  # data-bound: compiling would only add minutes of warm-up to the baseline
        flags += ["--compile", "False"]
    elif opts.compile is not None:
        flags += ["--compile", opts.compile]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, str(REPO / "train_dino.py"), *flags], env=env, capture_output=True,
                            text=True, timeout=opts.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{name} pipeline failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    reports = [(int(done), float(rate), float(wait)) for done, rate, wait in PROGRESS.findall(result.stdout)]
    measured = [(rate, wait) for done, rate, wait in reports if done > opts.warmup_steps]
    if not measured:
        raise RuntimeError(f"{name}: no throughput report after step {opts.warmup_steps}; got {reports} from\n"
                           f"{result.stdout[-2000:]}")
    return {"img_per_s": statistics.fmean(rate for rate, _ in measured),
            "data_wait_pct": statistics.fmean(wait for _, wait in measured),
            "reports": reports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="default: cuda when available (the trainer picks the device itself)")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--batch", type=int, default=None, help="batch size per GPU (default 100; --tiny: 8)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="loader workers")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 100; --tiny: 10)")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="steps left out: compile, worker start-up (default 50; --tiny: 5)")
    parser.add_argument("--log_every", type=int, default=None,
                        help="steps per throughput report (default 25; --tiny: 5)")
    parser.add_argument("--copies", type=int, default=2000, help="links per photo (6 photos): the epoch length")
    parser.add_argument("--compile", default=None, choices=["True", "False"],
                        help="gpu pipeline; default: the trainer's (on for CUDA)")
    parser.add_argument("--tiny", action="store_true", help="tiny ViT and crops: a CPU smoke run")
    parser.add_argument("--timeout", type=int, default=540, help="seconds per pipeline")
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args(argv)
    for name, full, tiny in (("batch", 100, 8), ("steps", 100, 10), ("warmup_steps", 50, 5), ("log_every", 25, 5)):
        if getattr(opts, name) is None:
            setattr(opts, name, tiny if opts.tiny else full)
    import torch

    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    if opts.steps < opts.log_every:
        parser.error(f"--steps {opts.steps} < --log_every {opts.log_every}: nothing would be measured")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = write_jpeg_folder(Path(tmp) / "data", opts.copies)
        where = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
        print(f"{images} JPEG entries (500 x 375), batch {opts.batch}, {opts.num_workers} workers, {where}, "
              f"{os.cpu_count()} cores; {opts.steps} steps measured after {opts.warmup_steps}", flush=True)
        print(f"{'pipeline':<10} {'img/s':>9} {'data wait %':>12}")
        for name in opts.pipelines:
            results[name] = run_pipeline(name, opts, Path(tmp) / "data", Path(tmp) / "runs")
            print(f"{name:<10} {results[name]['img_per_s']:>9.1f} {results[name]['data_wait_pct']:>12.1f}",
                  flush=True)
    if len(results) == 2:
        print(f"ratio gpu/cpu pipeline: {results['gpu']['img_per_s'] / results['cpu']['img_per_s']:.2f}x")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"device": where, "cores": os.cpu_count(), "args": vars(opts),
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
