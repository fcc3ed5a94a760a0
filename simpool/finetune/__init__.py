"""Supervised fine-tuning of a pretrained backbone with a linear head (``finetune.py``).

* :mod:`simpool.finetune.config`: the flags and ``configs/finetune_*.yaml``
* :mod:`simpool.finetune.data`: timm transforms, splits, loaders, Mixup
* :mod:`simpool.finetune.model`: backbone + linear head, layer groups for layer-wise lr decay, export reload
* :mod:`simpool.finetune.engine`: one training step, evaluation (top-1 / top-5)
* :mod:`simpool.finetune.trainer`: the run (checkpoints, exact resume, logging)
* :mod:`simpool.finetune.run_finetune`: the command line (`finetune.py`)
"""

from simpool.finetune.model import FineTuneModel, build_finetune_model, load_finetuned

__all__ = ["FineTuneModel", "build_finetune_model", "load_finetuned"]
