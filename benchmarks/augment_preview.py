"""Write a PNG grid of DINO multi-crops of a real photo, from the CPU path and the batched (GPU) path.

Rows: for each path, a few draws of [global 1, global 2, local 1..N]; local crops are upscaled to the global
size so the grid lines up. The crops are un-normalised for display. Look for sane colours (jitter and
grayscale), blur on most first global crops, solarized (inverted brights) second global crops now and then.

    python benchmarks/augment_preview.py --out preview.png [--device cuda] [--draws 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpool.dino.augment import DataAugmentationDINO, GPUMultiCrop  # noqa: E402

GLOBAL_SCALE, LOCAL_SCALE = (0.25, 1.0), (0.05, 0.25)


def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((500, 375), Image.BICUBIC)


def for_display(crops: list[torch.Tensor], size: int) -> torch.Tensor:
    """Un-normalise to [0, 1] and bring every crop to size x size: (len(crops), 3, size, size)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    shown = []
    for crop in crops:
        crop = (crop.cpu() * std + mean).clamp(0, 1)
        if crop.shape[-1] != size:
            crop = F.interpolate(crop[None], size=(size, size), mode="nearest")[0]
        shown.append(crop)
    return torch.stack(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("preview.png"))
    parser.add_argument("--draws", type=int, default=3, help="rows per path")
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="device for the batched path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    image = photo()
    cpu_path = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, args.local_crops)
    rows = [for_display(cpu_path(image), 224) for _ in range(args.draws)]

    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(args.device)
    # another seed: with the same one both paths would draw the same first decisions
    batched_path = GPUMultiCrop(
        GLOBAL_SCALE, LOCAL_SCALE, args.local_crops, generator=torch.Generator().manual_seed(args.seed + 1)
    )
    views = batched_path([pixels] * args.draws)  # one batch: each row is one sample of the batch
    rows += [for_display([view[i] for view in views], 224) for i in range(args.draws)]

    grid = torch.cat(rows)
    torchvision.utils.save_image(grid, args.out, nrow=2 + args.local_crops, padding=4, pad_value=1.0)
    print(
        f"wrote {args.out}: {args.draws} rows from the CPU path, then {args.draws} from the batched path "
        f"({args.device}); columns: global 1, global 2, {args.local_crops} local crops"
    )


if __name__ == "__main__":
    main()
