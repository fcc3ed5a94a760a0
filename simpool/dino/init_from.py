"""Start a DINO run from published or earlier weights (``train_dino.py --pretrained_weights PATH``).

Continued pretraining: the student and the teacher both start from the network ``--checkpoint_key`` names
(``teacher`` by default) in ``PATH``, which may be anything :func:`simpool.checkpoint.load_pretrained` or
:func:`simpool.loading.load_backbone` reads:

* a full DINO / SimPool-fork / simpool checkpoint: backbone, **and** the DINO head when its shapes match the
  head flags (``--out_dim``, ``--head_hidden_dim``, ``--head_bottleneck_dim``, ``--head_nlayers``,
  ``--use_bn_in_head``), **and** the loss centre (``dino_loss.center``) with that head;
* a backbone-only state dict (as DINO publishes ViT weights) or a timm state dict of the same layout;
* an export folder (``config.json`` + ``model.safetensors``).

Heads that are absent or do not fit keep their fresh initialisation, with a printed note. Optimizer,
schedules, epoch and iteration start fresh. Reference-format ViT weights keep the reference's
position-embedding rule (``load_pretrained`` sets it). A checkpoint already in ``output_dir`` wins: the run
resumes from it and ``PATH`` is not read.

Two phases, so that bad weights stop the run (exit 2) before anything is written to ``output_dir``:

    >>> init = read_init_weights(args, resume_source)  # reads and checks PATH; None when resuming (source not None)
    >>> ...build student, teacher, loss...
    >>> notes = apply_init_weights(args, init, unwrap(student), unwrap(teacher), loss_fn)
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from simpool.checkpoint import CheckpointError, load_backbone_weights, load_pretrained, safe_load, select_state_dict
from simpool.distributed import strip_wrapper_prefixes
from simpool.loading import _recorded_args, is_export_dir, load_backbone
from simpool.models import build_backbone

__all__ = ["InitWeights", "apply_init_weights", "head_state_dict", "read_init_weights"]

log = logging.getLogger(__name__)


@dataclass
class InitWeights:
    """What ``PATH`` holds for a new run, already checked against the run's backbone."""

    path: str
    key: str | None  # the network picked inside a full checkpoint; None for backbone-only files / exports
    backbone: dict[str, torch.Tensor]  # fits the run's backbone strictly
    pos_embed_resampling: str | None  # the ViT rule the weights were trained with (None: not a ViT)
    head: dict[str, torch.Tensor] | None = None  # the DINO head's state dict, "head." stripped
    center: torch.Tensor | None = None  # the DINO loss centre
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = f"{self.key} of " if self.key else ""
        return f"initialised from {what}{self.path}"


