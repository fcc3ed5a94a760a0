"""Benchmark: SimPool's own tables (localisation, object discovery, background robustness) on generated data in the
authors' layouts, for the demo checkpoint and the same network at random initialisation, with the time each
evaluator takes per 1,000 images next to a forward pass over the same images (the baseline: the ratio is what the
protocol costs beyond the network).

Data (fashion-on-photos, rendered once into ``--out_dir/data``): wsolevaluation's layout (``--images`` images,
96 px high, aspect 1.25), PASCAL VOC07 detection and COCO20k (``--images`` each, 96 px high, full resolution as LOST
reads them), the backgrounds challenge's eight IN-9 variants (``--in9_images`` per variant, 56 px) and
``original/train`` (``--in9_train`` images) for the probe (9-way, trained by ``eval_linear.py --cached_features``:
no ImageNet-1k offline). Models: the demo export ``tests/fixtures/demo_backbone`` (SimPool ViT, patch 7, trained on
Fashion-MNIST at 28 px), the same architecture at random initialisation in SimPool mode and in official mode.

Usage (as the numbers in benchmarks/RESULTS.md were taken)::

    OMP_NUM_THREADS=1 python benchmarks/paper_tables.py                    # ~10 min on 2 loaded CPU cores
    OMP_NUM_THREADS=1 python benchmarks/paper_tables.py --images 20 --in9_images 18 --in9_train 54   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from simpool.attention_maps import attention_maps  # noqa: E402
from simpool.data.bg_challenge import find_variants, in9_folder  # noqa: E402
from simpool.data.generated.bg_challenge import write_bg_challenge  # noqa: E402
from simpool.data.generated.coco20k import write_coco20k  # noqa: E402
from simpool.data.generated.voc_detection import write_voc_detection  # noqa: E402
from simpool.data.generated.wsol import write_wsol  # noqa: E402
from simpool.data.voc_boxes import read_voc_boxes  # noqa: E402
from simpool.data.wsol import read_wsol  # noqa: E402
from simpool.evaluation import (  # noqa: E402
    run_background_robustness,
    run_linear,
    run_localization,
    run_object_discovery,  # noqa: E402
)
from simpool.evaluation.object_discovery import padded_tensor  # noqa: E402
from simpool.evaluation.run_background_robustness import in9_transform  # noqa: E402
from simpool.evaluation.run_localization import WsolImages  # noqa: E402
from simpool.loading import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "fixtures" / "demo_backbone"
NETWORK = ["--arch", "vit_tiny", "--patch_size", "7", "--model_overrides", "depth=4", "embed_dim=96", "num_heads=3",
           "img_size=28"]
MODELS = {
    "demo (SimPool, trained)": ["--pretrained_weights", str(DEMO)],
    "same network, random init (SimPool)": ["--random_init", "--mode", "simpool", *NETWORK],
    "same network, random init (official)": ["--random_init", "--mode", "official", *NETWORK],
}
LOC_SIZE = 112  # 16 x 16 patches of 7


def quiet(function, argv: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = function(argv)
    return code, time.perf_counter() - start


@torch.no_grad()
def forward_seconds(flags: list[str], task: str, data) -> float:
    """The baseline: the network's own forward pass over the evaluator's images (batched as the evaluator is)."""
    weights = flags[1] if flags[0] == "--pretrained_weights" else None
    mode = flags[flags.index("--mode") + 1] if "--mode" in flags else None
    kwargs = {} if weights else {"arch": "vit_tiny", "patch_size": 7, "depth": 4, "embed_dim": 96, "num_heads": 3,
                                 "img_size": 28}
    model, _ = load_model(weights, random_init=weights is None, mode=mode, **kwargs)
    start = time.perf_counter()
    if task == "localization":
        loader = torch.utils.data.DataLoader(WsolImages(data, range(len(data)), LOC_SIZE), batch_size=32)
        for images, _ in loader:
            attention_maps(model, images)
    elif task == "discovery":
        for i in range(len(data)):
            attention_maps(model, padded_tensor(data[i][1], 7)[0])
    else:
        for dataset in data:
            for images, _ in torch.utils.data.DataLoader(dataset, batch_size=64):
                model(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=200, type=int, help="images per localisation / discovery data set")
    parser.add_argument("--in9_images", default=90, type=int, help="test images per IN-9 variant")
    parser.add_argument("--in9_train", default=450, type=int, help="IN-9 training images for the probe")
    parser.add_argument("--out_dir", default="runs/paper_tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    data = out / "data"
    images, metadata = write_wsol(data / "wsol", args.images, image_size=96)
    write_voc_detection(data / "voc", args.images, image_size=96)
    coco = write_coco20k(data / "coco", args.images, image_size=96)
    write_bg_challenge(data / "in9", n_val=args.in9_images, n_train=args.in9_train, image_size=56)
    wsol, voc = read_wsol(images, metadata), read_voc_boxes(data / "voc")
    variants = [in9_folder(p, in9_transform(56)) for p in find_variants(data / "in9").values()]
    common = ["--num_workers", "0", "--no_progress"]
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
                     "load_before": os.getloadavg(), "models": {}, "timing": {}}
    for name, flags in MODELS.items():
        slug = "".join(c if c.isalnum() else "_" for c in name)
        row, timing = {}, {}
        runs = {
            "localization": (run_localization.main, [*flags, *common, "--data_path", str(images), "--metadata",
                                                     str(metadata), "--image_size", str(LOC_SIZE)]),
            "discovery VOC07": (run_object_discovery.main, [*flags, *common, "--data_path", str(data / "voc")]),
            "discovery COCO20k": (run_object_discovery.main, [*flags, *common, "--data_path", str(coco["images"]),
                                                              "--annotations", str(coco["annotations"]),
                                                              "--image_list", str(coco["image_list"])]),
        }
        for task, (function, argv) in runs.items():
            folder = out / slug / task.replace(" ", "_")
            code, seconds = quiet(function, [*argv, "--output_dir", str(folder)])
            assert code == 0, (name, task)
            json_name = "localization.json" if task == "localization" else "object_discovery.json"
            result = json.loads((folder / json_name).read_text())
            row[task] = result["rows"]
            timing[task] = {"seconds": seconds, "images": result["num_images"]}
        probe = out / slug / "linear"
        code, seconds = quiet(run_linear.main, [*flags, "--data_path", str(data / "in9" / "original"), "--image_size",
                                                "56", "--cached_features", "True", "--epochs", "30", "--lrs", "0.01",
                                                "0.1", "1.0", "--batch_size_per_gpu", "64", "--num_workers", "0",
                                                "--output_dir", str(probe)])
        assert code == 0, (name, "probe")
        folder = out / slug / "in9"
        code, seconds = quiet(run_background_robustness.main, [*flags, *common, "--probe", str(probe), "--data_path",
                                                               str(data / "in9"), "--image_size", "56",
                                                               "--output_dir", str(folder)])
        assert code == 0, (name, "in9")
        result = json.loads((folder / "background_robustness.json").read_text())
        row["IN-9"] = result["rows"]
        timing["IN-9 (8 variants)"] = {"seconds": seconds, "images": sum(result["num_images"].values())}
        timing["forward: localization"] = forward_seconds(flags, "localization", wsol)
        timing["forward: discovery VOC07"] = forward_seconds(flags, "discovery", voc)
        timing["forward: IN-9"] = forward_seconds(flags, "in9", variants)
        results["models"][name], results["timing"][name] = row, timing
        print(f"\n## {name}")
        for task, rows in row.items():
            print(f"  {task}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows.items()))
        for task, forward in (("localization", "forward: localization"),
                              ("discovery VOC07", "forward: discovery VOC07"), ("IN-9 (8 variants)", "forward: IN-9")):
            t = timing[task]
            per_k = 1000 * t["seconds"] / t["images"]
            print(f"  time {task}: {per_k:.1f} s per 1,000 images ({t['images']} images), forward pass alone "
                  f"{1000 * timing[forward] / t['images']:.1f} s: x{t['seconds'] / timing[forward]:.1f}")
    results["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nload average before {results['load_before']}, after {results['load_after']}; {out / 'results.json'}")


if __name__ == "__main__":
    main()
