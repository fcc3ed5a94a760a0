"""``simpool-pack SRC OUT``: write a data set into WebDataset tar shards and their index (``OUT/index.json``).

    simpool-pack /data/imagenet /scratch/imagenet-shards                   # train/ and val/ -> both splits
    simpool-pack /data/imagenet/train /scratch/in1k-train --shard_size 512M
    simpool-pack fashion-mnist shards/fashion-mnist --shard_size 16M        # train + test (as 'val')
    simpool-pack images.txt shards/crawl                                    # unlabelled list
    simpool-pack --verify /scratch/imagenet-shards/index.json               # sha256 of every shard

Then ``--data_path OUT/index.json`` in every tool. Rerunning an interrupted command keeps the shards it
finished (each checked against its sha256) and continues; the library is :mod:`simpool.data.pack`.
"""

from __future__ import annotations

import argparse
import re
import sys

from simpool.data.pack import pack, verify_index
from simpool.data.paths import DataError
from simpool.run.config import AT_LEAST_ONE, ConfigError, FlagParser, bad_input, check_ranges
from simpool.run.output import OutputFolder
from simpool.run.process import driver

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """``1G`` -> 1073741824, ``512M``, ``300000`` (bytes); K/M/G/T are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 1G, 512M or 300000, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def get_parser() -> argparse.ArgumentParser:
    parser = FlagParser("simpool-pack", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", nargs="?", help="an ImageFolder (root with train/ and val/, or one split), "
                        "a .txt list of image paths, or fashion-mnist[:folder]")
    parser.add_argument("out", nargs="?", help="folder for the shards and index.json (created)")
    parser.add_argument("--shard_size", type=byte_size, default=1 << 30,
                        help="close a shard before it passes this many bytes (default 1G)")
    parser.add_argument("--shard_samples", type=int, default=100_000, help="at most this many samples a shard")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (default: on a terminal)")
    parser.add_argument("--verify", metavar="INDEX", default=None,
                        help="check every shard of INDEX against its sha256 and record their current times "
                             "(after copying shards without keeping times); SRC and OUT are not given then")
    return parser


@driver
def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        check_ranges(args, {"shard_size": AT_LEAST_ONE, "shard_samples": AT_LEAST_ONE})
        if args.verify:
            if args.src or args.out:
                raise DataError("--verify INDEX checks an existing pack: give no SRC or OUT with it")
            shards, samples = verify_index(args.verify)
            print(f"verified {shards} shard(s), {samples} samples: {args.verify} is up to date")
            return 0
        if not args.src or not args.out:
            raise DataError("give SRC and OUT: simpool-pack SRC OUT (or simpool-pack --verify INDEX)")
        output = OutputFolder(args.out, flag="OUT").check()  # writable, and locked if it exists: one pack at a time
        result = pack(args.src, args.out, shard_bytes=args.shard_size, shard_samples=args.shard_samples,
                      progress=False if args.no_progress else None, claim=lambda _: output.claim())
    except (DataError, ConfigError) as err:
        return bad_input(err)
    splits = ", ".join(f"{count} {name}" for name, count in result.samples.items())
    kept = f" (kept {result.shards_kept} verified shard(s) of an earlier run)" if result.shards_kept else ""
    print(f"packed {splits} samples; wrote {result.shards_written} shard(s){kept}: --data_path {result.index_path}")
    if result.unreadable:
        print(f"warning: {len(result.unreadable)} source file(s) could not be read and were packed empty (they "
              f"will be skipped and counted in training), e.g. {result.unreadable[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
