"""An unreadable image in an evaluation that scores every image: one ``error:`` line naming the file, exit 2, from
the main process and from loader workers alike, in every evaluator that reads its authors' layout."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simpool.data.every_item import UnreadableImageError, every_item, open_rgb, reading_image
from simpool.data.generated.copydays import write_copydays_style
from simpool.data.generated.davis import write_davis_style
from simpool.data.generated.revisitop import write_revisitop_style
from simpool.data.generated.voc import write_voc_style
from simpool.data.generated.voc_detection import write_voc_detection
from simpool.data.generated.wsol import write_wsol
from simpool.data.paths import DataError
from simpool.run.process import data_errors_agreed
from tests.helpers import needs_fashion, run_module, torchrun

TINY = ["--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides",
        "depth=1", "embed_dim=48", "num_heads=3"]


class Numbers(Dataset):
    """``index`` as a tensor; ``bad`` raises the DataError a data set raises for a file it cannot use."""

    def __init__(self, n: int, bad: int | None = None, error: type = UnreadableImageError):
        self.n, self.bad, self.error = n, bad, error

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad:
            raise self.error(f"/data/{index}.jpg", "OSError: broken data stream")
        if index == -1:
            raise RuntimeError("a bug, not a file")
        return torch.tensor(index)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_item_gives_the_loaders_batches_and_raises_a_workers_data_error_as_one_line(num_workers):
    expected = [batch.tolist() for batch in DataLoader(Numbers(10), batch_size=3)]
    assert [batch.tolist() for batch in every_item(Numbers(10), batch_size=3, num_workers=num_workers)] == expected
    seen = []
    with pytest.raises(UnreadableImageError) as caught:
        for batch in every_item(Numbers(10, bad=7), batch_size=3, num_workers=num_workers):
            seen.append(batch.tolist())
    assert seen == expected[:2]  # the batches before the bad one are delivered
    message = str(caught.value)
    assert message.startswith("/data/7.jpg cannot be read as an image (OSError: broken data stream): ")
    assert "\n" not in message and "Traceback" not in message and "Caught" not in message
    # a plain DataError keeps its type and message too; a bug in a data set is not turned into a data error
    with pytest.raises(DataError, match=r"^/data/4.jpg$"):
        list(every_item(Numbers(6, bad=4, error=lambda path, _: DataError(path)), batch_size=2,
                        num_workers=num_workers))


def test_open_rgb_decodes_fully_and_names_what_it_cannot(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((4, 6), 40000, dtype=np.uint16)).save(good)  # 16-bit grey: scaled, not clipped
    assert open_rgb(good).mode == "RGB" and open_rgb(good).getpixel((0, 0)) == (156, 156, 156)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    for path in (truncated, garbage):
        with pytest.raises(UnreadableImageError, match=rf"^{path} cannot be read as an image \("):
            open_rgb(path)
    with pytest.raises(UnreadableImageError, match="garbage.jpg cannot be read"):
        with reading_image(garbage) as image:
            np.asarray(image)
    with pytest.raises(DataError, match="^the block's own$"):  # passes unchanged, not reworded as unreadable
        with reading_image(good):
            raise DataError("the block's own")


# Each layout: (the command up to its output flag, the image to break, the result file that must not appear).
def _retrieval(root, out):
    write_revisitop_style(root, "roxford5k", num_queries=2, easy=1, hard=1, junk=1, negatives=3, long_side=48)
    return (["simpool.evaluation.run_retrieval", "--data_path", str(root), "--imsize", "48", *WORKERS,
             "--output_dir", str(out)], sorted((root / "roxford5k" / "jpg").glob("*.jpg"))[-1],
            out / "retrieval_roxford5k.json")


def _copy_detection(root, out):
    write_copydays_style(root, num_originals=3, strong_per_original=1, distractors=3, whitening=6, size=(32, 40),
                         seed=0)
    return (["simpool.evaluation.run_copy_detection", "--data_path", str(root / "copydays"), "--imsize", "32",
             "--whitening_path", str(root / "whitening"), *WORKERS, "--output_dir", str(out)],
            sorted((root / "copydays" / "strong").glob("*.jpg"))[1], out / "copy_detection.json")


def _localization(root, out):
    images, metadata = write_wsol(root, 4, image_size=32)
    return (["simpool.evaluation.run_localization", "--data_path", str(images), "--metadata", str(metadata),
             "--image_size", "32", *WORKERS, "--output_dir", str(out)], sorted(images.rglob("*.jpg"))[2],
            out / "localization.json")


def _object_discovery(root, out):
    voc = write_voc_detection(root, 4, image_size=32, year="2007")
    return (["simpool.evaluation.run_object_discovery", "--data_path", str(voc), *WORKERS, "--output_dir", str(out)],
            sorted((voc / "JPEGImages").glob("*.jpg"))[2], out / "object_discovery.json")


def _video_frame(root, out):  # DAVIS reads its frames in the main process
    write_davis_style(root, num_videos=1, num_frames=3, size=(32, 48))
    return (["simpool.evaluation.run_video_segmentation", "--data_path", str(root), "--short_side", "64",
             "--output_dir", str(out)], sorted((root / "JPEGImages" / "480p").rglob("*.jpg"))[1],
            out / "video_segmentation.json")


def _video_annotation(root, out):
    command, _, results = _video_frame(root, out)
    return command, sorted((root / "Annotations" / "480p").rglob("*.png"))[0], results


def _attention_scores(root, out):  # images and masks read in the main process
    write_voc_style(root, 3, image_size=32)
    return (["simpool.evaluation.run_attention", "--data_path", str(root), "--image_size", "32", "--output",
             str(out / "attention.json")], sorted((root / "JPEGImages").glob("*.jpg"))[1], out / "attention.json")


def _segmentation_probe(root, out):
    write_voc_style(root, 3, image_size=32, split="train", list_name="train", id_prefix="train_")
    write_voc_style(root, 2, image_size=32, split="test", list_name="val", id_prefix="val_")
    return (["simpool.evaluation.run_segmentation", "--data_path", str(root), "--epochs", "1", *WORKERS,
             "--output_dir", str(out)], root / "JPEGImages" / "val_000001.jpg", out / "segmentation.json")


WORKERS = ["--num_workers", "2"]  # the error crosses from a loader worker
LAYOUTS = [_retrieval, _copy_detection, _localization, _object_discovery, _video_frame, _video_annotation]
NEEDS_FASHION = [_attention_scores, _segmentation_probe]  # their generated layouts draw Fashion-MNIST items


@pytest.mark.parametrize("layout", LAYOUTS + [pytest.param(f, marks=needs_fashion) for f in NEEDS_FASHION],
                         ids=lambda f: f.__name__[1:])
def test_an_unreadable_image_is_one_error_line_naming_it(tmp_path, layout):
    (tmp_path / "out").mkdir()
    command, victim, results = layout(tmp_path / "data", tmp_path / "out")
    victim.write_bytes(b"\xff\xd8 cut short")
    result = run_module(*command, *TINY)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].split("error: ", 1)[1].startswith(f"{victim} cannot be read as an image (")
    assert not results.exists()  # no result from part of the data


def test_an_unreadable_image_on_one_of_two_ranks_stops_both_with_the_line_and_keeps_the_others_work(tmp_path):
    command, victim, results = _localization(tmp_path / "data", tmp_path / "out")
    readable = victim.read_bytes()
    victim.write_bytes(b"junk")
    result = run_module(*command, *TINY, "--no_progress", launcher=torchrun())
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert "[rank0]" not in result.stderr and "[rank1]" not in result.stderr, result.stderr[-3000:]  # no traceback
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines and all(line.startswith(f"error: {victim} cannot be read as an image (") for line in lines)
    assert not results.exists()
    done = [json.loads(line) for path in (tmp_path / "out").glob("localization.rank*.jsonl")
            for line in path.read_text().splitlines()]
    assert len(done) == 2  # the other rank's share of the 4 images, kept for the rerun
    victim.write_bytes(readable)
    again = run_module(*command, *TINY, "--no_progress", launcher=torchrun())
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(results.read_text())["num_images"] == 4


def test_alone_the_error_is_raised_as_it_is():
    with pytest.raises(UnreadableImageError, match="^/data/1.jpg cannot be read"):
        with data_errors_agreed():
            list(every_item(Numbers(3, bad=1)))
