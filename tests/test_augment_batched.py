"""The batched multi-crop: output contract, reproducibility, input checks, its resampler, and its loader half."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from simpool.data import ImageFolderDataset, UnreadableImageWarning
from simpool.dino.augment import DataAugmentationDINO, DecodeForGPU, GPUMultiCrop, collate_padded_skip_bad, pad_images
from simpool.dino.augment.batched import _edge_replicated_float, render_crops
from tests.augment_helpers import GLOBAL_SCALE, LOCAL_SCALE, denormalize, no_op_params, smooth_photo


def test_gpu_path_shapes_and_list_equals_padded_input():
    images = [
        torch.from_numpy(smooth_photo(h, w, seed=h)).permute(2, 0, 1).contiguous() for h, w in [(40, 60), (70, 30)]
    ]
    multicrop = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 2, global_crops_size=32, local_crops_size=16)
    from_list = multicrop(images, generator=torch.Generator().manual_seed(1))
    padded, sizes = pad_images(images)
    from_padded = multicrop(padded, sizes, generator=torch.Generator().manual_seed(1))
    assert [tuple(c.shape) for c in from_list] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert all(c.dtype == torch.float32 for c in from_list)
    for a, b in zip(from_list, from_padded):
        torch.testing.assert_close(a, b)


def test_gpu_path_seed_reproducibility():
    images = [torch.from_numpy(smooth_photo(50, 50 + 10 * i, seed=i)).permute(2, 0, 1) for i in range(3)]
    make = lambda seed: GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 2, 32, 16, torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = make(7)(images), make(7)(images), make(8)(images)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other))


def test_gpu_path_bad_input():
    multicrop = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 1, 16, 8)
    with pytest.raises(ValueError, match="uint8"):
        multicrop(torch.rand(2, 3, 10, 10))
    with pytest.raises(ValueError, match="sizes"):
        multicrop(torch.zeros(2, 3, 10, 10, dtype=torch.uint8), torch.tensor([[11, 5], [4, 4]]))
    with pytest.raises(ValueError, match="scale"):
        GPUMultiCrop((0.5, 0.2), LOCAL_SCALE, 1)


def test_roi_align_crop_matches_the_box():
    """The batched resampler cuts the same region as the CPU path (bilinear vs bicubic aside)."""
    photo = torch.from_numpy(smooth_photo(60, 90)).permute(2, 0, 1).contiguous()
    box = [5, 30, 40, 50]  # top, left, height, width: asymmetric, so a swapped x/y would show
    padded, sizes = pad_images([photo, torch.zeros(3, 70, 100, dtype=torch.uint8)])
    batched = render_crops(_edge_replicated_float(padded, sizes), 24, no_op_params([box]))
    cpu = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, 0, global_crops_size=24)
    single = cpu.render(photo, [no_op_params([box]), no_op_params([]), no_op_params([])])[0]
    assert (denormalize(batched[0]) - denormalize(single)).abs().mean() < 2.0


def test_edge_replication_fills_padding_with_each_images_border():
    padded, sizes = pad_images(
        [torch.full((3, 2, 3), 7, dtype=torch.uint8), torch.full((3, 4, 4), 9, dtype=torch.uint8)]
    )
    source = _edge_replicated_float(padded, sizes)
    assert source.shape == (2, 3, 5, 5)
    assert (source[0] == 7).all() and (source[1] == 9).all()


def test_decode_for_gpu_reduces_large_photos_only():
    small, large = Image.fromarray(smooth_photo(60, 80)), Image.fromarray(smooth_photo(300, 1100))
    pixels = DecodeForGPU(max_side=200)(small)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 60, 80)
    assert torch.equal(pixels, torch.from_numpy(smooth_photo(60, 80)).permute(2, 0, 1))
    assert DecodeForGPU(max_side=200)(large).shape == (3, 60, 220)  # 1100 // 200 = 5: reduced 5x


def test_padded_collate_skips_bad_files_and_feeds_the_multicrop(tmp_path):
    """The loader half of the batched path end to end: ImageFolder -> DecodeForGPU -> padded collate."""
    for name, (h, w) in {"a": (30, 40), "b": (50, 20)}.items():
        (tmp_path / name).mkdir()
        Image.fromarray(smooth_photo(h, w)).save(tmp_path / name / "0.jpg", quality=95)
    (tmp_path / "b" / "1.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(tmp_path, transform=DecodeForGPU())
    with pytest.warns(UnreadableImageWarning, match="1.jpg"):
        samples = [dataset[i] for i in range(len(dataset))]
    (images, sizes), labels, num_skipped = collate_padded_skip_bad(samples)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 50, 40)
    assert sizes.tolist() == [[30, 40], [50, 20]] and labels.tolist() == [0, 1] and int(num_skipped) == 1
    assert (images[0, :, :30, :40].float() - torch.from_numpy(smooth_photo(30, 40)).permute(2, 0, 1)).abs().mean() < 4
    assert (images[0, :, 30:] == 0).all() and (images[1, :, :, 20:] == 0).all()  # zero padding
    crops = GPUMultiCrop(GLOBAL_SCALE, LOCAL_SCALE, 1, 16, 8)(images, sizes)
    assert [tuple(c.shape) for c in crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)]
    all_bad = collate_padded_skip_bad([samples[2], samples[2]])
    assert all_bad.images is None and all_bad.labels is None and int(all_bad.num_skipped) == 2
