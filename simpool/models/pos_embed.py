"""Resampling a ViT's patch position embeddings to another patch grid: the two rules, eager and traced for ONNX.

The embeddings of an ``s x s`` grid, (1, s*s, d), are resampled to an ``h x w`` grid by bicubic interpolation
(align_corners False, no antialias):

* ``"exact"`` (our models): unchanged when (h, w) = (s, s), else ``F.interpolate(size=(h, w))``, i.e. the
  sampling step is s/h (resp. s/w);
* ``"reference"`` (DINO / the SimPool fork): ``F.interpolate(scale_factor=((h + 0.1) / s, (w + 0.1) / s))``, so
  the step is s / (h + 0.1) and the positions move even when the sizes agree; only official mode (with its [CLS]
  token) passes the reference's "nothing to do" test at (s, s). See :mod:`simpool.models.vit`.

Traced for ONNX (``torch.jit.is_tracing()``), h and w are values of the graph (``Shape`` of the patch embedding's
output), and both rules must stay functions of them, or the graph is frozen to the example's size:

* exact: timm's same-size shortcut is skipped (its ``is_exporting()`` is true for ``torch.export`` only, not the
  TorchScript tracer), so the graph always holds a ``Resize`` to (h, w), which is the identity at (s, s);
* reference: the sampling step s / (h + 0.1) is computed in the graph (1, the identity, where official mode skips
  resampling) and the bicubic resampling is written out as two matrices, ``A_h @ grid @ A_w^T``
  (:func:`bicubic_matrix`): ``F.interpolate`` takes only Python numbers as ``scale_factor``, and onnxruntime's
  ``Resize`` copies its input when the output size equals the input size, whatever the scale (at 224 px, 14 -> 14).

Example:
    >>> pe = torch.randn(1, 14 * 14, 384)
    >>> resample_patch_pos_embed(pe, 10, 15, rule="reference", official=False).shape
    torch.Size([1, 150, 384])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

__all__ = ["POS_EMBED_RESAMPLING", "bicubic_matrix", "resample_patch_pos_embed"]

POS_EMBED_RESAMPLING = ("exact", "reference")

# The reference adds 0.1 to the new grid side before dividing (a guard against floor() rounding 13.999 down).
REFERENCE_OFFSET = 0.1


def resample_patch_pos_embed(patch_pe: torch.Tensor, grid_h: int, grid_w: int, rule: str,
                             official: bool) -> torch.Tensor:
    """(1, s*s, d) patch position embeddings -> (1, grid_h * grid_w, d) by ``rule`` (see the module docstring)."""
    side = int(math.sqrt(patch_pe.shape[1]))
    tracing = torch.jit.is_tracing()
    if rule == "exact":
        if tracing:
            return _to_tokens(F.interpolate(_to_grid(patch_pe, side), size=(grid_h, grid_w), mode="bicubic",
                                            align_corners=False))
        # plain bicubic, as our models are trained: timm's default antialias changes grids that shrink (96 px crops)
        return resample_abs_pos_embed(patch_pe, new_size=[grid_h, grid_w], old_size=[side, side],
                                      num_prefix_tokens=0, interpolation="bicubic", antialias=False)
    if rule != "reference":
        raise ValueError(f"pos_embed_resampling must be one of {POS_EMBED_RESAMPLING}, got {rule!r}")
    if tracing:
        return _to_tokens(_traced_reference_resample(_to_grid(patch_pe, side), side, grid_h, grid_w, official))
    if official and grid_h * grid_w == side * side and grid_h == grid_w:
        return patch_pe  # the reference's "nothing to do" test, which only official mode (with [CLS]) passes
    # Ours, not timm's: the reference samples at a scale_factor of (h + 0.1) / s, which no target size gives.
    grid = F.interpolate(_to_grid(patch_pe, side), mode="bicubic", align_corners=False,
                         scale_factor=((grid_h + REFERENCE_OFFSET) / side, (grid_w + REFERENCE_OFFSET) / side))
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position embeddings resampled to {tuple(grid.shape[-2:])}, not {(grid_h, grid_w)}")
    return _to_tokens(grid)


def _to_grid(patch_pe: torch.Tensor, side: int) -> torch.Tensor:
    return patch_pe.reshape(1, side, side, -1).permute(0, 3, 1, 2)


def _to_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.permute(0, 2, 3, 1).flatten(1, 2)


def _traced_reference_resample(grid: torch.Tensor, side: int, grid_h: torch.Tensor | int,
                               grid_w: torch.Tensor | int, official: bool) -> torch.Tensor:
    """The reference rule as graph arithmetic: out = A_h @ grid @ A_w^T with bicubic matrices of step s / (h + 0.1),
    or the identity (step 1) where official mode keeps (s, s)."""
    grid_h, grid_w = (v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in (grid_h, grid_w))
    step_h = side / (grid_h.float() + REFERENCE_OFFSET)
    step_w = side / (grid_w.float() + REFERENCE_OFFSET)
    if official:
        unchanged = (grid_h == side) & (grid_w == side)
        step_h = torch.where(unchanged, torch.ones_like(step_h), step_h)
        step_w = torch.where(unchanged, torch.ones_like(step_w), step_w)
    rows = bicubic_matrix(grid_h, side, step_h).to(grid.dtype)
    cols = bicubic_matrix(grid_w, side, step_w).to(grid.dtype)
    return rows @ grid @ cols.transpose(0, 1)


def _cubic_near(t: torch.Tensor, a: float) -> torch.Tensor:  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1


def _cubic_far(t: torch.Tensor, a: float) -> torch.Tensor:  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a


def bicubic_matrix(out_len: torch.Tensor | int, in_len: int, step: torch.Tensor | float,
                   a: float = -0.75) -> torch.Tensor:
    """(out_len, in_len) matrix M with ``M @ v`` = PyTorch's bicubic resampling of v (align_corners False).

    PyTorch's kernel, written out so that a traced graph keeps ``out_len`` and ``step`` (1 / scale_factor) as
    values (ONNX ``Resize`` would do, but onnxruntime copies its input whenever the output has the same size,
    ignoring the scale): output i samples x = (i + 0.5) * step - 0.5 from the inputs floor(x) - 1 ... floor(x) + 2,
    clamped to the border, with Keys' cubic weights (a = -0.75), t = x - floor(x)::

        w = [far(t + 1), near(t), near(1 - t), far(2 - t)]

    Example:
        >>> v = torch.randn(14)
        >>> resampled = F.interpolate(v.view(1, 1, 1, 14), scale_factor=(1, 10.1 / 14), mode="bicubic").view(10)
        >>> torch.allclose(bicubic_matrix(10, 14, 14 / 10.1) @ v, resampled, atol=1e-6)
        True
    """
    source = (torch.arange(out_len, dtype=torch.float32) + 0.5) * step - 0.5
    start = source.floor()
    t = source - start
    weights = torch.stack([_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a), _cubic_far(2 - t, a)], -1)
    taps = (start.long().unsqueeze(-1) + torch.arange(-1, 3)).clamp(0, in_len - 1)  # (out_len, 4)
    picks = (taps.unsqueeze(-1) == torch.arange(in_len)).to(weights.dtype)  # (out_len, 4, in_len)
    return (weights.unsqueeze(-1) * picks).sum(1)
