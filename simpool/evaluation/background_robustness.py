"""Background robustness (Xiao et al., ICLR 2021, MadryLab/backgrounds_challenge): a 1000-way ImageNet classifier
scored on ImageNet-9 and its background variants.

Protocol of the challenge's ``in9_eval.py``: each image (224 x 224 in the release) goes through ``ToTensor`` and
the ImageNet normalisation of the classifier, the top-1 of the 1000 ImageNet logits is mapped to one of the nine
super-classes by :data:`IN_TO_IN9` (indices that belong to none map to -1 and count as wrong), and the accuracy
on a variant is the share of images whose mapped prediction is their folder's class. The table reports IN-9
(``original``), ``mixed_same``, ``mixed_rand``, ``mixed_next`` and the BG-gap = mixed_same - mixed_rand.

The classifier here is a frozen backbone + the linear probe that ``eval_linear.py`` trained on ImageNet-1k (its
``checkpoint.pth.tar``): :func:`load_probe_head` takes the head of one of its learning rates.

Example::

    >>> head = load_probe_head("runs/lin", lr=None)                  # the best head of the probe's last evaluation
    >>> logits = head(features(images))                              # (B, 1000)
    >>> in9_correct(logits.argmax(1), targets)                        # (B,) bool
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simpool.checkpoint import CheckpointError, safe_load

__all__ = ["IN_TO_IN9", "NUM_IMAGENET_CLASSES", "NUM_IN9_CLASSES", "ProbeHead", "in9_correct", "in9_lookup",
           "load_probe_head", "map_to_in9"]

# ImageNet-1k class index ranges (inclusive) of each IN-9 super-class, in IN9_CLASSES order (dog, bird, vehicle,
# reptile, carnivore, insect, instrument, primate, fish). Facts from backgrounds_challenge's in_to_in9.json
# (MadryLab/backgrounds_challenge, the mapping of Xiao et al. 2021); the other 630 indices map to none.
IN_TO_IN9: tuple[tuple[tuple[int, int], ...], ...] = (
    ((151, 170), (173, 268)),
    ((7, 24), (87, 100), (127, 146)),
    ((407, 408), (428, 428), (436, 436), (444, 444), (468, 468), (511, 511), (547, 547), (555, 555), (561, 561),
     (565, 565), (569, 569), (573, 573), (586, 586), (603, 603), (609, 609), (612, 612), (627, 627), (656, 656),
     (661, 661), (665, 665), (670, 671), (675, 675), (690, 690), (705, 705), (717, 717), (734, 734), (751, 751),
     (757, 757), (791, 791), (802, 803), (817, 817), (820, 820), (829, 829), (847, 847), (864, 864), (866, 867),
     (870, 870), (880, 880)),
    ((33, 68),),
    ((269, 280), (286, 299), (356, 362), (387, 388)),
    ((300, 326),),
    ((401, 402), (420, 420), (432, 432), (486, 486), (494, 494), (513, 513), (541, 541), (546, 546), (558, 558),
     (566, 566), (577, 577), (579, 579), (593, 594), (641, 642), (683, 684), (687, 687), (699, 699), (776, 776),
     (822, 822), (875, 875), (881, 881), (889, 889)),
    ((365, 384),),
    ((0, 6), (389, 397)),
)
NUM_IMAGENET_CLASSES = 1000
NUM_IN9_CLASSES = 9


def in9_lookup() -> torch.Tensor:
    """(1000,) int64: the IN-9 class of each ImageNet index, -1 where none."""
    table = torch.full((NUM_IMAGENET_CLASSES,), -1, dtype=torch.int64)
    for super_class, ranges in enumerate(IN_TO_IN9):
        for start, stop in ranges:
            table[start:stop + 1] = super_class
    return table


_LOOKUP = in9_lookup()


def map_to_in9(predictions: torch.Tensor) -> torch.Tensor:
    """ImageNet indices (any shape, in [0, 1000)) -> IN-9 classes, -1 for indices outside the nine.

    Example::

        >>> map_to_in9(torch.tensor([0, 151, 171, 999]))
        tensor([ 8,  0, -1, -1])
    """
    predictions = torch.as_tensor(predictions)
    if predictions.numel() and (int(predictions.min()) < 0 or int(predictions.max()) >= NUM_IMAGENET_CLASSES):
        raise ValueError("predictions must be ImageNet-1k indices in [0, 1000)")
    return _LOOKUP.to(predictions.device)[predictions.long()]


def in9_correct(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the mapped top-1 ImageNet prediction equals the IN-9 target (unmapped predictions are wrong)."""
    return map_to_in9(predictions) == torch.as_tensor(targets, device=predictions.device)


@dataclass
class ProbeHead:
    """One linear head of a saved probe, and what it was trained on."""

    linear: nn.Linear
    lr: float
    source: dict[str, Any]
    n_features: int

    @property
    def num_labels(self) -> int:
        return self.linear.out_features

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))

    def in9_predictions(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) IN-9 classes (-1: an ImageNet class outside the nine) of the top-1 logit."""
        top1 = self(features).argmax(dim=1)
        return top1 if self.num_labels == NUM_IN9_CLASSES else map_to_in9(top1)


def load_probe_head(folder: str | Path, lr: float | None = None, checkpoint_name: str = "checkpoint.pth.tar",
                    probe_format: str = "simpool-linear-probe-2") -> ProbeHead:
    """The head of ``eval_linear.py``'s ``checkpoint.pth.tar`` in ``folder`` (a ``CheckpointError`` otherwise).

    ``lr``: the head trained at that (unscaled) learning rate; None: the head with the best top-1 of the probe's
    last evaluation (its ``best_top1`` when it was never evaluated). The probe has 1000 outputs (ImageNet-1k,
    mapped by :data:`IN_TO_IN9`) or 9 (trained on IN-9 itself: the challenge's ``--in9`` models, no mapping).
    """
    path = Path(folder) / checkpoint_name
    if not path.is_file():
        raise CheckpointError(f"--probe {folder}: no {checkpoint_name}; pass the --output_dir of an eval_linear.py "
                              "run on ImageNet-1k")
    saved = safe_load(path)
    if not isinstance(saved, dict) or saved.get("format") != probe_format:
        raise CheckpointError(f"{path} is not a linear probe written by eval_linear.py: pass its --output_dir")
    if saved.get("num_labels") not in (NUM_IMAGENET_CLASSES, NUM_IN9_CLASSES):
        raise CheckpointError(f"{path} is a probe with {saved.get('num_labels')} classes, which do not map to IN-9: "
                              "train it on ImageNet-1k (1000 classes, the paper's protocol) or on IN-9's nine")
    lrs = [float(v) for v in saved["lrs"]]
    if lr is None:
        scores = [r["top1"] for r in saved["last"]] if saved.get("last") else list(saved["best_top1"])
        index = max(range(len(lrs)), key=lambda i: scores[i])
    else:
        matches = [i for i, v in enumerate(lrs) if abs(v - lr) <= 1e-12 * max(1.0, abs(lr))]
        if not matches:
            raise CheckpointError(f"--probe_lr {lr}: {path} holds heads for the lrs {lrs}; pass one of them")
        index = matches[0]
    weight, bias = saved["heads"][f"heads.{index}.weight"], saved["heads"][f"heads.{index}.bias"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return ProbeHead(linear.eval(), lrs[index], dict(saved.get("source") or {}), int(weight.shape[1]))
