"""DINO's other evaluators (retrieval, copy detection, DAVIS video segmentation): scores and speed.

``--part scores``: each evaluator on generated data in its authors' layout, the demo checkpoint
(tests/fixtures/demo_backbone) against the same network at random initialisation.

``--part speed``: ours against DINO's own script on the same generated input and the same weights (a random
DINO ViT-S/16, official mode), both as fresh processes on the CPU (start-up and model build included, our feature
cache empty). DINO's scripts are not part of this repository: pass ``--dino_repo`` pointing to a copy of
facebookresearch/dino that can start on a CPU (see benchmarks/RESULTS.md for the exact changes) and, for the
video script, ``--dino_pythonpath`` holding cv2. Both sides' scores are printed too: same weights, same protocol.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/dino_evaluators.py --part scores
    OMP_NUM_THREADS=2 python benchmarks/dino_evaluators.py --part speed --dino_repo /tmp/dino \\
        --dino_pythonpath /tmp/dinolibs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simpool.data.davis import read_annotation, read_davis  # noqa: E402
from simpool.data.generated.copydays import write_copydays_style  # noqa: E402
from simpool.data.generated.davis import write_davis_style  # noqa: E402
from simpool.data.generated.revisitop import write_revisitop_style  # noqa: E402
from simpool.evaluation.davis_metrics import evaluate_video, summarize  # noqa: E402

DEMO = REPO / "tests" / "fixtures" / "demo_backbone"
RANDOM_DEMO = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "7", "--model_overrides",
               "depth=4", "embed_dim=96", "num_heads=3"]


def timed(command: list[str], cwd: Path = REPO, extra_path: str | None = None) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), extra_path) if p)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def ours(module: str, flags: list[str]) -> tuple[float, str]:
    return timed([sys.executable, "-m", f"simpool.evaluation.{module}", *flags, "--use_cuda", "False"])


def make_data(root: Path, long_side: int, frames: tuple[int, int], davis_size: tuple[int, int], n: dict) -> None:
    write_revisitop_style(root / "rev", "roxford5k", num_queries=n["queries"], easy=3, hard=2, junk=2,
                          negatives=n["negatives"], long_side=long_side)
    write_copydays_style(root / "cd", num_originals=n["originals"], distractors=n["distractors"],
                         whitening=n["whitening"], size=(long_side * 3 // 4, long_side))
    write_davis_style(root / "davis", num_videos=frames[0], num_frames=frames[1], size=davis_size)


def score_part(root: Path) -> None:
    make_data(root, 160, (4, 12), (96, 160), {"queries": 10, "negatives": 60, "originals": 20, "distractors": 40,
                                               "whitening": 60})
    rows = []
    for name, model in (("demo checkpoint", ["--pretrained_weights", str(DEMO)]), ("random init", RANDOM_DEMO)):
        out = root / name.replace(" ", "_")
        ours("run_retrieval", [*model, "--data_path", str(root / "rev"), "--imsize", "112", "--output_dir",
                               str(out), "--num_workers", "0"])
        ret = json.loads((out / "retrieval_roxford5k.json").read_text())
        ours("run_copy_detection", [*model, "--data_path", str(root / "cd" / "copydays"), "--imsize", "112",
                                    "--whitening_path", str(root / "cd" / "whitening"), "--distractors_path",
                                    str(root / "cd" / "distractors"), "--output_dir", str(out), "--num_workers", "0"])
        cd = json.loads((out / "copy_detection.json").read_text())
        ours("run_video_segmentation", [*model, "--data_path", str(root / "davis"), "--short_side", "96",
                                        "--output_dir", str(out / "davis")])
        vs = json.loads((out / "davis" / "video_segmentation.json").read_text())
        rows.append((name, ret["medium"]["map"], ret["hard"]["map"], cd["map"]["strong"],
                     np.mean([v for k, v in cd["map"].items() if k.startswith("jpegqual")]),
                     np.mean([v for k, v in cd["map"].items() if k.startswith("crops")]),
                     vs["J&F-Mean"], vs["J-Mean"], vs["F-Mean"]))
    print("| model | retrieval mAP M | retrieval mAP H | copydays strong | jpegqual (mean) | crops (mean) "
          "| DAVIS J&F | J | F |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, *values in rows:
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")


def dino_davis_scores(results: Path, data: Path) -> float:
    per_video = {}
    for video in read_davis(data):
        truth = np.stack([read_annotation(p) for p in video.annotations])
        pred = np.stack([read_annotation(results / video.name / f"{f.stem}.png") for f in video.frames])
        per_video[video.name] = evaluate_video(truth, pred)
    return summarize(per_video)["J&F-Mean"]


def speed_part(root: Path, dino: Path, dino_path: str | None, n_db: int, frames: int,
               only: tuple[str, ...] = ("retrieval", "copy", "davis")) -> None:
    import torch

    from simpool.models import build_backbone

    make_data(root, 400, (2, frames), (480, 854), {"queries": 10, "negatives": n_db - 70, "originals": 10,
                                                    "distractors": 20, "whitening": 40})
    torch.manual_seed(0)  # timm's and DINO's ViT share parameter names: one file for both
    weights = root / "vits16.pth"
    torch.save(build_backbone("vit_small", mode="official", patch_size=16).state_dict(), weights)
    model = ["--pretrained_weights", str(weights), "--arch", "vit_small", "--mode", "official", "--patch_size", "16"]
    dino_model = ["--pretrained_weights", str(weights), "--arch", "vit_small", "--patch_size", "16"]
    if "retrieval" in only:
        _speed_retrieval(root, dino, model, dino_model, n_db + 10)
    if "copy" in only:
        _speed_copy(root, dino, model, dino_model)
    if "davis" in only:
        _speed_davis(root, dino, dino_path, model, dino_model, 2 * frames)


def _speed_retrieval(root: Path, dino: Path, model: list[str], dino_model: list[str], n_ret: int) -> None:
    python = sys.executable
    t_ours, _ = ours("run_retrieval", [*model, "--data_path", str(root / "rev"), "--output_dir", str(root / "o_ret"),
                                       "--num_workers", "0", "--batch_size_per_gpu", "16"])
    t_dino, log = timed([python, "eval_image_retrieval.py", *dino_model, "--data_path", str(root / "rev"),
                         "--use_cuda", "False", "--num_workers", "0"], cwd=dino)
    ret = json.loads((root / "o_ret" / "retrieval_roxford5k.json").read_text())
    dino_map = re.search(r"mAP M: ([\d.]+), H: ([\d.]+)", log).groups()
    print(f"retrieval ({n_ret} images, imsize 224): ours {t_ours:.1f} s ({100 * t_ours / n_ret:.2f} s/100 img), "
          f"DINO {t_dino:.1f} s ({100 * t_dino / n_ret:.2f} s/100 img), ratio {t_dino / t_ours:.2f}x; mAP M/H ours "
          f"{100 * ret['medium']['map']:.2f}/{100 * ret['hard']['map']:.2f}, DINO {dino_map[0]}/{dino_map[1]}",
          flush=True)


def _speed_copy(root: Path, dino: Path, model: list[str], dino_model: list[str]) -> None:
    python = sys.executable
    n_cd = sum(1 for _ in (root / "cd").rglob("*.jpg"))
    cd_flags = ["--data_path", str(root / "cd" / "copydays"), "--whitening_path", str(root / "cd" / "whitening"),
                "--distractors_path", str(root / "cd" / "distractors"), "--num_workers", "0"]
    t_ours, _ = ours("run_copy_detection", [*model, *cd_flags, "--output_dir", str(root / "o_cd")])
    t_dino, log = timed([python, "eval_copy_detection.py", *dino_model, *cd_flags, "--use_cuda", "False"], cwd=dino)
    cd = json.loads((root / "o_cd" / "copy_detection.json").read_text())
    dino_strong = re.search(r"eval on strong mAP=([\d.]+)", log).group(1)
    print(f"copy detection ({n_cd} images, imsize 320): ours {t_ours:.1f} s ({100 * t_ours / n_cd:.2f} s/100 img), "
          f"DINO {t_dino:.1f} s ({100 * t_dino / n_cd:.2f} s/100 img), ratio {t_dino / t_ours:.2f}x; strong mAP "
          f"ours {cd['map']['strong']:.3f} (centred whitening), DINO {dino_strong} (un-centred)", flush=True)


def _speed_davis(root: Path, dino: Path, dino_path: str | None, model: list[str], dino_model: list[str],
                 n_frames: int) -> None:
    python = sys.executable
    t_ours, _ = ours("run_video_segmentation", [*model, "--data_path", str(root / "davis"), "--output_dir",
                                                str(root / "o_davis")])
    t_dino, _ = timed([python, "eval_video_segmentation.py", *dino_model, "--data_path", str(root / "davis"),
                       "--output_dir", str(root / "d_davis")], cwd=dino, extra_path=dino_path)
    vs = json.loads((root / "o_davis" / "video_segmentation.json").read_text())
    print(f"video segmentation ({n_frames} frames of 854x480): ours {t_ours:.1f} s ({t_ours / n_frames:.2f} s/frame), "
          f"DINO {t_dino:.1f} s ({t_dino / n_frames:.2f} s/frame), ratio {t_dino / t_ours:.2f}x; J&F ours "
          f"{vs['J&F-Mean']:.4f}, DINO's PNGs {dino_davis_scores(root / 'd_davis', root / 'davis'):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["scores", "speed"], default="scores")
    parser.add_argument("--dino_repo", type=Path, default=Path("/tmp/dino"))
    parser.add_argument("--dino_pythonpath", default=None, help="extra PYTHONPATH for DINO's scripts (cv2)")
    parser.add_argument("--database", type=int, default=200, help="speed: revisitop database images")
    parser.add_argument("--frames", type=int, default=8, help="speed: frames per DAVIS video (2 videos)")
    parser.add_argument("--only", nargs="+", default=["retrieval", "copy", "davis"],
                        choices=["retrieval", "copy", "davis"], help="speed: which evaluators")
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated data (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        if args.part == "scores":
            score_part(root)
        else:
            speed_part(root, args.dino_repo, args.dino_pythonpath, args.database, args.frames, tuple(args.only))


if __name__ == "__main__":
    main()
