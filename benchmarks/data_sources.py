"""Where large runs keep their data: an ImageFolder walked by every rank, the same folder listed once per run
(simpool.data.file_index), and WebDataset shards with an index (simpool-pack), measured side by side.

    python benchmarks/data_sources.py                          # 200,000 JPEGs in 1,000 classes under /tmp
    python benchmarks/data_sources.py --root /scratch/bench --images 20000 --classes 100   # a quicker try

1. Generates (once, kept for reruns) a tree of small JPEGs (48x48 crops of real photos, ~1.5 KB each) in
   ``ROOT/folder/train/<class>/``, then packs it with ``simpool.data.pack`` into ``ROOT/shards``.
2. Start-up to the first batch with 2 processes (a gloo group on localhost, forked after torch is imported):
   every rank walks the folder / rank 0 lists it into a fresh run folder and rank 1 reads the list / a
   relaunch where both read the kept list / the shard index. The time is the slower rank's, from a barrier to
   its first batch of 64 (the training sampler, one loader process).
3. File opens per 1,000 training images: ``strace -f -c`` of a process reading 2,000 samples in a shuffled
   order, minus the same process reading 1,000 (start-up and first-use imports cancel out): ``openat`` and the
   stat family (metadata operations) for the folder and for the shards.
4. Loader throughput of one worker: a DataLoader with ``num_workers=1`` decoding shuffled samples to uint8
   tensors, folder vs shards, images/s over ``--throughput_images`` after a warm-up batch.

Prints each number and the ratios. The data are on this machine's local disk and in its page cache (just
written): see benchmarks/RESULTS.md for what a cluster file system adds on top.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from simpool.data import ResumableDistributedSampler, build_dataset, collate_skip_bad  # noqa: E402
from simpool.data.build import SourceOptions  # noqa: E402
from simpool.data.pack import pack  # noqa: E402

BATCH = 64


# ---------------------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------------------
def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def _write_class(args: tuple[str, int, int, int]) -> None:
    folder, label, count, first = args
    photos = _photos()
    rng = np.random.default_rng(label)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        photo = photos[(label + i) % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        crop = Image.fromarray(photo[y:y + 96, x:x + 96]).resize((48, 48))
        crop.save(os.path.join(folder, f"img_{first + i:07d}.JPEG"), quality=85)


def generate(train_dir: Path, images: int, classes: int) -> None:
    marker = train_dir.parent / f".complete-{images}-{classes}"
    if marker.is_file():
        return
    if train_dir.exists():
        shutil.rmtree(train_dir)
    per_class = images // classes
    jobs = [(str(train_dir / f"n{c:08d}"), c, per_class, c * per_class) for c in range(classes)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_write_class, jobs, chunksize=8)
    marker.write_text("")
    print(f"generated {per_class * classes} JPEGs in {classes} classes in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------------------
# 2. start-up to the first batch, 2 processes
# ---------------------------------------------------------------------------------------------------------
def _first_batch(rank: int, port: int, data_path: str, listing_dir: str | None, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist.barrier()
    start = time.perf_counter()
    dataset = build_dataset(data_path, "train", transform=pil_to_tensor,
                            options=SourceOptions(listing_dir=listing_dir))
    sampler = ResumableDistributedSampler(dataset, batch_size=BATCH, num_replicas=2, rank=rank, seed=0,
                                          drop_last=True)
    sampler.set_epoch(0)
    batch = next(iter(DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collate_skip_bad)))
    assert batch.images.shape[0] == BATCH
    results.put((rank, time.perf_counter() - start, len(dataset)))
    dist.destroy_process_group()


def startup_seconds(data_path: str, listing_dir: str | None) -> tuple[float, int]:
    """The slower rank's seconds from a barrier to its first batch, and the data set's size."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_first_batch, args=(r, port, data_path, listing_dir, results)) for r in range(2)]
    for p in procs:
        p.start()
    times = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return max(t for _, t, _ in times), times[0][2]


# ---------------------------------------------------------------------------------------------------------
# 3. file opens per 1,000 images (strace)
# ---------------------------------------------------------------------------------------------------------
_STAT_CALLS = ("newfstatat", "statx", "stat", "lstat", "fstat", "fstatat64")


