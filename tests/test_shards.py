"""simpool-pack and the shard reader: a packed folder is the same data set (bytes, order, labels, classes,
fingerprint, --subset, bad samples), a changed or broken shard is one error line, a pack resumes."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from simpool.cli.run_pack import byte_size
from simpool.cli.run_pack import main as pack_main
from simpool.data import (
    BadSample,
    FashionMNIST,
    FileListDataset,
    UnreadableImageWarning,
    build_dataset,
    build_labelled_splits,
    collate_skip_bad,
    dataset_fingerprint,
)
from simpool.data import pack as pack_module
from simpool.data.pack import pack
from simpool.data.paths import DataError
from simpool.data.shard_index import expand_braces, read_index, split_member_name
from simpool.data.shards import ShardDataset


def make_photos(root: Path, per_class: int = 5, val: int = 2, classes=("a", "b", "c")) -> Path:
    """Random 20x24 images, PNG and JPEG mixed (and one upper-case .JPEG), in train/ and val/ class folders."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
                image.save(folder / (f"{i}.png" if i % 2 else f"{i}.JPEG" if i == 2 else f"{i}.jpg"))
    return root


def pixels(sample) -> np.ndarray:
    return np.asarray(sample[0])


def run_pack(capsys, *argv: str) -> tuple[int, str, str]:
    code = pack_main([*argv, "--no_progress"] if "--verify" not in argv else list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def packed(tmp_path):
    photos = make_photos(tmp_path / "photos")
    result = pack(str(photos), tmp_path / "shards", shard_bytes=8192, progress=False)
    return photos, result.index_path


# ---------------------------------------------------------------------------------------------------------
# the round trip
# ---------------------------------------------------------------------------------------------------------
def test_a_packed_folder_is_the_same_data_set_byte_for_byte(packed):
    photos, index_path = packed
    for split in ("train", "val"):
        folder, shards = build_dataset(photos, split), build_dataset(index_path, split)
        assert isinstance(shards, ShardDataset) and len(shards) == len(folder) == (15 if split == "train" else 6)
        assert shards.classes == folder.classes == ["a", "b", "c"] and shards.targets == folder.targets
        prefix = str(folder.root) + os.sep
        assert shards.names == [path[len(prefix):] for path, _ in folder.samples]
        for i, (path, _) in enumerate(folder.samples):
            assert shards.read_bytes(i) == Path(path).read_bytes()  # stored as they are, not re-encoded
            assert np.array_equal(pixels(shards[i]), pixels(folder[i])) and shards[i][1] == folder[i][1]
        assert dataset_fingerprint(shards) == dataset_fingerprint(folder)
    index = read_index(index_path)
    train = index.splits["train"]
    assert len(train.shards) > 1  # 8 KiB shards: several
    with tarfile.open(index.folder / "train-000000.tar") as tar:  # WebDataset layout: <key>.<ext>, <key>.cls
        assert tar.getnames()[:4] == ["000000000.jpg", "000000000.cls", "000000001.png", "000000001.cls"]
        assert tar.extractfile("000000001.cls").read() == b"0"
    assert train.names[2] == "a/2.JPEG"
    with tarfile.open(index.folder / train.shards[train.shard[2]].file) as tar:
        assert "000000002.jpg" in tar.getnames()  # the upper-case .JPEG is stored as .jpg
    assert split_member_name("dir/000000002.tar.gz") == ("dir/000000002", "tar.gz")


def test_index_splits_serve_labelled_evaluation_like_the_folder(packed):
    photos, index_path = packed
    folder_train, folder_val = build_labelled_splits(photos, subset=2, val_subset=1)
    train, val = build_labelled_splits(index_path, subset=2, val_subset=1)
    assert train.names == ["a/0.jpg", "a/1.png", "b/0.jpg", "b/1.png", "c/0.jpg", "c/1.png"]
    assert (train.targets, val.targets) == (folder_train.targets, folder_val.targets) == ([0, 0, 1, 1, 2, 2], [0, 1, 2])
    assert dataset_fingerprint(train) == dataset_fingerprint(folder_train)
    assert dataset_fingerprint(val) == dataset_fingerprint(folder_val) != dataset_fingerprint(train)


def test_subset_keeps_the_first_images_of_each_class_and_the_fingerprint_of_the_folder_subset(packed):
    photos, index_path = packed
    folder, shards = build_dataset(photos, subset=3), build_dataset(index_path, subset=3)
    assert len(shards) == 9 and shards.targets == [0] * 3 + [1] * 3 + [2] * 3
    assert dataset_fingerprint(shards) == dataset_fingerprint(folder) != dataset_fingerprint(build_dataset(index_path))
    assert np.array_equal(pixels(shards[4]), pixels(folder[4]))


def test_a_train_only_pack_has_no_val_split_and_says_so(tmp_path):
    photos = make_photos(tmp_path / "photos")
    index_path = pack(str(photos / "train"), tmp_path / "shards", progress=False).index_path
    assert len(build_dataset(index_path)) == 15
    with pytest.raises(DataError, match=r"holds no 'val' split .*\['train'\]"):
        build_labelled_splits(index_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_packs_losslessly_into_train_and_val(tmp_path):
    """A small Fashion-MNIST folder in the Debian layout (IDX files written here): train + test as 'val'."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for prefix, count in (("train", 12), ("t10k", 5)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    source = f"fashion-mnist:{folder}"
    index_path = pack(source, tmp_path / "shards", progress=False).index_path
    for split, part in (("train", "train"), ("val", "test")):
        original, shards = FashionMNIST(folder, split=part), build_dataset(index_path, split)
        assert shards.targets == original.targets and shards.classes == original.classes
        assert all(np.array_equal(pixels(shards[i]), pixels(original[i])) for i in range(len(original)))
        assert dataset_fingerprint(shards) == dataset_fingerprint(original)
    assert dataset_fingerprint(build_dataset(index_path, subset=1)) == dataset_fingerprint(build_dataset(source,
                                                                                                          subset=1))


def test_an_unlabelled_file_list_packs_without_labels(tmp_path):
    make_photos(tmp_path / "photos", per_class=2, val=1)
    listing = tmp_path / "images.txt"
    listing.write_text("# crawl\nphotos/train/a/0.jpg\nphotos/train/b/1.png\n")
    index_path = pack(str(listing), tmp_path / "shards", progress=False).index_path
    shards, original = build_dataset(index_path), FileListDataset(listing)
    assert shards.names == ["photos/train/a/0.jpg", "photos/train/b/1.png"] and shards.targets == [-1, -1]
    assert dataset_fingerprint(shards) == dataset_fingerprint(original)
    assert np.array_equal(pixels(shards[1]), pixels(original[1]))
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000001.png"]  # no .cls without labels
    with pytest.raises(DataError, match="--subset needs class labels"):
        build_dataset(index_path, subset=1)
    with pytest.raises(DataError, match="holds no 'val' split"):
        build_labelled_splits(index_path)


# ---------------------------------------------------------------------------------------------------------
# bad samples and broken shards
# ---------------------------------------------------------------------------------------------------------
def test_an_unreadable_image_is_packed_as_it_is_then_skipped_and_counted(tmp_path):
    photos = make_photos(tmp_path / "photos")
    (photos / "train" / "b" / "1.png").write_bytes(b"not an image")
    index_path = pack(str(photos), tmp_path / "shards", progress=False).index_path
    shards = build_dataset(index_path, transform=pil_to_tensor)
    bad = shards.names.index("b/1.png")
    with pytest.warns(UnreadableImageWarning, match="b/1.png in .*train-000000.tar"):
        assert isinstance(shards[bad], BadSample)
    skipped = sum(int(batch.num_skipped) for batch in DataLoader(shards, batch_size=4, collate_fn=collate_skip_bad,
                                                                  num_workers=2))
    assert skipped == 1


def test_a_shard_truncated_after_packing_is_one_error_line_and_its_samples_bad_if_forced(packed, capsys):
    _, index_path = packed
    shard = index_path.parent / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        build_dataset(index_path)
    message = str(error.value)
    assert "train-000001.tar has" in message and "changed or truncated after packing" in message
    assert "\n" not in message
    # the same through a tool: one `error:` line, exit 2 (simpool-pack --verify names the shard too)
    code, _, err = run_pack(capsys, "--verify", str(index_path))
    assert code == 2 and err.startswith("error: ") and "train-000001.tar" in err and len(err.splitlines()) == 1


def test_a_rewritten_shard_of_the_same_size_is_caught_by_its_time_and_verify_restores_a_plain_copy(packed, capsys):
    _, index_path = packed
    shard = index_path.parent / "train-000000.tar"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # what a copy without -p does
    with pytest.raises(DataError, match="modified after .* simpool-pack --verify"):
        build_dataset(index_path)
    code, out, _ = run_pack(capsys, "--verify", str(index_path))
    assert code == 0 and "is up to date" in out
    assert len(build_dataset(index_path)) == 15  # the new time is recorded
    content = bytearray(shard.read_bytes())
    content[600] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(content))
    code, _, err = run_pack(capsys, "--verify", str(index_path))
    assert code == 2 and "does not hash as packed" in err


def test_a_missing_shard_a_foreign_json_and_a_newer_index_version_are_one_error_each(packed, tmp_path):
    _, index_path = packed
    payload = json.loads(index_path.read_text())
    (index_path.parent / "val-000000.tar").unlink()
    with pytest.raises(DataError, match="val-000000.tar listed in .* is missing"):
        build_labelled_splits(index_path)
    foreign = tmp_path / "other.json"
    foreign.write_text('{"images": []}')
    with pytest.raises(DataError, match="is not a simpool shard index"):
        build_dataset(foreign)
    payload["version"] = 99
    newer = index_path.parent / "newer.json"
    newer.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="version 99 shard index; this simpool reads version 1"):
        build_dataset(newer)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "nowhere" / "index.json")


# ---------------------------------------------------------------------------------------------------------
# shards without an index: a brace pattern
# ---------------------------------------------------------------------------------------------------------
def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("one.tar") == ["one.tar"]


def test_a_brace_pattern_reads_labels_from_cls_members_in_shard_order(packed):
    photos, index_path = packed
    count = len(read_index(index_path).splits["train"].shards)
    pattern = str(index_path.parent / f"train-{{000000..{count - 1:06d}}}.tar")
    shards, folder = build_dataset(pattern), build_dataset(photos)
    assert shards.names == [f"{i:09d}" for i in range(15)] and shards.targets == folder.targets
    assert shards.source == "WebDataset" and shards.classes == ["0", "1", "2"]
    assert np.array_equal(pixels(shards[7]), pixels(folder[7]))
    assert dataset_fingerprint(shards) != dataset_fingerprint(folder)  # no names of the source: another identity
    with pytest.raises(DataError, match="for 'val' .* pass the index.json"):
        build_labelled_splits(pattern)
    broken = index_path.parent / "broken.tar"
    broken.write_bytes((index_path.parent / "train-000000.tar").read_bytes()[:700])
    with pytest.raises(DataError, match="broken.tar is not a readable uncompressed tar"):
        build_dataset(str(broken))
    with pytest.raises(DataError, match="missing-000.tar does not exist"):
        build_dataset(str(index_path.parent / "missing-{000..001}.tar"))


# ---------------------------------------------------------------------------------------------------------
# packing: resumable, deterministic, the command line
# ---------------------------------------------------------------------------------------------------------
def test_an_interrupted_pack_keeps_its_verified_shards_and_ends_identical(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos")
    straight = pack(str(photos), tmp_path / "straight", shard_bytes=4096, progress=False)
    written = []
    original = pack_module.write_shard

    def dies_on_the_fourth(path, *args):
        if len(written) == 3:
            raise KeyboardInterrupt  # the job's time limit
        written.append(path.name)
        return original(path, *args)

    monkeypatch.setattr(pack_module, "write_shard", dies_on_the_fourth)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pack(str(photos), out, shard_bytes=4096, progress=False)
    monkeypatch.setattr(pack_module, "write_shard", original)
    assert not (out / "index.json").exists() and len(written) == 3
    (out / written[2]).write_bytes(b"damaged")  # a kept shard must verify, else it is written again
    resumed = pack(str(photos), out, shard_bytes=4096, progress=False)
    assert resumed.shards_kept == 2 and resumed.shards_written == straight.shards_written - 2
    straight_files = sorted(p.name for p in straight.index_path.parent.glob("*.tar"))
    assert straight_files == sorted(p.name for p in out.glob("*.tar"))
    for name in straight_files:  # deterministic tar headers: the same bytes
        assert (out / name).read_bytes() == (straight.index_path.parent / name).read_bytes()
    assert build_dataset(resumed.index_path).names == build_dataset(straight.index_path).names
    again = pack(str(photos), out, shard_bytes=4096, progress=False)
    assert again.shards_written == 0 and again.shards_kept == straight.shards_written


def test_pack_refuses_another_source_in_the_same_out_and_bad_input_is_one_line(packed, tmp_path, capsys):
    photos, index_path = packed
    code, _, err = run_pack(capsys, str(photos / "train"), str(index_path.parent))
    assert code == 2 and "holds a pack of another source" in err and len(err.splitlines()) == 1
    code, _, err = run_pack(capsys, str(tmp_path / "missing"), str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: --data_path") and "does not exist" in err
    code, _, err = run_pack(capsys, str(photos))
    assert code == 2 and "give SRC and OUT" in err
    with pytest.raises(SystemExit):
        pack_main([str(photos), str(tmp_path / "o"), "--shard_size", "lots"])
    assert byte_size("512M") == 512 << 20 and byte_size("1G") == 1 << 30 and byte_size("3000") == 3000


def test_pack_command_prints_where_the_index_is(tmp_path, capsys):
    photos = make_photos(tmp_path / "photos", per_class=2, val=1)
    code, out, _ = run_pack(capsys, str(photos), str(tmp_path / "shards"), "--shard_samples", "2")
    assert code == 0 and f"--data_path {tmp_path / 'shards' / 'index.json'}" in out
    assert "6 train, 3 val samples; wrote 5 shard(s)" in out  # 2 samples a shard: 3 + 2
    index = read_index(tmp_path / "shards" / "index.json")
    assert [s.samples for s in index.splits["train"].shards] == [2, 2, 2]
    assert all(len(s.sha256) == 64 for s in index.splits["val"].shards)


def test_a_shard_dataset_reopens_its_shards_in_each_process_and_bounds_open_files(packed):
    import pickle

    _, index_path = packed
    shards = ShardDataset.from_index(index_path, "train", max_open=2)
    first = [shards.read_bytes(i) for i in range(len(shards))]
    assert len(shards._open) == 2  # least recently used shards were closed
    clone = pickle.loads(pickle.dumps(shards))  # what a spawned loader worker gets: no descriptors
    assert clone._open == {} and [clone.read_bytes(i) for i in range(len(clone))] == first
    shards.close()
    assert io.BytesIO(first[0]).read(2) == b"\xff\xd8"  # a JPEG, as stored
