"""Evaluation data sets generated offline in the layouts their authors distribute (fashion-on-photos: Fashion-MNIST
items on real photos, with exact masks and boxes), so that every reader is tested on the files it will meet.

* :mod:`simpool.data.generated.voc`: PASCAL VOC segmentation folders (``write_voc_style``)
* :mod:`simpool.data.generated.voc_detection`: PASCAL VOC detection (``Annotations/*.xml``), as LOST reads VOC07/12
* :mod:`simpool.data.generated.coco20k`: COCO train2014 images + instances JSON + LOST's 20k file list
* :mod:`simpool.data.generated.wsol`: clovaai/wsolevaluation's metadata files + images (CUB / ImageNet layout)
* :mod:`simpool.data.generated.bg_challenge`: ImageNet-9 and its background variants (backgrounds challenge)
* :mod:`simpool.data.generated.revisitop`: revisited Oxford / Paris (``write_revisitop_style``)
* :mod:`simpool.data.generated.copydays`: INRIA Copydays + distractors + whitening (``write_copydays_style``)
* :mod:`simpool.data.generated.davis`: DAVIS 2017 videos (``write_davis_style``)
* :mod:`simpool.data.generated.compose`: the photo crops and pasted items they share
* :mod:`simpool.data.generated.image_folder`: ImageFolder class folders, ``train/`` + ``val/`` (``write_image_folder``)
* :mod:`simpool.data.generated.benchmark_root`: all of them (and an IN-9-class ImageFolder for k-NN and the probe)
  under one root, where ``configs/benchmark_paper.yaml`` looks for each
"""
