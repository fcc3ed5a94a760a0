"""Fault injection, data and files: unreadable batches on one or all ranks, odd image files, unreadable
images in the visualiser, damaged export folders and weights.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.dino.run_train import main
from tests.helpers import (
    TINY,
    free_port,
    log_lines,
    photo_folder,
    run_cli,
    state_of,
)


def _corrupt_batch(root: Path, world: int, batch: int, rank: int) -> list[str]:
    """Overwrite the files of ``rank``'s first batch of epoch 0 (as the training sampler deals them)."""
    from simpool.data import ImageFolderDataset, ResumableDistributedSampler

    dataset = ImageFolderDataset(root / "train")
    sampler = ResumableDistributedSampler(dataset, batch_size=batch, num_replicas=world, rank=rank, seed=0,
                                          drop_last=True)
    sampler.set_epoch(0)
    paths = [dataset.samples[i][0] for i in list(sampler)[:batch]]
    for path in paths:
        Path(path).write_bytes(b"not an image")
    return paths


def test_an_all_unreadable_batch_keeps_the_counter_exact(tmp_path):
    data = photo_folder(tmp_path / "photos")
    _corrupt_batch(data, world=1, batch=4, rank=0)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="unreadable"):
        assert main([*TINY, "--data_path", str(data), "--epochs", "2", "--output_dir", str(out)]) == 0
    lines = log_lines(out)
    assert lines[0]["train_skipped_batches"] == 1 and lines[0]["train_unreadable_images"] >= 4
    state = state_of(out / "checkpoint.pth")
    assert (state["epoch"], state["epoch_sample"], state["iteration"]) == (2, 0, 6)  # 12 images / 4, x 2


@pytest.mark.parametrize("accum_steps, steps", [(1, 3), (2, 1)])  # 12 images / (2 x 2 x accum_steps)
def test_an_all_unreadable_batch_on_one_of_two_ranks_skips_on_both(tmp_path, accum_steps, steps):
    """With --accum_steps 2 the unreadable batch is one micro-batch of a step: both ranks drop it and make the
    step from the other one (the same number of backward passes, else DDP would hang)."""
    data = photo_folder(tmp_path / "photos")
    _corrupt_batch(data, world=2, batch=2, rank=1)
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    flags = [*TINY, "--data_path", str(data), "--batch_size_per_gpu", "2", "--epochs", "1", "--output_dir", str(out),
             "--accum_steps", str(accum_steps)]
    result = run_cli(flags, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    line = log_lines(out)[-1]
    assert line["train_skipped_batches"] == 1 and line["teacher_rank_max_diff"] == 0.0
    assert line["train_skipped_steps"] == 0  # the step itself was made
    assert state_of(out / "checkpoint.pth")["iteration"] == steps


# ---------------------------------------------------------------------------------------------------------
# odd files
# ---------------------------------------------------------------------------------------------------------
def test_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    from simpool.data.images import load_rgb_image

    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb_image(str(path)))
    assert pixels[..., 0].tolist() == [[0, 128], [255, 4]] and (pixels[..., 0] == pixels[..., 2]).all()


def test_visualiser_skips_and_counts_unreadable_images_and_keeps_same_stems_apart(tmp_path, capsys):
    from simpool.cli.run_visualize import main as visualize
    from simpool.models import build_backbone

    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=48, num_heads=2)
    weights = tmp_path / "model.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 8,
                         "model_overrides": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}, weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / "photo.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "viz"
    code = visualize(["--pretrained_weights", str(weights), "--image_path", str(images), "--output_dir", str(out),
                      "--image_size", "32", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["photo_jpg", "photo_png"]
    assert "1 of 3 images skipped as unreadable: broken.jpg" in printed.out


def test_load_backbone_and_export_errors_name_the_problem(tmp_path):
    from safetensors.torch import save_file

    from simpool.export import export_backbone
    from simpool.loading import WEIGHTS_FILE, load_backbone
    from simpool.models import build_backbone

    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    model = build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=1, embed_dim=48, num_heads=2)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "simpool", "patch_size": 8,
                         "model_overrides": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}, checkpoint)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile is a file, not a folder"):
        export_backbone(checkpoint, tmp_path / "afile" / "export")
    out = export_backbone(checkpoint, tmp_path / "export")
    data = (out / WEIGHTS_FILE).read_bytes()
    (out / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="cannot be read .*damaged or incomplete"):
        load_backbone(out)
    save_file({"x": torch.zeros(1)}, str(out / WEIGHTS_FILE))  # readable again: the usual key check applies
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone(out)


