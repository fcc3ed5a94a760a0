"""The README's "Library" section runs as written (the package faces it shows exist and fit together)."""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from torch.utils.data import Subset

from simpool.data import build_labelled_splits
from simpool.evaluation import eval_transform

README = Path(__file__).resolve().parents[1] / "README.md"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def library_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Library"):text.index("## Pretraining")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.skipif(not FASHION.is_file(), reason="Debian package dataset-fashion-mnist is not installed")
def test_library_examples_run_as_written():
    pretrain, evaluate = library_blocks()
    namespace = {"image": Image.fromarray(skimage_data.chelsea())}
    exec(pretrain, namespace)
    stats = namespace["stats"]
    assert torch.isfinite(stats.loss) and stats.loss_is_finite
    train, val = build_labelled_splits("fashion-mnist", transform=eval_transform(32))
    namespace.update(train_set=Subset(train, range(100)), val_set=Subset(val, range(50)))
    exec(evaluate, namespace)
    assert namespace["train_x"].shape == (100, 192) and namespace["val_y"].shape == (50,)
