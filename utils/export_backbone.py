"""Export the backbone of a DINO checkpoint to OUT_DIR/model.safetensors + OUT_DIR/config.json.

    python utils/export_backbone.py runs/vits/checkpoint.pth exports/vits            # teacher, as trained
    python utils/export_backbone.py runs/vits/checkpoint.pth exports/vits_student --which student
    python utils/export_backbone.py dino_deitsmall16_pretrain.pth exports/dino_vits \
        --arch vit_small --mode official

Architecture flags default to the checkpoint's recorded training args; backbone-only files record none, so
they need --arch and --mode. Official-mode models also get OUT_DIR/timm_model.safetensors, a plain timm state
dict (see simpool/export.py). Load the export with ``simpool.export.load_backbone(OUT_DIR)`` or
``torch.hub.load(REPO, "backbone", path=OUT_DIR, source="local")``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing simpool

from simpool.checkpoint import CheckpointError  # noqa: E402
from simpool.export import CONFIG_FILE, add_backbone_flags, backbone_flags, export_backbone  # noqa: E402


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
    args = get_args_parser().parse_args(argv)
    try:
        out = export_backbone(args.checkpoint, args.out_dir, which=args.which, **backbone_flags(args))
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
