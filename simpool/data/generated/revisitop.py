"""Fashion-on-photos written in revisitop's layout (``<name>/gnd_<name>.pkl`` + ``<name>/jpg/``), for the
retrieval evaluator.

Each query is one Fashion-MNIST item in one colour, pasted on a photo (its ``bbx`` is the item's box). The
database holds, for each query, the same item in the same colour on *other* photos: ``easy`` (large, 45-75% of the
short side), ``hard`` (small, 25-35%, mirrored, colour shifted) and ``junk`` (barely there: 10-14%, or mostly cut
off by the border), plus ``negatives`` images of other items. Images alternate landscape and portrait (160 x 120
and 120 x 160 at the default size) so that the evaluator's size-grouped batches are exercised. ``easy``, ``hard``
and ``junk`` are numpy int64 arrays, ``bbx`` a list of 4 floats, as in the real files.

Example::

    >>> write_revisitop_style("/tmp/revisitop", "roxford5k", num_queries=6)
    >>> simpool.data.revisitop.read_revisited("/tmp/revisitop", "roxford5k")
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from simpool.data.generated.compose import fashion_item, paste_item, photo_crop, random_colour

__all__ = ["write_revisitop_style"]

FASHION_TEST_SIZE = 10_000


def _shape(i: int, long_side: int) -> tuple[int, int]:
    short = long_side * 3 // 4
    return (short, long_side) if i % 2 == 0 else (long_side, short)


def _render(rng: np.random.Generator, shape: tuple[int, int], item: np.ndarray, colour: np.ndarray,
            side_range: tuple[float, float], cut_off: bool = False, mirror: bool = False) -> tuple[np.ndarray, tuple]:
    height, width = shape
    side = max(4, int(rng.uniform(*side_range) * min(height, width)))
    if cut_off:  # three quarters of the item outside the image
        top, left = int(rng.integers(0, height - side + 1)), width - side // 4
    else:
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    image, mask = paste_item(photo_crop(rng, height, width), item[:, ::-1].copy() if mirror else item, colour, side,
                             top, left)
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if ys.size else None
    return image, box


def write_revisitop_style(folder: str | Path, name: str = "roxford5k", num_queries: int = 6, easy: int = 3,
                          hard: int = 2, junk: int = 2, negatives: int = 20, long_side: int = 160,
                          seed: int = 0) -> dict:
    """Write the data set ``folder/name/`` and return its ground truth (the dict pickled in ``gnd_<name>.pkl``)."""
    rng = np.random.default_rng([seed, 2024])
    root = Path(folder) / name
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    chosen = rng.choice(FASHION_TEST_SIZE, size=num_queries + negatives, replace=False)
    query_items, negative_items = chosen[:num_queries], chosen[num_queries:]
    database: list[tuple[str, np.ndarray]] = []  # (kind, image) in writing order, shuffled below
    owners: list[tuple[int, str]] = []
    qimlist, boxes = [], []
    for q, index in enumerate(query_items):
        item, colour = fashion_item(int(index)), random_colour(rng)
        image, box = _render(rng, _shape(q, long_side), item, colour, (0.6, 0.85))
        qimlist.append(f"query_{q:03d}")
        Image.fromarray(image).save(root / "jpg" / f"{qimlist[-1]}.jpg", quality=95)
        boxes.append(box)
        shifted = np.clip(colour + rng.uniform(-0.15, 0.15, 3), 0, 1)
        for kind, count, kwargs in (("easy", easy, {"side_range": (0.6, 0.9)}),
                                    ("hard", hard, {"side_range": (0.25, 0.35), "mirror": True}),
                                    ("junk", junk, {"side_range": (0.1, 0.14)})):
            for k in range(count):
                cut = kind == "junk" and k % 2 == 1
                image, _ = _render(rng, _shape(len(database), long_side), item,
                                   shifted if kind == "hard" else colour,
                                   (0.5, 0.6) if cut else kwargs["side_range"], cut_off=cut,
                                   mirror=kwargs.get("mirror", False))
                database.append(image)
                owners.append((q, kind))
    for index in negative_items:
        image, _ = _render(rng, _shape(len(database), long_side), fashion_item(int(index)), random_colour(rng),
                           (0.4, 0.7))
        database.append(image)
        owners.append((-1, "negative"))
    order = rng.permutation(len(database))
    imlist = [f"db_{i:05d}" for i in range(len(database))]
    gnd = [{"bbx": list(boxes[q]), "easy": [], "hard": [], "junk": []} for q in range(num_queries)]
    for position, source in enumerate(order):
        Image.fromarray(database[source]).save(root / "jpg" / f"{imlist[position]}.jpg", quality=95)
        q, kind = owners[source]
        if q >= 0:
            gnd[q][kind].append(position)
    for entry in gnd:
        for kind in ("easy", "hard", "junk"):
            entry[kind] = np.array(sorted(entry[kind]), dtype=np.int64)
    cfg = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with (root / f"gnd_{name}.pkl").open("wb") as f:
        pickle.dump(cfg, f)
    return cfg
