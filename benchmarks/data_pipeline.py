"""Multi-crop data pipeline throughput on ONE CPU core, JPEG decode included, against the reference.

Pipelines, timed in the same run, interleaved round by round (so machine noise hits all of them alike):

  (a) reference  PIL decode + facebookresearch/dino DataAugmentationDINO (torchvision.transforms v1, PIL ops),
                 re-implemented below exactly as main_dino.py / utils.py write it;
  (b) ours/cpu   PIL decode + simpool.dino.augment.DataAugmentationDINO (uint8/float tensor ops);
                 (b') the same with torchvision.io decoding straight to a uint8 tensor;
  (v) v2         PIL decode + the same recipe built from torchvision.transforms.v2 on the uint8 CHW tensor
                 (RandomResizedCrop, flip, ColorJitter, grayscale, GaussianBlur, RandomSolarize, ToDtype,
                 Normalize), the stock alternative to (b);
  (c) ours/gpu   the CPU share of the batched path as the trainer runs it: PIL decode + DecodeForGPU
                 (simpool.dino.augment); the augmentation runs on the device.

The images are real photos shipped in scikit-image / scikit-learn, resized to ImageNet's typical 500x375
and written as quality-90 JPEGs to a temporary folder. Crops: 2 x 224 + N x 96 (default N = 6), global
scale (0.25, 1), local scale (0.05, 0.25) — the ViT-S/16 recipe. Reported: median images per second of
process CPU time over the rounds (one thread, so that is images/s per core).

``--device cuda`` additionally times GPUMultiCrop on batches of 100 decoded images (uploaded once).

    python benchmarks/data_pipeline.py                 # CPU only, < 2 minutes
    python benchmarks/data_pipeline.py --device cuda   # plus batched augmentation on the GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as v2
from PIL import Image, ImageFilter, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpool.dino.augment import (  # noqa: E402
    DataAugmentationDINO,
    DecodeForGPU,
    GPUMultiCrop,
    pad_images,
    pil_to_uint8_chw,
)

GLOBAL_SCALE = (0.25, 1.0)
LOCAL_SCALE = (0.05, 0.25)

# ----------------------------------------------------------------------------------------------------------
# (a) The reference pipeline, as facebookresearch/dino writes it (main_dino.py + utils.py).
# ----------------------------------------------------------------------------------------------------------


class ReferenceGaussianBlur:
    """utils.GaussianBlur: PIL blur with radius ~ U(0.1, 2.0), applied when random() <= p."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class ReferenceSolarization:
    """utils.Solarization: ImageOps.solarize (threshold 128) when random() < p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class ReferenceDataAugmentationDINO:
    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int) -> None:
        flip_and_color_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        bicubic = T.InterpolationMode.BICUBIC
        self.global_transfo1 = T.Compose(
            [
                T.RandomResizedCrop(224, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                ReferenceGaussianBlur(1.0),
                normalize,
            ]
        )
        self.global_transfo2 = T.Compose(
            [
                T.RandomResizedCrop(224, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                ReferenceGaussianBlur(0.1),
                ReferenceSolarization(0.2),
                normalize,
            ]
        )
        self.local_crops_number = local_crops_number
        self.local_transfo = T.Compose(
            [
                T.RandomResizedCrop(96, scale=local_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                ReferenceGaussianBlur(p=0.5),
                normalize,
            ]
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


# ----------------------------------------------------------------------------------------------------------
# (v) The same recipe from torchvision.transforms.v2 on uint8 CHW tensors.
# ----------------------------------------------------------------------------------------------------------


class V2DataAugmentationDINO:
    """DINO's multi-crop as torchvision.transforms.v2 writes it, on a (3, H, W) uint8 tensor.

    v2's GaussianBlur takes a fixed kernel: 13 taps reach 3 sigma at the largest sigma (2.0), as ours do.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number: int) -> None:
        bicubic = v2.InterpolationMode.BICUBIC

        def view(size: int, scale, blur_p: float, solarize_p: float = 0.0) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(p=0.5),
                    v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                    v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=blur_p),
                    v2.RandomSolarize(threshold=128, p=solarize_p),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                ]
            )

        self.global_transfo1 = view(224, global_crops_scale, blur_p=1.0)
        self.global_transfo2 = view(224, global_crops_scale, blur_p=0.1, solarize_p=0.2)
        self.local_transfo = view(96, local_crops_scale, blur_p=0.5)
        self.local_crops_number = local_crops_number

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def decode_file(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB pixels straight from torchvision.io."""
    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


def pil_loader(path: Path) -> Image.Image:
    """torchvision.datasets.folder.pil_loader, what the reference's ImageFolder uses."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Data and timing
# ----------------------------------------------------------------------------------------------------------


def real_photos() -> list[np.ndarray]:
    """RGB photos shipped inside the scikit-image and scikit-learn wheels (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    photos.extend(load_sample_images().images)
    return [np.ascontiguousarray(p[..., :3]) for p in photos]


def write_imagenet_sized_jpegs(folder: Path, width: int = 500, height: int = 375) -> list[Path]:
    """Each photo resized to cover width x height, centre-cropped, saved as a quality-90 JPEG."""
    paths = []
    for i, photo in enumerate(real_photos()):
        image = Image.fromarray(photo)
        cover = max(width / image.width, height / image.height)
        image = image.resize((round(image.width * cover), round(image.height * cover)), Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        path = folder / f"photo_{i}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(work: Callable[[Path], object], paths: list[Path], count: int) -> float:
    """Images per second of this process's CPU time: on a shared machine, wall time would also count the
    time other processes hold the core."""
    start = time.process_time()
    for i in range(count):
        work(paths[i % len(paths)])
    return count / (time.process_time() - start)


def time_cpu_pipelines(paths: list[Path], local_crops: int, rounds: int, count: int) -> dict[str, list[float]]:
    reference = ReferenceDataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, local_crops)
    ours = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, local_crops)
    stock = V2DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, local_crops)
    decode_for_gpu = DecodeForGPU()
    pipelines = {
        "(a) reference PIL": lambda path: reference(pil_loader(path)),
        "(b) ours, CPU path": lambda path: ours(pil_loader(path)),
        "(b') ours, CPU path, torchvision decode": lambda path: ours(decode_file(path)),
        "(v) torchvision.transforms.v2, uint8 tensor": lambda path: stock(pil_to_uint8_chw(pil_loader(path))),
        "(c) ours, GPU path: CPU share (read+decode)": lambda path: decode_for_gpu(pil_loader(path)),
    }
    # the decode-only path is ~10x faster: give it more images per round for a stable timing
    counts = {name: count * (8 if name.startswith("(c)") else 1) for name in pipelines}
    for work in pipelines.values():  # warm-up: imports, allocator, file cache
        for path in paths:
            work(path)
    results: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, work in pipelines.items():
            results[name].append(images_per_second(work, paths, counts[name]))
    return results


def time_gpu_augmentation(paths: list[Path], local_crops: int, device: str, batch: int = 100) -> float:
    """Wall-clock images/s of GPUMultiCrop on decoded batches, the host-to-device copy of the padded uint8
    batch (from pinned memory, as a DataLoader with pin_memory=True hands it over) included."""
    decoded = [DecodeForGPU()(pil_loader(path)) for path in paths]
    images, sizes = pad_images([decoded[i % len(decoded)] for i in range(batch)])
    is_cuda = device.startswith("cuda")
    images = images.pin_memory() if is_cuda else images
    multicrop = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, local_crops, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    for _ in range(3):
        multicrop(images.to(device, non_blocking=True), sizes)
    sync()
    iterations = 20 if is_cuda else 2  # one CPU thread renders ~25 img/s: keep a CPU run short
    start = time.perf_counter()
    for _ in range(iterations):
        multicrop(images.to(device, non_blocking=True), sizes)
    sync()
    return batch * iterations / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--images", type=int, default=48, help="images per round for (a) and (b)")
    parser.add_argument("--device", default=None, help="also time GPUMultiCrop on this device, e.g. cuda")
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_imagenet_sized_jpegs(Path(tmp))
        print(
            f"{len(paths)} real photos as 500x375 quality-90 JPEGs; 2x224 + {args.local_crops}x96 crops; "
            f"1 thread; median of {args.rounds} interleaved rounds"
        )
        results = time_cpu_pipelines(paths, args.local_crops, args.rounds, args.images)
        baseline = statistics.median(next(iter(results.values())))
        stock = statistics.median(next(rates for name, rates in results.items() if name.startswith("(v)")))
        print(f"{'pipeline':46s} {'img/s':>8s} {'ms/img':>8s} {'vs (a)':>7s} {'vs (v)':>7s}   rounds img/s")
        for name, rates in results.items():
            rate = statistics.median(rates)
            spread = " ".join(f"{r:.0f}" for r in rates)
            print(f"{name:46s} {rate:8.1f} {1e3 / rate:8.2f} {rate / baseline:6.2f}x {rate / stock:6.2f}x   {spread}")
        if args.device is not None:
            rate = time_gpu_augmentation(paths, args.local_crops, args.device)
            print(f"GPUMultiCrop on {args.device}, batch 100, uint8 upload included, wall clock: {rate:.0f} img/s")


if __name__ == "__main__":
    main()
