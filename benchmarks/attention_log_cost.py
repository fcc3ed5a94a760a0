"""Benchmark: what ``train_dino.py --attention_every N`` costs per logged epoch (simpool.dino.attention_log).

One logged epoch = ``AttentionLog.write``: prepare the 8 images, one teacher forward each (its attention map),
draw overlay + mask with numpy/PIL, write the PNG. Timed (median wall and process CPU seconds) for

* a ViT-S/16 SimPool teacher at 224 px (the ImageNet setting; 375 x 500 photos -> 224 x 298), forward on the CPU;
* the same pictures and 14 x 14 maps from a depth-1, width-32 ViT/16, whose forward is nearly free: the part that
  stays on the host CPU whatever accelerator runs the teacher;
* the demo's ViT on 28 px Fashion-MNIST-sized images.

Weights are random: the cost does not depend on them.

Usage::

    python benchmarks/attention_log_cost.py                  # medians of 5 repeats
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from simpool.dino.attention_log import MAX_IMAGES, AttentionLog  # noqa: E402
from simpool.models import build_backbone  # noqa: E402

SETTINGS = {
    "ViT-S/16 SimPool @224, CPU forward": (dict(arch="vit_small", mode="simpool"), 224, (375, 500)),
    "drawing only (ViT/16 depth 1 width 32 @224)": (dict(arch="vit_tiny", mode="simpool", depth=1, embed_dim=32,
                                                         num_heads=2), 224, (375, 500)),
    "demo ViT (28 px)": (dict(arch="vit_tiny", mode="simpool", patch_size=7, depth=4, embed_dim=96, num_heads=3,
                              img_size=28), 28, (28, 28)),
}


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn()`` after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {MAX_IMAGES} images")
    for name, (kwargs, side, photo_size) in SETTINGS.items():
        model = build_backbone(**kwargs).eval()
        photos = [Image.fromarray(rng.integers(0, 255, (*photo_size, 3), dtype=np.uint8)) for _ in range(MAX_IMAGES)]
        with tempfile.TemporaryDirectory() as out:
            attention_log = AttentionLog(1, photos, side, epochs=1, output_dir=Path(out))
            wall, cpu = median_seconds(functools.partial(attention_log.write, 0, model), args.repeats)
        print(f"{name}: {wall:.3f} s wall, {cpu:.3f} s CPU per logged epoch")


if __name__ == "__main__":
    main()
