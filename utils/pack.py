"""Pack a data set into WebDataset tar shards + index.json (``simpool-pack``).

    python utils/pack.py /data/imagenet /scratch/imagenet-shards
    python utils/pack.py fashion-mnist shards/fashion-mnist --shard_size 16M
    python utils/pack.py --verify /scratch/imagenet-shards/index.json

The command is simpool/cli/run_pack.py; the format is simpool/data/shard_index.py.
"""

import sys

from simpool.cli.run_pack import main

if __name__ == "__main__":
    sys.exit(main())
