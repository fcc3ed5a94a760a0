"""Data sets for pretraining and evaluation, and the loader plumbing around them.

* :mod:`simpool.data.paths`: ``--data_path`` layouts (SimPool fork root or DINO ImageFolder), DataError
* :mod:`simpool.data.images`: ImageFolder / file-list data sets that skip unreadable files, the collate
  function that counts them
* :mod:`simpool.data.fashion_mnist`: the offline demo data set
* :mod:`simpool.data.build`: ``build_dataset`` / ``build_labelled_splits``, the entry points (``SourceOptions``)
* :mod:`simpool.data.shards`, :mod:`simpool.data.shard_index`, :mod:`simpool.data.pack`: WebDataset tar shards read
  map-style through an index, and ``simpool-pack`` that writes them
* :mod:`simpool.data.file_index`: an ImageFolder listed once per run (rank 0 writes, the others read)
* :mod:`simpool.data.hf`: Hugging Face datasets on disk (save_to_disk, parquet; the optional [hf] extra)
* :mod:`simpool.data.sampler`: resumable distributed sampler, loader worker seeding
* :mod:`simpool.data.masks`: images with object masks / boxes (VOC-style folders, COCO-style JSON) for scoring
  attention maps, and ``mask_to_box``
* :mod:`simpool.data.fashion_on_photos`: Fashion-MNIST items pasted on photos, with exact object masks (offline)
* boxes and classes in their authors' layouts: :mod:`simpool.data.wsol` (wsolevaluation metadata),
  :mod:`simpool.data.voc_boxes` (VOC ``Annotations/``), :mod:`simpool.data.coco20k`, :mod:`simpool.data.bg_challenge`
  (ImageNet-9 variants)
* readers of DINO's other evaluation sets: :mod:`simpool.data.revisitop` (revisited Oxford / Paris, the restricted
  unpickler of their ground truth), :mod:`simpool.data.copydays`, :mod:`simpool.data.davis` (DAVIS 2017)
* :mod:`simpool.data.generated`: writers of evaluation data in all those layouts from fashion-on-photos
"""

from simpool.data.build import SourceOptions, build_dataset, build_labelled_splits, dataset_fingerprint
from simpool.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST
from simpool.data.fashion_on_photos import FashionOnPhotosDataset, make_fashion_on_photos
from simpool.data.generated.voc import write_voc_style
from simpool.data.images import (
    BadSample,
    CollatedBatch,
    FileListDataset,
    ImageFolderDataset,
    UnreadableImageWarning,
    collate_skip_bad,
)
from simpool.data.masks import MaskSample, mask_to_box, read_coco, read_mask_folder
from simpool.data.paths import DataError, resolve_split
from simpool.data.sampler import ResumableDistributedSampler, seed_worker
from simpool.data.shards import ShardDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "BadSample",
    "CollatedBatch",
    "DataError",
    "FashionMNIST",
    "FashionOnPhotosDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "MaskSample",
    "ResumableDistributedSampler",
    "ShardDataset",
    "SourceOptions",
    "UnreadableImageWarning",
    "build_dataset",
    "build_labelled_splits",
    "dataset_fingerprint",
    "collate_skip_bad",
    "make_fashion_on_photos",
    "mask_to_box",
    "read_coco",
    "read_mask_folder",
    "resolve_split",
    "seed_worker",
    "write_voc_style",
]
