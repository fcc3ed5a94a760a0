"""Evaluation data sets generated offline in the layouts their authors distribute (fashion-on-photos: Fashion-MNIST
items on real photos, with exact masks and boxes), so that every reader is tested on the files it will meet.

* :mod:`simpool.data.generated.voc`: PASCAL VOC segmentation folders (``write_voc_style``)
* :mod:`simpool.data.generated.image_folder`: ImageFolder class folders, ``train/`` + ``val/`` (``write_image_folder``)
"""
