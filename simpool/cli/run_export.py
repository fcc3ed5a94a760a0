"""Export the backbone of a DINO checkpoint to OUT_DIR/model.safetensors + OUT_DIR/config.json.

    simpool-export runs/vits/checkpoint.pth exports/vits                               # teacher, as trained
    simpool-export runs/vits/checkpoint.pth exports/vits_student --which student
    simpool-export dino_deitsmall16_pretrain.pth exports/dino_vits --arch vit_small --mode official
    simpool-export runs/vits/checkpoint.pth exports/vits --onnx                        # + model.onnx

(``python utils/export_backbone.py ...`` is the same command.) OUT_DIR is written whole: into a folder beside it
that then replaces it in one rename (an existing export there is replaced, files and all; a folder holding
anything else is refused), under a lock beside it (``.OUT_DIR.simpool.lock``: one export into a folder at a
time). Architecture flags default to the checkpoint's
recorded training args; backbone-only files record none, so they need --arch and --mode. ``--onnx`` also writes
OUT_DIR/model.onnx (dynamic batch, height and width; needs ``pip install 'simpool[onnx]'``) and checks it
against torch with onnxruntime at two input sizes. Official-mode models
also get OUT_DIR/timm_model.safetensors, a plain timm state dict (see simpool/export.py). Load the export with
``simpool.load_backbone(OUT_DIR)`` or ``torch.hub.load(REPO, "backbone", path=OUT_DIR, source="local")``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simpool.attention_maps import model_stride
from simpool.export import (
    ONNX_FILE,
    check_replaceable,
    export_backbone,
    export_onnx,
    onnx_max_relative_error,
    remove_stale_staging,
    require_onnx,
)
from simpool.loading import CONFIG_FILE, is_export_dir, load_backbone, model_builder
from simpool.run.config import IMAGE_SIDE, FlagParser, bad_input, check_ranges
from simpool.run.flags import add_backbone_flags, backbone_flags, check_gamma
from simpool.run.lock import LOCK_NAME, lock_folder
from simpool.run.model_check import checked_build, parameter_count
from simpool.run.output import check_output_folder, float32_bytes
from simpool.run.process import driver


def get_args_parser() -> FlagParser:
    parser = FlagParser("simpool-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="a training checkpoint (ours, DINO's, the SimPool fork's) or a backbone-only file"
    )
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--which", default="teacher", choices=["teacher", "student"],
                        help="which network of a DINO checkpoint (default: teacher, the one DINO evaluates)")
    parser.add_argument("--onnx", action="store_true",
                        help=f"also write OUT_DIR/{ONNX_FILE} (dynamic batch/height/width; needs the onnx extra)")
    parser.add_argument("--onnx_image_size", default=None, type=int,
                        help="side of the example input the ONNX graph is traced with (default: the model's)")
    add_backbone_flags(parser)
    return parser


def write_onnx(out, image_size: int | None) -> None:
    """``out/model.onnx`` from the export files in ``out`` (the folder being written), and its onnxruntime-vs-torch
    check at two sizes."""
    model = load_backbone(out)
    path = export_onnx(model, out / ONNX_FILE, image_size)
    side = image_size or model.build_kwargs.get("img_size", 224)
    stride = model_stride(model)
    other = (max(stride, side * 3 // 4 // stride * stride), side + stride)  # another, non-square size
    error = onnx_max_relative_error(model, path, [(2, 3, side, side), (1, 3, *other)])
    print(f"wrote {path.name}: onnxruntime matches torch to {error:.1e} (max relative) at {side}x{side} and "
          f"{other[0]}x{other[1]}")


def check_output(args) -> Path:
    """OUT_DIR, checked before any weight is read: replaceable (absent, empty or an export), not below a file, its
    parent writable (the new export is renamed into place there) with room for the files (the model built on the
    meta device: its parameters, twice for official mode's timm copy, once more with --onnx)."""
    out = Path(args.out_dir)
    check_gamma(args)
    check_replaceable(out)
    if is_export_dir(args.checkpoint):
        raise ValueError(f"{args.checkpoint!r} is an export folder already: pass the training checkpoint")
    model = checked_build(model_builder(args.checkpoint, args.which, **backbone_flags(args)),
                          f"the model of {args.checkpoint}")
    copies = 1 + (model.mode == "official") + bool(args.onnx)
    check_output_folder(out.parent if out.is_dir() else out, float32_bytes(parameter_count(model) * copies),
                        flag="OUT_DIR", fix="pick another OUT_DIR")
    return out


def claim(out: Path) -> None:
    """Before the export's first write: its parent created, the lock beside OUT_DIR taken, stale working folders of
    a killed export removed (safe under the lock)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_folder(out.parent, "OUT_DIR", name=f".{out.name}{LOCK_NAME}", target=out)
    remove_stale_staging(out)


@driver
def main(argv: list[str] | None = None) -> int:
    """Export, then print what was written (and the timm call for official-mode models); 2 on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        check_ranges(args, {"onnx_image_size": IMAGE_SIDE})
        if args.onnx:
            require_onnx()  # before any work: a missing extra stops with the pip command
        out = check_output(args)
        onnx = (lambda folder: write_onnx(folder, args.onnx_image_size)) if args.onnx else None
        out = export_backbone(args.checkpoint, out, which=args.which, extra=onnx, claim=claim, **backbone_flags(args))
    except ValueError as err:  # CheckpointError and OnnxUnavailable included
        return bad_input(err)
    config = json.loads((out / CONFIG_FILE).read_text())
    print(f"exported {config['arch']} ({config['mode']} mode, gamma {config['gamma']}, "
          f"embed_dim {config['embed_dim']}) to {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}  {path.stat().st_size / 2**20:.1f} MiB")
    if config["timm"]:
        print(f"timm: timm.create_model({config['timm']['model_name']!r}, pretrained=True, num_classes=0, "
              f"pretrained_cfg_overlay=dict(file={str(out / config['timm']['file'])!r}), "
              f"**{config['timm']['kwargs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
