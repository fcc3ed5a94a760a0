"""Hugging Face datasets on disk (the optional [hf] extra): save_to_disk folders and parquet files serve
training and labelled evaluation map-style, with classes, --subset, bad images skipped, columns by flag."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from simpool.data import BadSample, build_dataset, build_labelled_splits, collate_skip_bad, dataset_fingerprint
from simpool.data.build import SourceOptions
from simpool.data.hf import HFImageDataset
from simpool.data.paths import DataError

try:
    import datasets
except ImportError:  # the [hf] extra; `make install` (and so CI) installs it, where a skip would hide a gap
    if os.environ.get("CI"):
        raise
    pytest.skip("datasets is not installed: pip install -e '.[hf]'", allow_module_level=True)

CLASSES = ["apple", "pear", "plum"]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_split(count: int, seed: int, extra_image_column: bool = False) -> tuple[datasets.Dataset, list]:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 255, (10, 12, 3), dtype=np.uint8) for _ in range(count)]
    labels = [i % 3 for i in range(count)]
    columns = {"picture": [{"bytes": png(a), "path": None} for a in arrays], "fruit": labels,
               "note": [f"n{i}" for i in range(count)]}
    features = {"picture": datasets.Image(), "fruit": datasets.ClassLabel(names=CLASSES),
                "note": datasets.Value("string")}
    if extra_image_column:
        columns["thumb"] = columns["picture"]
        features["thumb"] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), arrays


@pytest.fixture()
def saved(tmp_path):
    train, train_arrays = make_split(7, 0)
    val, val_arrays = make_split(4, 1)
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(path))
    return path, train_arrays, val_arrays


def test_a_saved_dataset_dict_serves_train_and_val_with_its_class_names(saved):
    path, train_arrays, val_arrays = saved
    train, val = build_labelled_splits(path)
    assert isinstance(train, HFImageDataset) and (len(train), len(val)) == (7, 4)
    assert train.classes == val.classes == CLASSES and train.targets == [0, 1, 2, 0, 1, 2, 0]
    for dataset, arrays in ((train, train_arrays), (val, val_arrays)):
        for i, expected in enumerate(arrays):
            image, label = dataset[i]
            assert np.array_equal(np.asarray(image), expected) and label == i % 3
    assert len(build_dataset(path, "train")) == 7
    assert dataset_fingerprint(train) == dataset_fingerprint(build_dataset(path))  # labels and length
    subset = build_dataset(path, subset=2)
    assert subset.targets == [0, 1, 2, 0, 1, 2] and np.array_equal(np.asarray(subset[5][0]), train_arrays[5])
    assert dataset_fingerprint(subset) != dataset_fingerprint(train)


def test_parquet_files_named_by_split_and_a_single_file(tmp_path):
    train, train_arrays = make_split(6, 2)
    test, _ = make_split(3, 3)
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    train.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    test.to_parquet(str(folder / "test-00000-of-00001.parquet"))
    train_set, val_set = build_labelled_splits(tmp_path / "hub")  # data/ found, 'test' serves as 'val'
    assert (len(train_set), len(val_set)) == (6, 3) and train_set.classes == CLASSES
    assert np.array_equal(np.asarray(train_set[4][0]), train_arrays[4])
    single = build_dataset(folder / "train-00000-of-00001.parquet")
    assert len(single) == 6 and single.targets == train_set.targets
    (folder / "extra.parquet").write_bytes((folder / "test-00000-of-00001.parquet").read_bytes())
    with pytest.raises(DataError, match="extra.parquet is not named by split"):
        build_dataset(tmp_path / "hub")


def test_an_undecodable_image_is_skipped_and_counted(tmp_path):
    train, _ = make_split(5, 4)
    rows = train.to_dict()
    rows["picture"][3] = {"bytes": b"not an image", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=train.features)
    broken.save_to_disk(str(tmp_path / "broken"))
    dataset = build_dataset(tmp_path / "broken", transform=pil_to_tensor)
    with pytest.warns(UserWarning, match="row 3 of"):
        assert isinstance(dataset[3], BadSample)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_skip_bad))
    assert sum(int(b.num_skipped) for b in batches) == 1 and sum(len(b.labels) for b in batches) == 4


def test_columns_are_found_or_named_by_flags_and_wrong_names_are_one_error(tmp_path):
    train, arrays = make_split(4, 5, extra_image_column=True)
    train.save_to_disk(str(tmp_path / "two_images"))
    with pytest.raises(DataError, match="has 2 Image columns .* --image_column"):
        build_dataset(tmp_path / "two_images")
    dataset = build_dataset(tmp_path / "two_images", options=SourceOptions(image_column="thumb"))
    assert np.array_equal(np.asarray(dataset[2][0]), arrays[2]) and dataset.classes == CLASSES
    with pytest.raises(DataError, match="--label_column kind: .* has no such column"):
        build_dataset(tmp_path / "two_images", options=SourceOptions(image_column="thumb", label_column="kind"))
    with pytest.raises(DataError, match="has no val / validation / test split"):
        build_labelled_splits(tmp_path / "two_images", options=SourceOptions(image_column="thumb"))
    plain = datasets.Dataset.from_dict({"image": [{"bytes": png(a), "path": None} for a in arrays],
                                        "label": [3, 0, 1, 3]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int64")}))
    plain.save_to_disk(str(tmp_path / "plain"))
    labelled = build_dataset(tmp_path / "plain")  # an int 'label' column: classes 0..max
    assert labelled.targets == [3, 0, 1, 3] and labelled.classes == ["0", "1", "2", "3"]
