"""Export the backbone of a DINO checkpoint to OUT_DIR/model.safetensors + OUT_DIR/config.json.

    simpool-export runs/vits/checkpoint.pth exports/vits                               # teacher, as trained
    simpool-export runs/vits/checkpoint.pth exports/vits_student --which student
    simpool-export dino_deitsmall16_pretrain.pth exports/dino_vits --arch vit_small --mode official

(``python utils/export_backbone.py ...`` is the same command.) Architecture flags default to the checkpoint's
recorded training args; backbone-only files record none, so they need --arch and --mode. Official-mode models
also get OUT_DIR/timm_model.safetensors, a plain timm state dict (see simpool/export.py). Load the export with
``simpool.load_backbone(OUT_DIR)`` or ``torch.hub.load(REPO, "backbone", path=OUT_DIR, source="local")``.
"""

from __future__ import annotations

import argparse
import json
import sys

from simpool.export import export_backbone
from simpool.flags import add_backbone_flags, backbone_flags, bad_input
from simpool.loading import CONFIG_FILE


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a simpool backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="a training checkpoint (ours, DINO's, the SimPool fork's) or a backbone-only file"
    )
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--which", default="teacher", choices=["teacher", "student"],
                        help="which network of a DINO checkpoint (default: teacher, the one DINO evaluates)")
    add_backbone_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export, then print what was written (and the timm call for official-mode models); 2 on bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        out = export_backbone(args.checkpoint, args.out_dir, which=args.which, **backbone_flags(args))
    except ValueError as err:  # CheckpointError included
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
