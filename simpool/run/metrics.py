"""Top-k accuracy counts, shared by the linear probe and fine-tuning.

Example:
    >>> num_correct(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]), torch.tensor([2, 0]), topk=(1, 2))
    tensor([1, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["num_correct"]


def num_correct(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int]) -> torch.Tensor:
    """Correct counts ``(..., len(topk))`` for logits ``(..., B, C)``; leading dims are heads. A k above the
    number of classes C counts as C (every label is then in the top k)."""
    max_k = min(max(topk), output.shape[-1])
    ranked = output.topk(max_k, dim=-1).indices
    hit = ranked == target.view(-1, 1)
    return torch.stack([hit[..., : min(k, max_k)].any(dim=-1).sum(dim=-1) for k in topk], dim=-1)
