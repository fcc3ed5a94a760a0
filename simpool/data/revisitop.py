"""Revisited Oxford and Paris (filipradenovic/revisitop) as distributed, and the 1M distractors.

Layout (``--data_path`` is the folder holding the data set folders)::

    <data_path>/roxford5k/gnd_roxford5k.pkl      {"imlist": [names], "qimlist": [names], "gnd": [per query:
    <data_path>/roxford5k/jpg/<name>.jpg           {"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...],
    <data_path>/rparis6k/...                        "junk": [...]} with indices into imlist}]
    <distractors>/revisitop1m.txt + jpg/<name>   (optional; or any folder of images)

The ground truth is a pickle, and a pickle can run code when it is read; :func:`load_gnd` reads it with
:class:`RestrictedUnpickler`, which admits lists, dicts, tuples, strings, numbers and numpy arrays / scalars of
plain dtypes, and refuses any other global (``os.system`` included) before it is called.

Example:
    >>> data = read_revisited("/data/revisitop", "roxford5k")
    >>> len(data.imlist), len(data.qimlist), data.gnd[0]["hard"][:3]
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simpool.data.paths import DataError, is_image_file

__all__ = ["DATASETS", "RestrictedUnpickler", "RevisitedData", "load_gnd", "read_distractors", "read_revisited"]

DATASETS = ("roxford5k", "rparis6k")
GND_KEYS = ("easy", "hard", "junk")

# numpy's own pickling of arrays and scalars (numpy 1 module names, and numpy 2's where it moved them)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: builtin containers, strings, numbers, numpy arrays; no other global.

    Example:
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2.5, "x"]}))).load()
        {'a': [1, 2.5, 'x']}
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: a ground-truth file holds only "
                                     "lists, dicts, strings, numbers and numpy arrays")


def _check_arrays(value: Any, where: str) -> None:
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
        raise DataError(f"{where}: arrays of dtype {value.dtype} are not ground truth")
    if isinstance(value, dict):
        for item in value.values():
            _check_arrays(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_arrays(item, where)


def load_gnd(path: str | os.PathLike) -> dict[str, Any]:
    """Read a revisitop ``gnd_<name>.pkl`` safely and check its structure; a DataError says what is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = RestrictedUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: download gnd_{path.parent.name}.pkl from revisitop into "
                        f"{path.parent}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DataError(f"{path} is not a revisitop ground-truth file: {err}") from None
    _check_arrays(data, str(path))
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DataError(f"{path} must hold a dict with imlist, qimlist and gnd (revisitop's format)")
    for key in ("imlist", "qimlist"):
        if not all(isinstance(name, str) for name in data[key]):
            raise DataError(f"{path}: {key} must be a list of image names")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise DataError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    gnd = []
    for i, entry in enumerate(data["gnd"]):
        if not isinstance(entry, dict) or not set(GND_KEYS) <= set(entry):
            raise DataError(f"{path}: gnd[{i}] must be a dict with easy, hard and junk index lists")
        clean = {key: np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in GND_KEYS}
        for key, rows in clean.items():
            if rows.size and (rows.min() < 0 or rows.max() >= len(data["imlist"])):
                raise DataError(f"{path}: gnd[{i}]['{key}'] indexes outside imlist ({len(data['imlist'])} images)")
        bbx = entry.get("bbx")
        clean["bbx"] = None if bbx is None else tuple(float(v) for v in np.asarray(bbx).reshape(-1)[:4])
        gnd.append(clean)
    return {"imlist": list(data["imlist"]), "qimlist": list(data["qimlist"]), "gnd": gnd}


@dataclass(frozen=True)
class RevisitedData:
    """One revisited data set: database names ``imlist``, query names ``qimlist``, per-query ``gnd``."""

    name: str
    images: Path  # the jpg/ folder
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    def image_path(self, name: str) -> Path:
        return self.images / f"{name}.jpg"


def read_revisited(data_path: str | os.PathLike, dataset: str) -> RevisitedData:
    """``data_path/<dataset>/gnd_<dataset>.pkl`` and ``jpg/``, every listed image checked to exist."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    root = Path(data_path)
    folder = root / dataset
    if not folder.is_dir():
        found = [d for d in DATASETS if (root / d).is_dir()]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise DataError(f"--data_path {root} has no {dataset}/ folder{hint}: pass the folder that holds "
                        f"{dataset}/gnd_{dataset}.pkl and {dataset}/jpg/")
    cfg = load_gnd(folder / f"gnd_{dataset}.pkl")
    images = folder / "jpg"
    missing = [name for name in cfg["imlist"] + cfg["qimlist"] if not (images / f"{name}.jpg").is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in gnd_{dataset}.pkl are missing from {images}, e.g. "
                        f"{missing[0]}.jpg")
    return RevisitedData(dataset, images, cfg["imlist"], cfg["qimlist"], cfg["gnd"])


def read_distractors(path: str | os.PathLike) -> list[Path]:
    """The distractor images: revisitop1m's layout (``revisitop1m.txt`` listing paths under ``jpg/``) or, failing
    that, every image file directly in ``path`` (sorted by name)."""
    folder = Path(path)
    listing = folder / "revisitop1m.txt"
    if listing.is_file():
        names: Sequence[str] = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return [folder / "jpg" / name for name in names]
    if not folder.is_dir():
        raise DataError(f"--distractors_path {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not files:
        raise DataError(f"--distractors_path {folder} holds no images (nor revisitop1m.txt)")
    return files
