"""DINO self-distillation pretraining, one concept per module.

- ``loss``: ``DINOLoss`` -- teacher centring and sharpening, the multi-crop cross-entropy (custom autograd),
  the centre EMA; returns ``DINOLossOutput(loss, teacher_entropy, kl, teacher_mean_probs)``.
- ``head``: ``DINOHead`` (MLP, L2 norm, weight-normalised prototypes) and ``MultiCropWrapper``.
- ``step``: ``DINOStep`` -- one iteration (teacher forward, student forward, loss, clipped update, teacher EMA)
  driven by a ``StepSchedule`` per iteration.
- ``schedules``: per-iteration numpy schedules (``cosine_scheduler``, ``teacher_temp_schedule``, ``scaled_lr``).
- ``optim``: parameter groups (decay / no decay, ``is_last_layer``), ``build_optimizer``, ``LARS``,
  per-parameter gradient clipping.
- ``augment/``: the multi-crop views -- ``params`` (crop recipes and their sampling), ``ops`` (pixel operations),
  ``cpu`` (``DataAugmentationDINO``, per image in the loader workers), ``batched`` (``GPUMultiCrop``, the same
  views for a whole batch on the device).
- ``collapse``: ``CollapseMonitor`` -- the uniform / one-prototype collapse alarms from entropy, KL and the
  prototypes in use.
- ``accum``: groups loader batches into the micro-batches of one optimizer step (``--accum_steps``).
- ``checkpointing``: seeds, RNG states for exact resume, the preemption flag.
- ``build``: student and teacher, DDP / compile wrappers, the multi-crop loader and the ``DINOStep``, from the
  flags (shared by ``train`` and ``benchmarks/train_step.py``).
- ``config``: the flags of ``train_dino.py`` and ``--config`` YAML files.
- ``train``: the driver (``Trainer``: epoch loop, checkpoints, online k-NN); not imported here, as it loads
  the evaluation layer.

Example:
    >>> from simpool.dino import DINOHead, DINOLoss, DINOStep, MultiCropWrapper, StepSchedule, build_optimizer
    >>> student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 65536))
    >>> step = DINOStep(student, teacher, DINOLoss(65536, ncrops=8), build_optimizer("adamw", groups))
    >>> stats = step(crops, StepSchedule(lr=5e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04))
"""

from simpool.dino.augment import DataAugmentationDINO, GPUMultiCrop
from simpool.dino.collapse import CollapseMonitor
from simpool.dino.head import DINOHead, MultiCropWrapper
from simpool.dino.loss import DINOLoss, DINOLossOutput
from simpool.dino.optim import build_optimizer, get_params_groups
from simpool.dino.schedules import cosine_scheduler, scaled_lr, teacher_temp_schedule
from simpool.dino.step import DINOStep, StepSchedule

__all__ = [
    "CollapseMonitor",
    "DINOHead",
    "DINOLoss",
    "DINOLossOutput",
    "DINOStep",
    "DataAugmentationDINO",
    "GPUMultiCrop",
    "MultiCropWrapper",
    "StepSchedule",
    "build_optimizer",
    "cosine_scheduler",
    "get_params_groups",
    "scaled_lr",
    "teacher_temp_schedule",
]
