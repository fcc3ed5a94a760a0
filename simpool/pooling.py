"""SimPool: attention-based global pooling ("Keep It SimPool", Psomas et al., ICCV 2023).

For tokens ``X`` of shape (B, N, d) -- or a feature map (B, d, H, W) flattened to (B, HW, d):

    u0 = mean_j X_j                                 query: GAP of the *un-normalised* tokens
    q  = W_Q u0,   K = W_K LN(X),   V = LN(X)       one shared LayerNorm, no value/output projection
    a  = softmax_j(K_j . q / sqrt(d_h))             per head, d_h = d / heads; ``a`` is the attention map
    u  = sum_j a_j V_j                              gamma = None
    u  = (sum_j a_j (V_j - m + eps)^gamma)^(1/gamma) (+ beta)   gamma > 0, m = min of V over *this sample*

The generalised mean (gamma > 0) needs non-negative values, hence the shift by the sample's minimum ``m``.
The reference implementation took ``m`` over the whole batch, so one image's feature depended on the other
images in its batch; here it is per sample, and that branch runs in float32 even under autocast because
``x ** gamma`` overflows or underflows in half precision.

Example:
    >>> pool = SimPool(384, gamma=1.25, use_beta=True)
    >>> tokens = torch.randn(8, 196, 384)
    >>> pooled, attn = pool(tokens, return_attention=True)
    >>> pooled.shape, attn.shape
    (torch.Size([8, 384]), torch.Size([8, 1, 196]))
"""

from __future__ import annotations

import torch
from torch import nn


class SimPool(nn.Module):
    """SimPool global pooling; parameter names (``wq``, ``wk``, ``norm_patches``, ``beta``) match the reference.

    Args:
        dim: channel width ``d`` of the tokens / feature map.
        num_heads: attention heads; the pooled vector concatenates the heads' ``d / num_heads`` slices.
        qkv_bias: bias in ``W_Q`` and ``W_K`` (the paper uses none).
        qk_scale: logit scale; default ``(d / num_heads) ** -0.5``.
        gamma: exponent of the generalised mean, ``None`` for the plain attention-weighted mean.
            Paper defaults: 1.25 for transformers, 2.0 for convnets.
        use_beta: learnable scalar added after pooling (only with ``gamma``; the self-supervised ViT uses it).
        eps: shift that keeps ``V - m + eps`` strictly positive.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        gamma: float | None = None,
        use_beta: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"SimPool: dim={dim} is not divisible by num_heads={num_heads}")
        if gamma is not None and gamma <= 0:
            raise ValueError(f"SimPool: gamma must be positive or None, got {gamma}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.gamma = None if gamma is None else float(gamma)
        self.eps = eps

        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.beta = nn.Parameter(torch.zeros(1)) if (gamma is not None and use_beta) else None
        for linear in (self.wq, self.wk):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, gamma={self.gamma}, use_beta={self.beta is not None}"

    def _as_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) stays; (B, d, H, W) becomes (B, HW, d). Anything else is a clear error."""
        if x.ndim == 3:
            channels = x.shape[-1]
            expected = f"(B, N, {self.dim})"
        elif x.ndim == 4:
            channels = x.shape[1]
            expected = f"(B, {self.dim}, H, W)"
        else:
            raise ValueError(
                f"SimPool expects tokens (B, N, {self.dim}) or a feature map (B, {self.dim}, H, W), "
                f"got a {x.ndim}-d tensor of shape {tuple(x.shape)}"
            )
        if channels != self.dim:
            raise ValueError(f"SimPool(dim={self.dim}) expects {expected}, got shape {tuple(x.shape)}")
        return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pool ``x`` to (B, d); with ``return_attention`` also return ``a`` of shape (B, heads, N)."""
        tokens = self._as_tokens(x)
        batch, num_tokens, dim = tokens.shape
        heads, head_dim = self.num_heads, dim // self.num_heads

        query = self.wq(tokens.mean(dim=1)).view(batch, heads, 1, head_dim)
        values = self.norm_patches(tokens)
        keys = self.wk(values).view(batch, num_tokens, heads, head_dim).transpose(1, 2)
        values = values.view(batch, num_tokens, heads, head_dim).transpose(1, 2)  # (B, h, N, d_h)

        logits = (query @ keys.transpose(-2, -1)) * self.scale  # (B, h, 1, N)
        attn = logits.float().softmax(dim=-1)

        if self.gamma is None:
            pooled = attn.to(values.dtype) @ values
        else:
            pooled = self._generalised_mean(attn, values)
        pooled = pooled.reshape(batch, dim)
        if self.beta is not None:
            pooled = pooled + self.beta
        if return_attention:
            return pooled, attn.squeeze(2)
        return pooled

    def _generalised_mean(self, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # float32 with autocast off: (v - m + eps) ** gamma spans many decades for gamma >= 2.
        with torch.autocast(device_type=values.device.type, enabled=False):
            values = values.float()
            sample_min = values.amin(dim=(1, 2, 3), keepdim=True)  # per sample, never across the batch
            powered = (values - sample_min + self.eps).pow(self.gamma)
            return (attn @ powered).pow(1.0 / self.gamma)


def pooled_attention_grid(attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reshape SimPool's attention (B, heads, H*W) to a map (B, heads, H, W)."""
    if attn.shape[-1] != height * width:
        raise ValueError(f"attention over {attn.shape[-1]} tokens cannot form a {height}x{width} grid")
    return attn.unflatten(-1, (height, width))


__all__ = ["SimPool", "pooled_attention_grid"]
