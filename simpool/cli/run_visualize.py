"""Draw a backbone's attention maps over images: heat-map overlays and DINO's 60%-mass masks, as PNGs.

    simpool-visualize --pretrained_weights exports/vits --image_path cat.jpg --output_dir v
    simpool-visualize --pretrained_weights runs/vits/checkpoint.pth \
        --image_path photos/ --output_dir viz \
        --compare dino_deitsmall16_pretrain.pth --compare_arch vit_small --compare_mode official

(``simpool-visualize`` is the installed script; ``python utils/visualize_attention.py`` runs the same main.)

--pretrained_weights is an export folder (utils/export_backbone.py) or a checkpoint: for a checkpoint the
architecture comes from its training args unless --arch/--mode/... are given (backbone-only files need them).
SimPool models show SimPool's attention; official ViTs their last block's [CLS] attention, per head and
averaged. The shorter side of each image is scaled to --image_size and both sides are rounded to multiples of
the patch size (a resize, no crop); every PNG has that size. For each image, OUTPUT_DIR/<image name>/ gets
image.png, then attention.png + mask.png (one map) or attention_head<i>.png, attention_mean.png and the
matching mask_*.png (several heads); with --compare also compare_*.png and the side-by-side compare.png.
Images whose stems clash (photo.jpg, photo.png) get <stem>_<suffix>/ folders; unreadable files are skipped,
named and counted (exit 2 only when none can be read).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from simpool.data.images import BadSample, load_rgb_image
from simpool.loading import load_model
from simpool.run.config import IMAGE_SIDE, FlagParser, Range, bad_input, check_ranges
from simpool.run.flags import add_backbone_flags, backbone_flags
from simpool.run.log import setup_logging
from simpool.run.output import OutputFolder
from simpool.run.process import driver
from simpool.visualize import visualize_image, visualize_pca

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_weights", required=True, help="export folder or checkpoint file")
    parser.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                        help="network of a DINO checkpoint to show (default: teacher)")
    parser.add_argument("--image_path", required=True, help="an image file, or a folder of images")
    parser.add_argument("--output_dir", default="attention_maps", help="where the PNGs go")
    parser.add_argument("--image_size", default=224, type=int,
                        help="shorter side in pixels before rounding to the patch size (0: keep the photo's)")
    parser.add_argument("--keep", default=0.6, type=float, help="attention mass the mask keeps (DINO: 0.6)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_backbone_flags(parser)
    parser.add_argument("--compare", default=None, help="a second export folder / checkpoint, shown beside")
    parser.add_argument("--compare_checkpoint_key", default=None, choices=["teacher", "student"],
                        help="default: --checkpoint_key")
    parser.add_argument("--label", default=None, help="its title in compare.png (default: file name)")
    parser.add_argument("--compare_label", default=None, help="title of --compare (default: its file name)")
    add_backbone_flags(parser, prefix="compare_", what="--compare")
    parser.add_argument("--pca", nargs="?", const="image", default=None, choices=["image", "joint"],
                        help="also write pca.png per image: PCA of the patch features as RGB, background removed "
                        "(--pca: one PCA per image; --pca joint: one colour basis for all the images)")
    return parser


def list_images(path: str | os.PathLike) -> list[Path]:
    """One image file, or every image file directly inside a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return images
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(path)!r}")
    raise ValueError(f"--image_path {str(path)!r} does not exist")


def output_names(images: list[Path]) -> dict[Path, str]:
    """Each image's output folder name: its stem, or ``<stem>_<suffix>`` where stems clash (photo.jpg and
    photo.png would otherwise write into the same folder, the second overwriting the first)."""
    stems: dict[str, int] = {}
    for path in images:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    return {path: path.stem if stems[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
            for path in images}


def load_models(args: argparse.Namespace) -> list[tuple[str, torch.nn.Module]]:
    """The model and, with --compare, the second one: (label, model in eval mode on --device) pairs."""
    model, _ = load_model(args.pretrained_weights, args.checkpoint_key, **backbone_flags(args))
    models = [(args.label or Path(args.pretrained_weights).name, model)]
    if args.compare:
        key = args.compare_checkpoint_key or args.checkpoint_key
        other, _ = load_model(args.compare, key, **backbone_flags(args, prefix="compare_"))
        models.append((args.compare_label or Path(args.compare).name, other))
    return [(label, model.to(args.device).eval()) for label, model in models]


@driver
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad flags, images or weights, with ``error: ...`` on stderr)."""
    setup_logging()
    args = get_args_parser().parse_args(argv)
    try:
        check_ranges(args, {"image_size": Range(0, IMAGE_SIDE.high), "keep": Range(0, 1, low_open=True)})
        output = OutputFolder(args.output_dir).check()  # writable, and locked if it exists: one run per folder
        images = list_images(args.image_path)
        models = load_models(args)
        output.claim()
        names = output_names(images)
        skipped = []
        for image_path in images:
            decoded = load_rgb_image(str(image_path))
            if isinstance(decoded, BadSample):  # one bad file must not cost the remaining images
                log.warning("skipping unreadable image %s: %s", image_path, decoded.reason)
                skipped.append(image_path.name)
                continue
            out = Path(args.output_dir) / names[image_path]
            written = visualize_image(models, image_path, out, args.image_size or None, args.keep)
            log.info("%s: %d PNGs in %s", image_path, len(written), out)
        if skipped:
            log.warning("%d of %d images skipped as unreadable: %s", len(skipped), len(images), ", ".join(skipped))
        if len(skipped) == len(images):
            raise ValueError(f"none of the {len(images)} image(s) in {args.image_path} could be read")
        if args.pca:
            visualize_pca(models[0][1], images, args.output_dir, args.image_size or None, joint=args.pca == "joint")
    except ValueError as err:  # CheckpointError is a ValueError
        return bad_input(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
