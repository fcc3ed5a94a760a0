"""Optimisers and gradient helpers of the DINO recipe.

- ``get_params_groups``: weight decay only on weights with >= 2 dims (no decay on biases, norm
  weights, SimPool's beta, ...), and the head's prototype layer (``last_layer``) in groups of its own
  marked ``is_last_layer`` (dinov2's layout), so the step can freeze it without a name search.
- ``build_optimizer``: AdamW (ViT, ConvNeXt), SGD with momentum, or ``LARS`` (ResNet); lr and weight
  decay start at 0 and are set every iteration by ``set_schedule_values`` from the schedules.
- ``clip_gradients``: the reference clips every parameter's gradient *separately* to norm ``clip``
  (not the global norm), here with foreach kernels and without reading the norms on the host.

Example (one training iteration ``it``):
    >>> optimizer = build_optimizer("adamw", get_params_groups(student))
    >>> set_schedule_values(optimizer, lr_schedule[it], wd_schedule[it], last_layer_lr=0.0)
    >>> loss.backward()
    >>> norms = clip_gradients(student, 3.0)                      # tensor, one norm per parameter
    >>> optimizer.step()
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "LARS",
    "build_optimizer",
    "clip_gradients",
    "get_params_groups",
    "set_schedule_values",
]

ParamFilter = Callable[[torch.Tensor], bool]

# Device types whose torch build has fused AdamW/SGD kernels that we enable automatically.
_AUTO_FUSED_DEVICE_TYPES = ("cuda",)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (LARS), as in DINO's ``utils.LARS``.

    Written here because torch.optim has no LARS.

    For each parameter p with gradient g (a step with learning rate lr, weight decay wd):

        d = g + wd * p                                   (only if p.ndim != 1)
        d = d * eta * ||p|| / ||d||                      (only if p.ndim != 1 and ||p||, ||d|| > 0)
        mu = momentum * mu + d
        p = p - lr * mu

    Parameters with one dimension (biases, norm weights) skip both weight decay and the adaptation.
    ``weight_decay_filter`` / ``lars_adaptation_filter`` (accepted and ignored by the DINO reference)
    exclude further parameters: a parameter for which the filter returns True is also skipped. The
    momentum buffer is stored as ``state[p]['mu']`` like the reference, so its optimizer states load.

    Example:
        >>> optimizer = LARS(get_params_groups(resnet))   # lr/wd set per iteration by the schedules
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter: ParamFilter | None = None,
        lars_adaptation_filter: ParamFilter | None = None,
    ) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta < 0:
            raise ValueError(
                f"LARS: lr ({lr}), weight_decay ({weight_decay}), momentum ({momentum}) and eta ({eta}) must be >= 0"
            )
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _applies(p: torch.Tensor, extra_filter: ParamFilter | None) -> bool:
        return p.ndim != 1 and not (extra_filter is not None and extra_filter(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        updates = [p.grad for p in params]
        decayed = [i for i, p in enumerate(params) if self._applies(p, group["weight_decay_filter"])]
        if decayed:
            with_decay = torch._foreach_add(
                [updates[i] for i in decayed], [params[i] for i in decayed], alpha=group["weight_decay"]
            )
            for i, d in zip(decayed, with_decay):
                updates[i] = d
        adapted = [i for i, p in enumerate(params) if self._applies(p, group["lars_adaptation_filter"])]
        if adapted:
            param_norms = torch.stack(torch._foreach_norm([params[i] for i in adapted]))
            update_norms = torch.stack(torch._foreach_norm([updates[i] for i in adapted]))
            # Trust ratio, 1 where either norm is 0 (fresh zero-initialised weights, zero gradients).
            ratio = torch.where(
                (param_norms > 0) & (update_norms > 0),
                group["eta"] * param_norms / update_norms,
                torch.ones_like(param_norms),
            )
            scaled = torch._foreach_mul([updates[i] for i in adapted], list(ratio.unbind(0)))
            for i, d in zip(adapted, scaled):
                updates[i] = d
        momenta = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            momenta.append(state["mu"])
        torch._foreach_mul_(momenta, group["momentum"])
        torch._foreach_add_(momenta, updates)
        torch._foreach_add_(params, momenta, alpha=-group["lr"])


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters in up to four groups: (decay, no decay) x (body, last layer).

    Each group carries ``wd_multiplier`` (1.0: weight decay follows the schedule; 0.0: never decayed) and
    ``is_last_layer`` (the head's prototype layer, any parameter under a ``last_layer`` module, which the
    step freezes during the first epochs). Biases and every parameter with at most one dimension (norm
    weights, SimPool ``beta``) are not decayed; the prototypes' ``weight_g`` (K, 1) is, as in the
    reference. Frozen parameters (``requires_grad=False``, e.g. ``weight_g`` with ``norm_last_layer``)
    are left out, and so are empty groups.
    Within a group the parameters keep ``named_parameters`` order.

    Example:
        >>> [(g["wd_multiplier"], g["is_last_layer"], len(g["params"])) for g in get_params_groups(student)]
        [(1.0, False, 15), (0.0, False, 25), (1.0, True, 2)]     # ViT-S SimPool, norm_last_layer False
    """
    # (is_last_layer, decayed) -> parameters; the dict order is the group order.
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {(False, True): [], (False, False): [],
                                                           (True, True): [], (True, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (name.endswith(".bias") or param.ndim <= 1)
        is_last_layer = "last_layer" in name.split(".")
        groups[(is_last_layer, decayed)].append(param)
    return [
        {"params": params, "weight_decay": 0.0, "wd_multiplier": float(decayed), "is_last_layer": is_last_layer}
        for (is_last_layer, decayed), params in groups.items()
        if params
    ]


def _use_fused(param_groups: list[dict[str, Any]]) -> bool:
    params = [p for g in param_groups for p in g["params"]]
    return bool(params) and all(p.device.type in _AUTO_FUSED_DEVICE_TYPES and p.is_floating_point() for p in params)


def build_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    *,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Optimizer by name: 'adamw' | 'sgd' (momentum) | 'lars', created with lr = weight_decay = 0.

    The schedules set both every iteration (``set_schedule_values``) before the first step. ``fused``
    None picks torch's fused AdamW/SGD kernels when every parameter is on CUDA (torch otherwise uses
    its foreach implementation where available); LARS is vectorised with foreach ops.
    """
    key = name.lower()
    if fused is None:
        fused = _use_fused(param_groups) if key in ("adamw", "sgd") else False
    fused_kw = {"fused": True} if fused else {}
    if key == "adamw":
        return torch.optim.AdamW(param_groups, lr=0.0, betas=betas, eps=eps, weight_decay=0.0, **fused_kw)
    if key == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=momentum, weight_decay=0.0, **fused_kw)
    if key == "lars":
        if fused:
            raise ValueError("build_optimizer: LARS has no fused kernel; pass fused=None or False")
        return LARS(param_groups, lr=0.0, weight_decay=0.0, momentum=momentum)
    raise ValueError(f"build_optimizer: unknown optimizer {name!r}; choose 'adamw', 'sgd' or 'lars'")


def set_schedule_values(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float | None = None
) -> None:
    """Set this iteration's values: lr on every group (``last_layer_lr`` on ``is_last_layer`` groups when
    given) and weight decay ``wd * wd_multiplier`` (groups without the key count as decayed)."""
    for group in optimizer.param_groups:
        own_lr = last_layer_lr is not None and group.get("is_last_layer", False)
        group["lr"] = float(last_layer_lr if own_lr else lr)
        group["weight_decay"] = float(wd) * group.get("wd_multiplier", 1.0)


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient separately to L2 norm ``clip``; return the norms before clipping.

    For every parameter with a gradient, g <- g * min(1, clip / (||g|| + 1e-6)), exactly the
    reference's per-parameter rule (torch.nn.utils.clip_grad_norm_ clips the global norm instead).
    Returns a 1-D float32 tensor with one norm per parameter that has a gradient (``named_parameters``
    order) on the gradients' device; nothing is copied to the host.
    """
    if clip <= 0:
        raise ValueError(f"clip_gradients: clip must be > 0, got {clip}; skip the call to disable clipping")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    # foreach kernels need one device and dtype per call.
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, g in enumerate(grads):
        buckets[(g.device, g.dtype)].append(i)
    norms: list[torch.Tensor] = [torch.empty(0)] * len(grads)
    for indices in buckets.values():
        bucket = [grads[i] for i in indices]
        bucket_norms = torch._foreach_norm(bucket)
        coef = clip / (torch.stack(bucket_norms) + 1e-6)
        # where(coef < 1, ...) rather than clamp: like the reference, a NaN norm leaves the gradient as is.
        coef = torch.where(coef < 1, coef, torch.ones_like(coef))
        torch._foreach_mul_(bucket, list(coef.unbind(0)))
        for i, norm in zip(indices, bucket_norms):
            norms[i] = norm
    out_device = grads[0].device
    return torch.stack([n.to(out_device, torch.float32) for n in norms])