# ---------------------------------------------------------------------------------------------------------
# data trees as file systems make them: links, loops, hidden files, file lists
# ---------------------------------------------------------------------------------------------------------
def test_a_link_loop_in_the_data_is_refused_naming_the_link_in_every_reader(tmp_path, capsys):
    from simpool.data import ImageFolderDataset
    from simpool.data.file_index import scan_image_folder
    from simpool.data.paths import DataError
    from simpool.evaluation.run_knn import main as knn

    data = photo_folder(tmp_path / "photos")
    loop = data / "train" / "a" / "loop"
    loop.symlink_to("..")  # train/a/loop -> train: os.walk follows it ~40 levels deep
    for read in (ImageFolderDataset, scan_image_folder):
        with pytest.raises(DataError, match=rf"{loop} -> \.\. leads back to a folder above it \(a link loop"):
            read(data / "train")
    out = tmp_path / "run"
    assert main([*TINY, "--data_path", str(data), "--output_dir", str(out)]) == 2
    assert knn(["--random_init", "--arch", "vit_tiny", "--patch_size", "4", "--model_overrides", "depth=1",
                "embed_dim=32", "num_heads=2", "--data_path", str(data), "--image_size", "16"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(f"{loop} -> .. leads back" in line for line in errors), errors
    assert not out.exists()


def test_links_are_followed_once_and_hidden_or_non_image_files_are_not_images(tmp_path):
    from torchvision.datasets.folder import make_dataset

    from simpool.data import ImageFolderDataset
    from simpool.data.file_index import scan_image_folder

    data = photo_folder(tmp_path / "photos")
    train = data / "train"
    elsewhere = photo_folder(tmp_path / "elsewhere")
    (train / "c").symlink_to(elsewhere / "train" / "b")  # a class folder that is a link: followed
    (train / "a" / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(train / "a" / "sub" / "x.png")
    plain = {path for path, _ in ImageFolderDataset(train).samples}
    # torchvision's walk on the tree so far (links to new folders, no loops, no hidden files): the same samples
    classes = ["a", "b", "c"]
    assert ImageFolderDataset(train).samples == make_dataset(str(train), {c: i for i, c in enumerate(classes)},
                                                             extensions=(".png",))
    (train / "a" / "again").symlink_to("sub")  # a second way into a/sub: its image once only
    (train / "a" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")  # hidden: not an image
    (train / "a" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(train / "a" / ".ipynb_checkpoints" / "y.png")
    (train / "a" / "notes.txt").write_text("not an image")
    samples = ImageFolderDataset(train).samples
    assert {path for path, _ in samples} == plain and len(samples) == len(plain)
    listed = scan_image_folder(train)
    assert sum(len(files) for files in listed["files"]) == len(plain) and "sub/x.png" in listed["files"][0]


def test_a_file_list_naming_a_folder_is_an_error_and_a_mostly_unreadable_one_a_warning(tmp_path, capsys):
    from simpool.data.images import FileListDataset, MostlyUnreadableListWarning
    from simpool.data.paths import DataError

    data = photo_folder(tmp_path / "photos")
    images = sorted((data / "train" / "a").iterdir())
    listing = tmp_path / "images.txt"
    listing.write_text(f"{images[0]}\n{data / 'train' / 'b'}\n")
    with pytest.raises(DataError, match=rf"lists {data / 'train' / 'b'}, which is a folder: list image files"):
        FileListDataset(listing)
    assert main([*TINY, "--data_path", str(listing), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "which is a folder" in err and len(err.splitlines()) == 1
    listing.write_text("\n".join([str(images[0]), *(f"gone/{i}.png" for i in range(5))]) + "\n")
    with pytest.warns(MostlyUnreadableListWarning, match=r"most of .*images.txt is unreadable: 5 of its 6 entries"):
        assert len(FileListDataset(listing)) == 6
    listing.write_text("\n".join(str(p) for p in images) + "\ngone.png\n")  # one missing: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", MostlyUnreadableListWarning)
        FileListDataset(listing)


def test_fine_tuning_with_mixup_keeps_batches_even_when_an_image_is_unreadable(tmp_path):
    from simpool.finetune.run_finetune import main as finetune

    data = photo_folder(tmp_path / "photos")  # 12 train images: 3 batches of 4
    (data / "train" / "a" / "0001.png").write_bytes(b"not an image")  # its batch comes with 3 images
    out = tmp_path / "ft"
    flags = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "4", "--model_overrides",
             "depth=1", "embed_dim=32", "num_heads=2", "--input_size", "16", "--batch_size_per_gpu", "4",
             "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--precision", "fp32",
             "--data_path", str(data), "--output_dir", str(out)]  # mixup 0.8 / cutmix 1.0: the defaults
    with pytest.warns(UserWarning, match="unreadable"):
        assert finetune(flags) == 0
    line = log_lines(out)[-1]
    assert line["train_unreadable_images"] == 1 and line["train_dropped_for_mixup"] == 1, line
    assert line["train_skipped_batches"] == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 3  # every batch consumed
