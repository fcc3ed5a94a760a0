"""Fashion-on-photos: determinism, exact masks and boxes, splits, Dataset views, VOC-style folders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.data import FASHION_MNIST_DIR
from simpool.data.fashion_on_photos import (
    ITEM_SIDE,
    MASK_THRESHOLD,
    TRAIN_REGION,
    FashionOnPhotosDataset,
    load_background_photos,
    load_fashion_mnist,
    make_fashion_on_photos,
    render_fashion_on_photo,
)
from simpool.data.generated.voc import write_voc_style
from simpool.data.masks import read_mask_folder
from simpool.evaluation.attention_metrics import evaluate_maps

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist",
)
SIZE = 48  # small images keep the file fast; the recipe does not depend on the size


def test_fashion_mnist_test_split_loads():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


def test_generator_is_deterministic_prefix_stable_and_seed_dependent():
    first = make_fashion_on_photos(6, image_size=SIZE, seed=0, split="test")
    again = make_fashion_on_photos(6, image_size=SIZE, seed=0, split="test")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    prefix = make_fashion_on_photos(3, image_size=SIZE, seed=0, split="test")
    assert torch.equal(prefix.images, first.images[:3]) and torch.equal(prefix.masks, first.masks[:3])
    other = make_fashion_on_photos(6, image_size=SIZE, seed=1, split="test")
    assert not torch.equal(other.images, first.images)
    assert not torch.equal(other.masks, first.masks)
    assert first.images.shape == (6, 3, SIZE, SIZE) and first.images.dtype == torch.uint8
    assert first.masks.shape == (6, SIZE, SIZE) and first.masks.dtype == torch.bool
    assert first.boxes.shape == (6, 4) and first.labels.shape == (6,)


def expected_background(sample, size: int) -> np.ndarray:
    """Re-derive the background from the photo and the recorded crop, independently of the module."""
    photo = dict(load_background_photos())[sample.photo]
    x0, y0, x1, y1 = sample.crop
    patch = photo[y0:y1, x0:x1]
    if sample.flipped:
        patch = patch[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))


@pytest.mark.parametrize("split", ["test", "train"])
def test_masks_are_the_pasted_item_pixels_and_boxes_are_tight(split):
    items, labels = load_fashion_mnist(split)
    for index in range(6):
        sample = render_fashion_on_photo(index, SIZE, seed=3, split=split)
        image, mask = sample.image.astype(int), sample.mask
        # Outside the mask the image is the photo crop, byte for byte.
        background = expected_background(sample, SIZE)
        assert np.array_equal(sample.background, background)
        assert np.array_equal(image[~mask], background[~mask].astype(int))
        # Inside, the coloured item replaced the photo (it differs almost everywhere).
        assert mask.sum() > 20
        assert (np.abs(image[mask] - background[mask]).sum(axis=1) > 0).mean() > 0.9
        # The mask is the resized Fashion-MNIST item above the threshold, where it was pasted.
        ix0, iy0, ix1, iy1 = sample.item_box
        side = ix1 - ix0
        assert iy1 - iy0 == side and ITEM_SIDE[0] * SIZE - 1 <= side <= ITEM_SIDE[1] * SIZE + 1
        item = np.asarray(Image.fromarray(items[sample.fashion_index]).resize((side, side), Image.BILINEAR))
        assert np.array_equal(mask[iy0:iy1, ix0:ix1], item / 255.0 > MASK_THRESHOLD)
        assert mask.sum() == mask[iy0:iy1, ix0:ix1].sum()
        assert sample.label == labels[sample.fashion_index]
        # The box encloses the mask tightly: every edge row/column of the box holds a mask pixel.
        x0, y0, x1, y1 = sample.box.tolist()
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()


def test_train_and_test_splits_use_disjoint_photo_regions_and_items():
    photos = dict(load_background_photos())
    for split in ("train", "test"):
        for index in range(12):
            sample = render_fashion_on_photo(index, SIZE, seed=0, split=split)
            height, width = photos[sample.photo].shape[:2]
            x0, y0, x1, y1 = sample.crop
            start, stop = (x0, x1) if width >= height else (y0, y1)
            cut = round(TRAIN_REGION * max(height, width))
            assert stop <= cut if split == "train" else start >= cut
    train = make_fashion_on_photos(4, image_size=SIZE, split="train")
    test = make_fashion_on_photos(4, image_size=SIZE, split="test")
    assert not torch.equal(train.images, test.images)


def test_as_pil_and_datasets_match_the_arrays():
    data = make_fashion_on_photos(3, image_size=SIZE, seed=2, split="test")
    pil = make_fashion_on_photos(3, image_size=SIZE, seed=2, split="test", as_pil=True).images
    assert all(np.array_equal(np.asarray(p), img.permute(1, 2, 0).numpy()) for p, img in zip(pil, data.images))

    train_view = FashionOnPhotosDataset(3, image_size=SIZE, seed=2, split="test")
    image, label = train_view[1]
    assert isinstance(image, Image.Image) and label == int(data.labels[1])
    flipped = FashionOnPhotosDataset(3, image_size=SIZE, seed=2, split="test",
                                     transform=lambda im: im.transpose(Image.FLIP_LEFT_RIGHT))
    assert np.array_equal(np.asarray(flipped[0][0]), np.asarray(pil[0])[:, ::-1])

    eval_view = FashionOnPhotosDataset(3, image_size=SIZE, seed=2, split="test", mode="eval")
    tensor, mask, box = eval_view[2]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(tensor * std + mean, data.images[2].float() / 255, atol=1e-5)
    assert torch.equal(mask, data.masks[2]) and torch.equal(box, data.boxes[2])
    assert len(eval_view) == 3 and torch.equal(eval_view[-1][1], mask)
    with pytest.raises(IndexError):
        eval_view[3]
    from torchvision import transforms

    resized = FashionOnPhotosDataset(2, image_size=SIZE, mode="eval",
                                     transform=transforms.Compose([transforms.Resize(32), transforms.ToTensor()]))
    with pytest.raises(ValueError, match="must not crop/resize"):
        resized[0]
    with pytest.raises(ValueError, match="split"):
        make_fashion_on_photos(2, split="val")
    with pytest.raises(ValueError, match="image_size"):
        make_fashion_on_photos(2, image_size=8)


def test_voc_style_round_trip(tmp_path):
    ids = write_voc_style(tmp_path, 4, image_size=SIZE, seed=5, split="test")
    data = make_fashion_on_photos(4, image_size=SIZE, seed=5, split="test")
    assert ids == ["000000", "000001", "000002", "000003"]
    assert (tmp_path / "ImageSets" / "Segmentation" / "test.txt").read_text().split() == ids
    labels = [int(line.split()[1]) for line in (tmp_path / "labels.txt").read_text().splitlines()]
    assert labels == data.labels.tolist()
    with Image.open(tmp_path / "SegmentationObject" / "000000.png") as png:
        assert png.mode == "L" and set(np.unique(np.asarray(png))) == {0, 255}

    folder = read_mask_folder(tmp_path)
    assert len(folder) == 4 and folder.names == ids
    for i, sample in enumerate(folder):
        assert torch.equal(sample.mask, data.masks[i])  # PNG is lossless, and 255 is read as object
        assert not sample.void.any()
        assert sample.boxes.tolist() == [data.boxes[i].tolist()]
        # The JPEG holds exactly the rendered image, encoded at quality 95.
        encoded = io.BytesIO()
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(encoded, format="JPEG", quality=95)
        assert np.array_equal(np.asarray(sample.image), np.asarray(Image.open(encoded).convert("RGB")))


def test_read_mask_folder_follows_voc_conventions(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationObject").mkdir()
    Image.new("RGB", (6, 5), (10, 20, 30)).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    Image.new("RGB", (6, 5)).save(tmp_path / "JPEGImages" / "2007_000002.jpg")  # no mask: skipped
    labels = np.zeros((5, 6), np.uint8)
    labels[0:2, 0:2] = 1  # object 1
    labels[3:5, 3:6] = 2  # object 2
    labels[2, 0:3] = 255  # void band
    palette_png = Image.fromarray(labels, mode="P")
    palette_png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 756 + [224, 224, 192])
    palette_png.save(tmp_path / "SegmentationObject" / "2007_000001.png")

    folder = read_mask_folder(tmp_path)
    assert folder.names == ["2007_000001"]
    sample = folder[0]
    assert torch.equal(sample.mask, torch.from_numpy((labels == 1) | (labels == 2)))
    assert torch.equal(sample.void, torch.from_numpy(labels == 255))
    assert sample.boxes.tolist() == [[0, 0, 2, 2], [3, 3, 6, 5]]
    forced = read_mask_folder(tmp_path, binary=True)[0]
    assert forced.mask.sum() == (labels != 0).sum() and not forced.void.any()
    # The folder plugs straight into the metrics: a map on the objects' pixels scores Jaccard 1.
    report = evaluate_maps([sample.mask.float()], [sample.mask], gt_boxes=[sample.boxes],
                           ignore_masks=[sample.void])
    assert report["best_head"]["jaccard_best_threshold"] == 1.0

    Image.new("L", (6, 5)).save(tmp_path / "SegmentationObject" / "orphan.png")
    with pytest.raises(ValueError, match="has no image"):
        read_mask_folder(tmp_path)
    with pytest.raises(ValueError, match="VOC-style"):
        read_mask_folder(tmp_path / "JPEGImages")