def _read_samples(data_path: str, count: int) -> None:
    """The traced child: build the data set, read ``count`` samples in a shuffled order (as a sampler would)."""
    dataset = build_dataset(data_path, "train")
    generator = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(len(dataset), generator=generator)
                       for _ in range(-(-count // len(dataset)))])[:count].tolist()  # epochs end to end
    for i in order:
        dataset[i]


def syscall_counts(data_path: str, count: int) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".strace") as trace:
        command = ["strace", "-f", "-c", "-o", trace.name, "-e", f"trace=openat,open,{','.join(_STAT_CALLS)}",
                   sys.executable, __file__, "--_read", data_path, str(count)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        counts = {}
        for line in Path(trace.name).read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and re.fullmatch(r"\d+", fields[3]) and fields[-1] != "total":
                counts[fields[-1]] = int(fields[3])
    opens = counts.get("openat", 0) + counts.get("open", 0)
    stats = sum(counts.get(name, 0) for name in _STAT_CALLS)
    return {"opens": opens, "stats": stats}


def per_thousand(data_path: str) -> dict[str, int]:
    """Calls of reading 2,000 samples minus those of reading 1,000: start-up and first-use imports (PIL's
    decoders) cancel out."""
    base, read = syscall_counts(data_path, 1000), syscall_counts(data_path, 2000)
    return {key: read[key] - base[key] for key in base}


# ---------------------------------------------------------------------------------------------------------
# 4. one loader worker's throughput
# ---------------------------------------------------------------------------------------------------------
def worker_throughput(data_path: str, images: int) -> float:
    dataset = build_dataset(data_path, "train", transform=pil_to_tensor)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=1, collate_fn=collate_skip_bad)
    batches = iter(loader)
    next(batches)  # the worker is up
    start, seen = time.perf_counter(), 0
    while seen < images:
        seen += next(batches).images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/simpool_data_sources", help="where the tree and shards go (kept)")
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--shard_size", default=64 << 20, type=int, help="bytes per shard")
    parser.add_argument("--throughput_images", type=int, default=6_400)
    parser.add_argument("--repeats", type=int, default=3, help="start-up runs of each kind (the minimum is shown)")
    parser.add_argument("--_read", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._read:
        _read_samples(args._read[0], int(args._read[1]))
        return
    torch.set_num_threads(1)
    root = Path(args.root)
    train_dir = root / "folder" / "train"
    generate(train_dir, args.images, args.classes)
    start = time.perf_counter()
    index = pack(str(train_dir), root / "shards", shard_bytes=args.shard_size, progress=False).index_path
    print(f"packed (or verified) {index} in {time.perf_counter() - start:.0f} s; "
          f"{len(list(index.parent.glob('*.tar')))} shards")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
          f"torch {torch.__version__}")

    listing_dir = root / "run"
    runs = {"folder": [], "first": [], "again": [], "shards": []}
    for _ in range(args.repeats):  # interleaved, so that a burst of load on the machine hits every variant
        shutil.rmtree(listing_dir, ignore_errors=True)
        listing_dir.mkdir(parents=True)  # a relaunch's run folder (a fresh one gets the list through the group)
        seconds, size = startup_seconds(str(train_dir), None)
        runs["folder"].append(seconds)
        runs["first"].append(startup_seconds(str(train_dir), str(listing_dir))[0])
        runs["again"].append(startup_seconds(str(train_dir), str(listing_dir))[0])
        seconds, shard_size = startup_seconds(str(index), None)
        runs["shards"].append(seconds)
        assert size == shard_size
    folder_s, listed_first_s, listed_again_s, shards_s = (min(runs[k]) for k in ("folder", "first", "again", "shards"))
    print(f"\nstart-up to the first batch, 2 processes, {size} images (slower rank, min of {args.repeats}):")
    print(f"  folder walked by each rank       {folder_s:7.2f} s")
    print(f"  listed once: first launch        {listed_first_s:7.2f} s   ({folder_s / listed_first_s:.2f}x)")
    print(f"  listed once: relaunch            {listed_again_s:7.2f} s   ({folder_s / listed_again_s:.2f}x)")
    print(f"  shard index                      {shards_s:7.2f} s   ({folder_s / shards_s:.2f}x)")

    folder_calls, shard_calls = per_thousand(str(train_dir)), per_thousand(str(index))
    print("\nper 1,000 training images (strace: 2,000 read minus 1,000 read):")
    print(f"  folder: {folder_calls['opens']} opens, {folder_calls['stats']} stats")
    print(f"  shards: {shard_calls['opens']} opens, {shard_calls['stats']} stats   "
          f"({folder_calls['opens'] / max(shard_calls['opens'], 1):.0f}x fewer opens)")

    folder_rate = worker_throughput(str(train_dir), args.throughput_images)
    shard_rate = worker_throughput(str(index), args.throughput_images)
    print(f"\none loader worker, shuffled, decode to uint8 tensors ({args.throughput_images} images):")
    print(f"  folder {folder_rate:8.0f} img/s")
    print(f"  shards {shard_rate:8.0f} img/s   ({shard_rate / folder_rate:.2f}x)")
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
