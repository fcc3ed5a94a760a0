"""The run layer: what every command-line driver shares (below ``dino/``, ``finetune/`` and ``evaluation/``).

* :mod:`simpool.run.resume_checks`: "same weights, same flags, same data" before a resume
* :mod:`simpool.run.items`: per-item results of an evaluator, so that a rerun skips finished items
"""

from simpool.run.items import ItemResults, shard
from simpool.run.resume_checks import changes, refuse_changes, weights_identity

__all__ = ["ItemResults", "changes", "refuse_changes", "shard", "weights_identity"]
