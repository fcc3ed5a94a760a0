"""DINO projection head and the multi-crop wrapper that feeds it.

The head maps a backbone feature to ``out_dim`` prototype scores:

    h = MLP(x)                          in -> hidden -> ... -> bottleneck (GELU, optional BatchNorm1d)
    z = h / ||h||_2
    logits = W z,   W_k = g_k * v_k / ||v_k||_2      (weight-normalised rows; g_k = 1 and frozen
                                                      when ``norm_last_layer``)

Parameter names are those of facebookresearch/dino (``mlp.0.weight``, ..., ``last_layer.weight_g``,
``last_layer.weight_v``), so reference checkpoints load with ``strict=True`` and checkpoints written
here load in the reference code.

Example:
    >>> head = DINOHead(in_dim=384, out_dim=65536)
    >>> model = MultiCropWrapper(backbone, head)          # backbone: images (B, 3, H, W) -> (B, 384)
    >>> logits = model([global1, global2, local1, ...])   # (sum of the crop batches, 65536)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "MultiCropWrapper", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation along the output dimension.

    ``weight = weight_g * weight_v / ||weight_v||`` with the norm taken over each output row, exactly
    what ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` computes. Written out here because
    that helper is deprecated (hooks) and its replacement, ``torch.nn.utils.parametrizations.weight_norm``,
    renames the parameters ``parametrizations.weight.original0/1``; the reference names ``weight_g`` (out, 1)
    and ``weight_v`` (out, in) must stay for its checkpoints to load.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Same starting direction as the reference: nn.Linear's default (Kaiming-uniform) init.
        direction = nn.Linear(in_features, out_features, bias=False).weight.detach()
        # Registration order g, v as in the reference: optimizer states index parameters by order.
        self.weight_g = nn.Parameter(direction.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(direction.clone())

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight matrix."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    """Linear layers in -> hidden (x nlayers-1) -> bottleneck; indices match the reference's Sequential."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO projection head: MLP, L2 normalisation, weight-normalised prototype layer.

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K (65536 for ViT-S in the paper recipes).
        use_bn: BatchNorm1d after every hidden Linear (the ResNet recipe).
        norm_last_layer: fix the prototype norms ``weight_g`` to 1 (not trained). The paper's ViT-S
            recipe sets it False for better features but less stable training.
        nlayers: number of Linear layers in the MLP (>= 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the normalised embedding fed to the prototypes.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be a positive integer, got {value}")
        # The reference silently clamps nlayers to >= 1; keep that so its configs build the same head.
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # The prototype layer runs in float32 even under autocast: its cosine logits are divided by
        # temperatures of 0.04-0.1 in the loss, so bf16's 3 significant digits would become noise there.
        # It costs little (bottleneck_dim x out_dim per crop, against the backbone's billions of FLOPs).
        with torch.autocast(device_type=x.device.type, enabled=False):
            # eps as in F.normalize's default, like the reference.
            x = F.normalize(x.float(), dim=-1, p=2)
            return self.last_layer(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _group_consecutive_by_shape(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) index ranges of consecutive crops with identical per-sample shape."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[1:] != crops[start].shape[1:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Runs a backbone over a list of crops, one backbone call per run of equal-resolution crops.

    ``forward([g1, g2, l1, ..., l6])`` concatenates g1, g2 (224 px) into one batch and l1..l6 (96 px)
    into another, so the backbone is called twice instead of eight times; the features are
    concatenated in crop order and the head runs once on all of them. Output: (sum_i B_i, out_dim),
    rows ordered crop by crop, which is the layout ``DINOLoss`` expects (it ``chunk``s by crop).

    Unlike the reference, the backbone is not modified (the reference overwrites ``backbone.fc`` and
    ``backbone.head`` with ``nn.Identity``); pass a backbone that returns pooled features, e.g. a timm
    model built with ``num_classes=0``. A backbone returning a tuple contributes its first element.

    Parameter names are ``backbone.*`` and ``head.*`` as in reference checkpoints.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        crops = [x] if isinstance(x, torch.Tensor) else list(x)
        if not crops:
            raise ValueError("MultiCropWrapper: got no crops; pass a list of (B, C, H, W) batches")
        features = []
        for start, end in _group_consecutive_by_shape(crops):
            batch = crops[start] if end - start == 1 else torch.cat(crops[start:end])
            out = self.backbone(batch)
            features.append(out[0] if isinstance(out, tuple) else out)
        return self.head(features[0] if len(features) == 1 else torch.cat(features))
