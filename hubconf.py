"""torch.hub entry points.

    model = torch.hub.load("path/to/simpool", "backbone", path="exports/vits", source="local")

``path`` is a folder written by ``utils/export_backbone.py`` (config.json + model.safetensors); the model
comes back in eval mode and returns (B, embed_dim) features.
"""

dependencies = ["torch", "timm"]


def backbone(path, **kwargs):
    """An exported simpool backbone (``simpool.loading.load_backbone``); ``device=`` moves it there.

    Args:
        path: the export folder.
        **kwargs: passed to ``load_backbone`` (``device``).
    """
    from simpool.loading import load_backbone  # imported here so that listing the hub entries stays cheap

    return load_backbone(path, **kwargs)
