"""Tests for simpool.data: path layouts, bad-file skipping, file lists, Fashion-MNIST, samplers."""

from __future__ import annotations

import contextlib
import gzip
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data as skdata
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from simpool.data import (
    FASHION_MNIST_DIR,
    BadSample,
    DataError,
    FashionMNIST,
    FileListDataset,
    ImageFolderDataset,
    ResumableDistributedSampler,
    UnreadableImageWarning,
    build_dataset,
    build_labelled_splits,
    collate_skip_bad,
    resolve_split,
    seed_worker,
)
from simpool.data.fashion_mnist import parse_idx

PHOTOS = {"cat": skdata.chelsea, "cup": skdata.coffee, "person": skdata.astronaut, "rocket": skdata.rocket}
TO_TENSOR_32 = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


class TwoCrops:
    """A stand-in multi-crop transform (picklable, so it also runs in loader workers)."""

    def __call__(self, image):
        return [TO_TENSOR_32(image), transforms.functional.to_tensor(image.resize((16, 16)))]


def save_photo(path: Path, photo: str, variant: int = 0, size: int = 64) -> Path:
    """Save a small real photo; ``variant`` shifts the crop so images of a class differ."""
    pixels = PHOTOS[photo]()
    offset = 20 * variant
    image = Image.fromarray(pixels[offset : offset + 280, offset : offset + 280]).resize((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_image_folder(folder: Path, classes=("cat", "cup", "person"), per_class: int = 3) -> Path:
    for photo in classes:
        for i in range(per_class):
            save_photo(folder / photo / f"img{i}.jpg", photo, variant=i)
    return folder


# ---------------------------------------------------------------- resolve_split


def test_resolve_split_fork_layout_root_holds_train_and_val(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "val", per_class=1)
    assert resolve_split(tmp_path, "train") == tmp_path / "train"
    assert resolve_split(str(tmp_path), "val") == tmp_path / "val"


def test_resolve_split_dino_layout_is_the_train_folder_itself(tmp_path):
    train_dir = make_image_folder(tmp_path / "imagenet" / "train", per_class=1)
    make_image_folder(tmp_path / "imagenet" / "val", per_class=1)
    assert resolve_split(train_dir, "train") == train_dir
    with pytest.raises(DataError, match="no 'val' split") as error:
        resolve_split(train_dir, "val")
    assert str(train_dir) in str(error.value) and str(tmp_path / "imagenet") in str(error.value)


def test_resolve_split_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as error:
        resolve_split(missing, "train")
    assert str(missing) in str(error.value)

    empty_classes = tmp_path / "empty"
    (empty_classes / "cat").mkdir(parents=True)
    (empty_classes / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no image files"):
        resolve_split(empty_classes, "train")

    loose = tmp_path / "loose"
    save_photo(loose / "a.png", "cat")
    with pytest.raises(DataError, match="one subfolder per class"):
        resolve_split(loose, "train")

    no_val = tmp_path / "no_val"
    make_image_folder(no_val / "train", per_class=1)
    with pytest.raises(DataError, match="no val/"):
        resolve_split(no_val, "val")
    with pytest.raises(DataError, match="unknown split"):
        resolve_split(no_val, "test")


# ---------------------------------------------------------------- ImageFolderDataset


def test_subset_keeps_the_first_n_sorted_images_per_class(tmp_path):
    folder = make_image_folder(tmp_path, classes=("cat", "cup"), per_class=0)
    names = ["b.jpg", "a.jpg", "img10.jpg", "img2.jpg"]
    for photo in ("cat", "cup"):
        for i, name in enumerate(names):
            save_photo(folder / photo / name, photo, variant=i)
    save_photo(folder / "person" / "only.jpg", "person")  # smaller than the subset: kept whole
    (folder / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class

    dataset = ImageFolderDataset(folder, subset=2)
    assert dataset.classes == ["cat", "cup", "person"]
    first_two = ["a.jpg", "b.jpg"]  # string order: "img10.jpg" < "img2.jpg" come later
    expected = [(str(folder / c / n), label) for label, c in enumerate(("cat", "cup")) for n in first_two]
    expected.append((str(folder / "person" / "only.jpg"), 2))
    assert dataset.samples == expected
    assert dataset.targets == [0, 0, 1, 1, 2]
    image, label = dataset[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 2
    assert len(ImageFolderDataset(folder)) == 9
    with pytest.raises(DataError, match="subset"):
        ImageFolderDataset(folder, subset=1.5)


def write_bad_files(folder: Path) -> list[Path]:
    """A random-bytes JPEG, a half JPEG and a half PNG, in existing class folders."""
    random_bytes = folder / "cat" / "random.jpg"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    half_jpeg = folder / "cup" / "half.jpg"
    raw = save_photo(half_jpeg, "cup").read_bytes()
    half_jpeg.write_bytes(raw[: len(raw) // 2])
    half_png = folder / "person" / "half.png"
    raw = save_photo(half_png, "person").read_bytes()
    half_png.write_bytes(raw[: len(raw) // 2])
    return [random_bytes, half_jpeg, half_png]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_are_skipped_and_counted(tmp_path, num_workers):
    folder = make_image_folder(tmp_path, per_class=2)
    bad_files = write_bad_files(folder)
    dataset = ImageFolderDataset(folder, transform=TO_TENSOR_32)
    assert len(dataset) == 9
    loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=collate_skip_bad)
    skipped, labels, batches = 0, [], 0
    # workers warn in their own processes, where pytest cannot see it
    expect_warning = pytest.warns(UnreadableImageWarning) if num_workers == 0 else contextlib.nullcontext()
    with expect_warning:
        for images, batch_labels, num_skipped in loader:
            assert num_skipped.dtype == torch.int64 and num_skipped.ndim == 0
            skipped += int(num_skipped)
            assert images.shape == (len(batch_labels), 3, 32, 32)
            labels += batch_labels.tolist()
            batches += 1
    assert batches == 3
    assert skipped == len(bad_files) == 3
    assert labels == [0, 0, 1, 1, 2, 2]  # the good images, in order, with their own labels
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_bad_file_warning_names_the_file_once(tmp_path, recwarn):
    folder = make_image_folder(tmp_path, per_class=1)
    bad = write_bad_files(folder)[1]
    dataset = ImageFolderDataset(folder)
    index = [path for path, _ in dataset.samples].index(str(bad))
    for _ in range(3):
        sample = dataset[index]
        assert isinstance(sample, BadSample) and sample.path == str(bad) and "truncated" in sample.reason
    messages = [str(w.message) for w in recwarn if w.category is UnreadableImageWarning]
    assert len(messages) == 1 and str(bad) in messages[0]


def test_collate_handles_multicrop_lists_and_all_bad_batches(tmp_path):
    folder = make_image_folder(tmp_path, per_class=1)
    dataset = ImageFolderDataset(folder, transform=TwoCrops())
    batch = collate_skip_bad([dataset[0], BadSample("x.jpg", "OSError"), dataset[2]])
    assert [tuple(crops.shape) for crops in batch.images] == [(2, 3, 32, 32), (2, 3, 16, 16)]
    assert batch.labels.tolist() == [0, 2] and int(batch.num_skipped) == 1
    all_bad = collate_skip_bad([BadSample("x.jpg", "OSError"), BadSample("y.jpg", "OSError")])
    assert all_bad.images is None and all_bad.labels is None and int(all_bad.num_skipped) == 2


# ---------------------------------------------------------------- FileListDataset


def test_file_list_resolves_relative_paths_and_skips_comments(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    save_photo(photos / "a.jpg", "cat")
    save_photo(photos / "sub" / "b.png", "cup")
    absolute = save_photo(tmp_path / "elsewhere" / "c.jpg", "rocket")
    list_file = photos / "list.txt"
    list_file.write_text(f"# my images\na.jpg\n\n  sub/b.png  \n{absolute}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative entries must not depend on the cwd

    dataset = FileListDataset(list_file, transform=TO_TENSOR_32)
    assert dataset.paths == [str(photos / "a.jpg"), str(photos / "sub" / "b.png"), str(absolute)]
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label == -1
    assert isinstance(build_dataset(list_file, "train"), FileListDataset)

    with pytest.raises(DataError, match="only be the 'train' split"):
        build_dataset(list_file, "val")
    with pytest.raises(DataError, match="needs class labels"):
        build_dataset(list_file, "train", subset=3)
    (photos / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="lists no images"):
        FileListDataset(photos / "empty.txt")
    (photos / "wrong.txt").write_text("missing.jpg\n")
    with pytest.raises(DataError, match="does not exist"):
        FileListDataset(photos / "wrong.txt")


# ---------------------------------------------------------------- Fashion-MNIST


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_dir(tmp_path):
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (2, 5, 3), dtype=np.uint8)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 0, 1, 2]))
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([2, 0]))
    return tmp_path, train_images, test_images


def test_fashion_mnist_reads_a_tiny_idx_folder(tiny_fashion_dir):
    folder, train_images, test_images = tiny_fashion_dir
    train = FashionMNIST(folder, split="train")
    assert len(train) == 4 and train.targets == [1, 0, 1, 2]
    image, label = train[3]
    assert image.mode == "RGB" and image.size == (3, 5) and label == 2
    assert np.array_equal(np.asarray(image)[..., 1], train_images[3])
    tensor, _ = FashionMNIST(folder, split="train", as_tensor=True)[3]
    assert tensor.dtype == torch.uint8 and torch.equal(tensor[0], torch.from_numpy(train_images[3]))

    first_per_class = FashionMNIST(folder, subset=1)
    assert first_per_class.targets == [1, 0, 2]
    assert np.array_equal(first_per_class.images, train_images[[0, 1, 3]])
    assert FashionMNIST(folder, limit=2).targets == [1, 0]

    val = build_dataset(f"fashion-mnist:{folder}", "val")
    assert len(val) == 2 and val.targets == [2, 0]
    train_split, val_split = build_labelled_splits(f"fashion-mnist:{folder}")
    assert (len(train_split), len(val_split)) == (4, 2)


def test_fashion_mnist_errors(tmp_path, tiny_fashion_dir):
    with pytest.raises(DataError, match="dataset-fashion-mnist") as error:
        FashionMNIST(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)
    folder = tiny_fashion_dir[0]
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        FashionMNIST(folder, split="test")
    header = bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big")
    with pytest.raises(DataError, match="truncated"):
        parse_idx(header + bytes(7))
    with pytest.raises(DataError, match="not an IDX file"):
        parse_idx(b"\x1f\x8b\x08\x00")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_fashion_mnist_real_debian_files():
    train = FashionMNIST(split="train")
    test = build_dataset("fashion-mnist", "val")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert sorted(set(train.targets)) == list(range(10)) == sorted(set(test.targets))
    image, label = train[0]
    assert label == 9 and train.classes[label] == "Ankle boot"
    assert image.mode == "RGB" and image.size == (28, 28)
    subset = FashionMNIST(split="train", subset=5)
    assert len(subset) == 50 and np.bincount(subset.targets).tolist() == [5] * 10


# ---------------------------------------------------------------- build_* on folders


def test_build_dataset_folder_layouts_and_class_mismatch(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=3)
    make_image_folder(root / "val", per_class=1)
    assert len(build_dataset(root, "train", subset=2)) == 6
    assert len(build_dataset(root / "train", "train")) == 9  # DINO layout
    assert len(build_dataset(root, "val")) == 3
    train, val = build_labelled_splits(root, subset=1)
    assert train.classes == val.classes and (len(train), len(val)) == (3, 3)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "typo", "train")

    mismatched = tmp_path / "mismatched"
    make_image_folder(mismatched / "train", classes=("cat", "cup"), per_class=1)
    make_image_folder(mismatched / "val", classes=("cat", "rocket"), per_class=1)
    with pytest.raises(DataError, match="different class folders") as error:
        build_labelled_splits(mismatched)
    message = str(error.value)
    assert all(s in message for s in (str(mismatched / "train"), str(mismatched / "val"), "cup", "rocket"))


# ---------------------------------------------------------------- sampler and workers


class _Length(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def test_resumable_sampler_continues_mid_epoch_in_the_same_order():
    dataset = _Length(23)
    sampler = ResumableDistributedSampler(dataset, batch_size=4, seed=7)  # no process group: 1 replica
    sampler.set_epoch(3)
    uninterrupted = list(sampler)
    assert sorted(uninterrupted) == list(range(23)) and uninterrupted != list(range(23))
    full_batches = [b.tolist() for b in DataLoader(dataset, batch_size=4, sampler=sampler)]

    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == uninterrupted[8:] and len(sampler) == 15
    resumed_batches = [b.tolist() for b in DataLoader(dataset, batch_size=4, sampler=sampler)]
    assert resumed_batches == full_batches[2:]

    sampler.set_epoch(3, start_batch=6)  # the epoch's 6 batches were all done: nothing left
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(4)  # the offset applies to one epoch only
    assert len(list(sampler)) == 23 and list(sampler) != uninterrupted
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(3, start_batch=7)


def test_resumable_sampler_shards_disjointly_over_two_replicas():
    dataset = _Length(24)
    shards = []
    for rank in range(2):
        sampler = ResumableDistributedSampler(dataset, batch_size=3, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(5)
        full = list(sampler)
        sampler.set_epoch(5, start_batch=1)
        assert list(sampler) == full[3:]
        shards.append(set(full))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(24))


class _WorkerState(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return np.random.randint(1 << 30), random.randint(0, 1 << 30), torch.get_num_threads(), os.getpid()


def test_seed_worker_gives_distinct_reproducible_streams_and_one_thread():
    def run(seed):
        loader = DataLoader(
            _WorkerState(),
            batch_size=2,
            num_workers=2,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed),
        )
        return [tuple(t.tolist() for t in batch) for batch in loader]

    first, second, other_seed = run(0), run(0), run(1)
    numpy_draws = [batch[0][0] for batch in first]
    assert numpy_draws[0] != numpy_draws[1]  # the two workers do not repeat each other's augmentations
    assert [b[:2] for b in first] == [b[:2] for b in second]  # same generator seed, same draws
    assert [b[:2] for b in first] != [b[:2] for b in other_seed]  # the seed comes from the generator
    assert all(threads == [1, 1] for _, _, threads, _ in first)
