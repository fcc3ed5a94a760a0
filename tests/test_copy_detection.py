"""Copy detection: GeM, centred PCA whitening, the Holidays AP (against a port of score_ap_from_ranks_1 and hand
cases), Copydays' ground truth, and the driver end to end on generated Copydays data against a naive pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simpool.data.copydays import read_copydays
from simpool.data.generated.copydays import write_copydays_style
from simpool.data.paths import DataError
from simpool.evaluation import run_copy_detection as cli
from simpool.evaluation.copy_detection import (
    ImageListDataset,
    PCAWhitening,
    block_map,
    gem,
    holidays_ap,
    square_transform,
)
from simpool.loading import load_model
from tests.helpers import run_module, torchrun

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
TINY = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=1",
        "embed_dim=32", "num_heads=2", "--num_workers", "0"]


def score_ap_from_ranks_1(ranks, nres):
    """The Holidays package's function, as DINO ships it."""
    ap = 0.0
    recall_step = 1.0 / nres
    for ntp, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else ntp / float(rank)
        precision_1 = (ntp + 1) / float(rank + 1)
        ap += (precision_1 + precision_0) * recall_step / 2.0
    return ap


def test_gem_by_hand():
    patches = torch.tensor([[[[1.0, 2.0], [0.0, -5.0]]]])  # negatives clamp to 1e-6
    expected = ((1 + 16 + 2 * 1e-24) / 4) ** 0.25
    torch.testing.assert_close(gem(patches, 4.0), torch.tensor([[expected]]))
    torch.testing.assert_close(gem(torch.full((1, 3, 2, 2), 2.0), 4.0), torch.full((1, 3), 2.0))
    # DINO's formulation: avg_pool2d over the whole grid of clamp(min=1e-6)^p, then ^(1/p)
    x = torch.randn(2, 5, 3, 4)
    dino = F.avg_pool2d(x.clamp(min=1e-6).pow(4), (3, 4)).pow(1 / 4).reshape(2, -1)
    torch.testing.assert_close(gem(x, 4.0), dino)


def test_holidays_ap_by_hand_and_against_the_original():
    assert holidays_ap([0], 1) == 1.0
    assert holidays_ap([1], 1) == pytest.approx((0 + 0.5) / 2)  # found second: trapezoid from 0 to 1/2
    assert holidays_ap([], 2) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 6))
        ranks = sorted(rng.choice(20, size=int(rng.integers(0, n + 1)), replace=False).tolist())
        assert holidays_ap(ranks, n) == pytest.approx(score_ap_from_ranks_1(ranks, n))


def test_block_map_counts_positives_in_the_top_k_only():
    indices = torch.tensor([[3, 0, 1], [2, 4, 5]])
    # query 0: its original (0) at rank 1; query 1: originals 7 and 2 -> 2 at rank 0, 7 not in the top 3
    expected = (score_ap_from_ranks_1([1], 1) + score_ap_from_ranks_1([0], 2)) / 2
    assert block_map(indices, [[0], [7, 2]]) == pytest.approx(expected)