def head_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DINO head's entries of a network's state dict (``head.*``, DDP/compile prefixes stripped).

    Only a MultiCropWrapper layout (``backbone.*`` beside ``head.*``) has a DINO head: a timm state dict's
    ``head.weight`` / ``head.bias`` are its classifier (dropped, as ``load_pretrained`` does).
    """
    stripped = {strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    if not any(key.startswith("backbone.") for key in stripped):
        return {}
    return {key.removeprefix("head."): value for key, value in stripped.items() if key.startswith("head.")}


def _run_backbone(args: argparse.Namespace) -> nn.Module:
    """The run's backbone as ``build_student_teacher`` builds the teacher's, to check the weights against.

    Built under ``fork_rng``: the run's own models then draw the same random numbers as without
    ``--pretrained_weights`` (fresh heads equal those of a run from scratch with the same seed).
    """
    with torch.random.fork_rng(devices=[]):
        return build_backbone(args.arch, mode=args.mode, gamma=args.gamma, patch_size=args.patch_size,
                              **dict(args.model_overrides or {}))


def read_init_weights(args: argparse.Namespace, resume_checkpoint: str | Path | None) -> InitWeights | None:
    """Read ``args.pretrained_weights`` and check its backbone fits the flags; None when there is nothing to do.

    Nothing to do: no ``--pretrained_weights``, or a ``resume_checkpoint`` is given (resume wins). Also sets
    ``args.pos_embed_resampling`` to the ViT rule the weights need (or, when resuming, the one the run
    recorded), so that ``args.yaml``, the checkpoints' ``args`` and ``load_model`` keep it. Raises
    :class:`CheckpointError` (exit 2 in ``train_dino.py``) for a missing or unreadable file, a folder that
    is no export, a missing ``--checkpoint_key``, or weights that do not fit ``--arch`` / ``--mode``.
    """
    if resume_checkpoint is not None:
        recorded = _recorded_args(resume_checkpoint).get("pos_embed_resampling")
        args.pos_embed_resampling = args.pos_embed_resampling or recorded
        if args.pretrained_weights:
            log.info("--pretrained_weights %s not read: resuming from %s", args.pretrained_weights, resume_checkpoint)
        return None
    if not args.pretrained_weights:
        return None
    path = Path(args.pretrained_weights)
    if path.is_dir():
        if not is_export_dir(path):
            raise CheckpointError(f"--pretrained_weights {str(path)!r} is a folder without config.json: pass a "
                                  "checkpoint file or a folder written by utils/export_backbone.py")
        init = _read_export(args, path)
    elif not path.is_file():
        raise CheckpointError(f"--pretrained_weights {str(path)!r} does not exist: check the path")
    else:
        init = _read_checkpoint(args, path)
    args.pos_embed_resampling = args.pos_embed_resampling or init.pos_embed_resampling
    return init


def _read_checkpoint(args: argparse.Namespace, path: Path) -> InitWeights:
    checkpoint = safe_load(path)  # CheckpointError for files that are no weights-only torch checkpoint
    state_dict, key = select_state_dict(checkpoint, args.checkpoint_key)
    backbone = _run_backbone(args)
    load_pretrained(backbone, path, checkpoint_key=args.checkpoint_key)  # strict; the reference pos-embed rule
    loss_state = checkpoint.get("dino_loss")
    center = loss_state.get("center") if isinstance(loss_state, dict) else None
    return InitWeights(str(path), key, backbone.state_dict(), getattr(backbone, "pos_embed_resampling", None),
                       head=head_state_dict(state_dict) or None,
                       center=center if isinstance(center, torch.Tensor) else None)


def _read_export(args: argparse.Namespace, path: Path) -> InitWeights:
    try:
        exported = load_backbone(path)
    except ValueError as err:
        raise CheckpointError(f"--pretrained_weights {str(path)!r}: {err}") from None
    backbone = _run_backbone(args)
    load_backbone_weights(backbone, exported.state_dict())  # the export's arch must be the run's
    return InitWeights(str(path), None, backbone.state_dict(), getattr(exported, "pos_embed_resampling", None))


def _head_misfit(head: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not load into ``head`` (None when it does, strictly)."""
    expected = head.state_dict()
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return f"missing {missing[:4]}, unexpected {extra[:4]} (check --head_nlayers / --use_bn_in_head)"
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        return f"shapes differ: {', '.join(wrong[:3])} (check --out_dim / --head_hidden_dim / --head_bottleneck_dim)"
    return None


@torch.no_grad()
def apply_init_weights(args: argparse.Namespace, init: InitWeights | None, student: nn.Module, teacher: nn.Module,
                       loss_fn: nn.Module) -> list[str]:
    """Copy ``init`` into the (unwrapped) student and teacher ``MultiCropWrapper``s and the loss; returns notes.

    Both backbones get the same weights and ``args.pos_embed_resampling`` (also when resuming); both heads
    get ``init.head`` when it fits the student's head, else keep their (identical) fresh initialisation; the
    loss centre follows the head.
    """
    for net in (student, teacher):
        if args.pos_embed_resampling and hasattr(net.backbone, "pos_embed_resampling"):
            net.backbone.pos_embed_resampling = args.pos_embed_resampling
    if init is None:
        return []
    notes = [init.describe()]
    for net in (student, teacher):
        net.backbone.load_state_dict(init.backbone, strict=True)
    if init.head is None:
        notes.append(f"{init.path} holds no DINO head: student and teacher heads start fresh")
        return notes
    misfit = _head_misfit(student.head, init.head)
    if misfit:
        notes.append(f"the DINO head of {init.path} does not fit the head flags ({misfit}): "
                     "student and teacher heads start fresh")
        return notes
    student.head.load_state_dict(init.head, strict=True)
    teacher.head.load_state_dict(init.head, strict=True)
    notes.append("DINO head loaded into student and teacher")
    center = getattr(loss_fn, "center", None)
    if init.center is not None and center is not None and init.center.shape == center.shape:
        center.copy_(init.center)
        notes.append("DINO loss centre loaded")
    return notes
