"""simpool: DINO self-supervised pretraining with SimPool attention pooling on timm backbones.

    >>> from simpool import SimPool, build_backbone, load_pretrained
    >>> pool = SimPool(384, gamma=1.25)                # (B, N, 384) or (B, 384, H, W) -> (B, 384)
    >>> model = build_backbone("vit_small", mode="simpool")
    >>> model, source = load_model("runs/vits/checkpoint.pth")      # any checkpoint or export folder
"""

from simpool.checkpoint import CheckpointError, load_pretrained
from simpool.export import export_backbone
from simpool.loading import load_backbone, load_model
from simpool.models import ARCHS, build_backbone
from simpool.pooling import SimPool

__version__ = "0.1.0"
__all__ = [
    "ARCHS", "CheckpointError", "SimPool", "build_backbone", "export_backbone", "load_backbone", "load_model",
    "load_pretrained",
]