def test_whitening_is_centred_and_whitens():
    torch.manual_seed(0)
    train = torch.randn(500, 6) @ torch.randn(6, 6) + 5.0  # far from zero mean: the un-centred covariance is wrong
    white = PCAWhitening.fit(train, power=0.5)
    out = white(train).double()
    torch.testing.assert_close(out.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.T @ out / 500, torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    # naive numpy: eigh of the centred covariance, largest eigenvalue first, diag(d^-1/2) V^T (x - m)
    x = train.double().numpy()
    centred = x - x.mean(0)
    d, v = np.linalg.eigh(centred.T @ centred / len(x))
    idx = np.argsort(d)[::-1]
    naive = (np.diag(d[idx] ** -0.5) @ v[:, idx].T @ centred.T).T
    np.testing.assert_allclose(np.abs(out.numpy()), np.abs(naive), atol=1e-3)  # eigenvector signs are free


@pytest.fixture(scope="module")
def copydays(tmp_path_factory):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("copydays")
    write_copydays_style(root, num_originals=5, strong_per_original=2, distractors=6, whitening=12, size=(48, 64),
                         jpeg_qualities=(3, 50), crops=(20, 80))
    return root


def test_reader_pairs_queries_with_their_originals(copydays):
    days = read_copydays(copydays / "copydays")
    assert list(days.blocks) == ["original", "strong", "jpegqual/3", "jpegqual/50", "crops/20", "crops/80"]
    assert days.positives("strong")[:4] == [[0], [0], [1], [1]]  # 200001, 200002 -> 200000; 200101 -> 200100
    assert days.positives("crops/80") == [[i] for i in range(5)]
    (copydays / "copydays" / "crops" / "20" / "299900.jpg").write_bytes(b"x")
    try:
        with pytest.raises(DataError, match="without an original"):
            read_copydays(copydays / "copydays")
    finally:
        (copydays / "copydays" / "crops" / "20" / "299900.jpg").unlink()
    with pytest.raises(DataError, match="no original/ folder"):
        read_copydays(copydays)


def naive_features(model, paths, imsize):
    rows = []
    for image in ImageListDataset(paths, square_transform(imsize)):
        with torch.no_grad():
            glob, patches = model(image[None]), model.patch_features(image[None])
        b, d, h, w = patches.shape
        gem_dino = F.avg_pool2d(patches.clamp(min=1e-6).pow(4), (h, w)).pow(1 / 4).reshape(b, -1)
        rows.append(torch.cat([glob, gem_dino], dim=1)[0])
    return torch.stack(rows)


@needs_fashion
def test_driver_matches_a_naive_pipeline_and_reuses_its_cache(copydays, tmp_path):
    out = tmp_path / "cd"
    flags = ["--random_init", *TINY, "--data_path", str(copydays / "copydays"), "--imsize", "64",
             "--whitening_path", str(copydays / "whitening"), "--distractors_path", str(copydays / "distractors"),
             "--output_dir", str(out)]
    assert cli.main(flags) == 0
    result = json.loads((out / "copy_detection.json").read_text())
    assert result["format"] == "simpool-copy-detection-1"
    assert result["database_size"] == 5 + 6 and result["num_whitening"] == 12
    model, _ = load_model(None, random_init=True, arch="vit_tiny", mode="simpool", patch_size=8, depth=1,
                          embed_dim=32, num_heads=2)
    days = read_copydays(copydays / "copydays")
    whitening = naive_features(model, sorted((copydays / "whitening").iterdir()), 64).double()
    mean = whitening.mean(0)
    cov = (whitening - mean).T @ (whitening - mean) / whitening.shape[0]  # centred (DINO's is not)
    d, v = torch.linalg.eigh(cov)
    d = d.clamp(min=d.max() * 1e-5)
    projection = torch.diag(d.pow(-0.5)) @ v.T
    database = torch.cat([naive_features(model, days.blocks["original"], 64),
                          naive_features(model, sorted((copydays / "distractors").iterdir()), 64)]).double()
    database = F.normalize((database - mean) @ projection.T, dim=1)
    for block, files in days.blocks.items():
        queries = F.normalize((naive_features(model, files, 64).double() - mean) @ projection.T, dim=1)
        indices = (queries @ database.T).topk(min(20, database.shape[0]), dim=1).indices
        expected = np.mean([score_ap_from_ranks_1([r for r, db in enumerate(row) if db in pos], len(pos))
                            for row, pos in zip(indices.tolist(), days.positives(block), strict=True)])
        assert result["map"][block] == pytest.approx(expected, abs=1e-6), block

    cached = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("part-*.pt")}
    assert cli.main(flags) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "features").rglob("part-*.pt")} == cached
    assert json.loads((out / "copy_detection.json").read_text())["map"] == result["map"]
    # no whitening folder: the cached features serve, only the ranking changes
    assert cli.main(flags[:-6] + ["--distractors_path", str(copydays / "distractors"), "--output_dir", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "features").rglob("part-*.pt")} == cached


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert cli.main(["--random_init", *TINY, "--data_path", str(tmp_path)]) == 2
    assert "has no original/ folder" in capsys.readouterr().err
    (tmp_path / "original").mkdir()
    (tmp_path / "strong").mkdir()
    result = run_module("simpool.evaluation.run_copy_detection", "--random_init", *TINY, "--data_path", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "holds no .jpg images" in result.stderr


@needs_fashion
@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(copydays, tmp_path):
    flags = ["--random_init", *TINY, "--data_path", str(copydays / "copydays"), "--imsize", "64",
             "--whitening_path", str(copydays / "whitening"), "--distractors_path", str(copydays / "distractors")]
    assert cli.main([*flags, "--output_dir", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "copy_detection.json").read_text())
    result = run_module("simpool.evaluation.run_copy_detection", *flags,
                        "--output_dir", str(tmp_path / "two"), launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "copy_detection.json").read_text())
    for block, value in single["map"].items():
        assert two["map"][block] == pytest.approx(value, abs=1e-6)
