"""write_image_folder: fashion-on-photos in ImageFolder layout, each image in the folder of its Fashion-MNIST class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from simpool.data.fashion_on_photos import render_fashion_on_photo
from simpool.data.generated.image_folder import image_folder_class_names, write_image_folder

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian package dataset-fashion-mnist is not installed")


def test_layout_sizes_and_labels(tmp_path):
    assert write_image_folder(tmp_path, per_class=2, num_classes=2, size=(40, 56)) == {"train": 4, "val": 4}
    for split, render_split in (("train", "train"), ("val", "test")):
        folder = ImageFolder(str(tmp_path / split))
        assert folder.classes == ["0_t-shirt-top", "1_trouser"] == image_folder_class_names(2)
        assert sorted(folder.targets) == [0, 0, 1, 1]
        for path, target in folder.samples:
            image = Image.open(path)
            assert image.size == (56, 40)  # (width, height): centre crop of a 56 px render
            sample = render_fashion_on_photo(int(Path(path).stem), 56, 0, render_split)
            assert sample.label == target
            decoded = np.asarray(image.convert("RGB"), dtype=float)
            assert np.abs(decoded - sample.image[8:48].astype(float)).mean() < 8  # JPEG of those pixels


def test_deterministic_and_checked(tmp_path):
    write_image_folder(tmp_path / "a", per_class=1, num_classes=3, size=32, splits=("val",))
    write_image_folder(tmp_path / "b", per_class=1, num_classes=3, size=32, splits=("val",))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 3 and not (tmp_path / "a" / "train").exists()
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="num_classes must be in"):
        write_image_folder(tmp_path, per_class=1, num_classes=11)
    with pytest.raises(ValueError, match="splits must be among"):
        write_image_folder(tmp_path, per_class=1, splits=("test",))
