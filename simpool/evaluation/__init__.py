"""Evaluation of frozen backbones: features, weighted k-NN, linear probe, attention-map scores.

* :mod:`simpool.evaluation.features`: the evaluation transform, ``extract_features`` (every rank's shard,
  gathered in dataset order), feature dumps, ``num_classes_of`` / ``check_labels`` for (features, labels) pairs
* :mod:`simpool.evaluation.knn`: the weighted k-NN vote (DINO protocol); ``knn_on_features`` is the one entry
  point of ``eval_knn.py`` and of the trainer's online k-NN
* :mod:`simpool.evaluation.linear`: linear heads on frozen features, one per lr, trained in one pass
  (``torch.optim.SGD`` + ``CosineAnnealingLR``); :mod:`simpool.evaluation.linear_probe`: the probe's run
  (checkpoint, resume, logs) behind ``eval_linear.py``
* :mod:`simpool.evaluation.attention_metrics`: Jaccard / CorLoc of attention maps against object masks;
  :mod:`simpool.evaluation.attention_scores`: those scores for a model on a data set
* :mod:`simpool.evaluation.segmentation_probe`: the linear segmentation probe on patch features
* SimPool's own tables: :mod:`~simpool.evaluation.localization` (MaxBoxAccV2, wsolevaluation),
  :mod:`~simpool.evaluation.lost` and :mod:`~simpool.evaluation.object_discovery` (LOST and DINO-seg CorLoc),
  :mod:`~simpool.evaluation.background_robustness` (ImageNet-9 variants); :mod:`~simpool.evaluation.box_figures`
* DINO's other evaluators: :mod:`~simpool.evaluation.retrieval` (revisited Oxford/Paris; scores in
  :mod:`~simpool.evaluation.revisited_map`), :mod:`~simpool.evaluation.copy_detection` (Copydays),
  :mod:`~simpool.evaluation.video_segmentation` (DAVIS 2017; scores in :mod:`~simpool.evaluation.davis_metrics`),
  over :mod:`~simpool.evaluation.backbone_view` (global feature + patch tokens of any backbone),
  :mod:`~simpool.evaluation.search` (chunked cosine search) and :mod:`~simpool.evaluation.feature_cache`
* :mod:`simpool.evaluation.common`: the data flags and frozen-model set-up the command lines share
* ``simpool-benchmark`` (``run_benchmark``, over the drivers): :mod:`~simpool.evaluation.benchmark.registry` (the
  evaluators it knows: data flags, result file, table columns), :mod:`~simpool.evaluation.benchmark.suite` (the
  suite YAML), :mod:`~simpool.evaluation.benchmark.rows` (weights and random-init twins),
  :mod:`~simpool.evaluation.benchmark.cells` (cells: skip, resume, run), :mod:`~simpool.evaluation.benchmark.table`
* command lines (``run_*.py``, ``main(argv) -> exit code``, not imported here): ``run_knn`` (``eval_knn.py``),
  ``run_linear`` (``eval_linear.py``), ``run_attention``, ``run_segmentation``, ``run_localization``,
  ``run_object_discovery``, ``run_background_robustness``, ``run_retrieval``, ``run_copy_detection``,
  ``run_video_segmentation`` (each of the last six with a library-level ``run_<x>(...) -> dict``)

Example:
    >>> from simpool.data import build_labelled_splits
    >>> from simpool.evaluation import eval_transform, extract_features, knn_on_features
    >>> train_set, val_set = build_labelled_splits("/data/imagenet", transform=eval_transform(224))
    >>> knn_on_features(extract_features(backbone, train_set), extract_features(backbone, val_set), [20], 0.07)
    {20: (71.9, 90.3)}
"""

from simpool.evaluation.features import (
    check_labels,
    eval_transform,
    extract_features,
    feature_fn,
    load_features,
    num_classes_of,
    save_features,
)
from simpool.evaluation.knn import knn_classifier, knn_on_features, knn_predict, knn_search, usable_ks, weighted_vote
from simpool.evaluation.linear import MultiLRLinear, fit, probe_optimizer, train_linear_on_features

__all__ = [
    "check_labels", "eval_transform", "extract_features", "feature_fn", "fit", "knn_classifier", "knn_on_features",
    "knn_predict", "knn_search", "load_features", "MultiLRLinear", "num_classes_of", "probe_optimizer",
    "save_features", "train_linear_on_features", "usable_ks", "weighted_vote",
]
