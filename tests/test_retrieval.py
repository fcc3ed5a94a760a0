"""Image retrieval: the revisited mAP against hand-computed cases and a naive walk down the ranking, the chunked
search against a full sort, the safe ground-truth reader, and the driver end to end on generated revisitop data."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from simpool.data.generated.revisitop import write_revisitop_style
from simpool.data.paths import DataError
from simpool.data.revisitop import RestrictedUnpickler, load_gnd, read_distractors, read_revisited
from simpool.evaluation import run_retrieval as cli
from simpool.evaluation.feature_cache import FeatureCache, same_key_batches
from simpool.evaluation.retrieval import ThumbnailDataset, thumbnail_size
from simpool.evaluation.revisited_map import average_precision, compute_map, precision_at, revisited_scores
from simpool.evaluation.search import ranking_positions, topk_cosine
from simpool.loading import load_model
from tests.helpers import run_module, torchrun

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")
TINY = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=1",
        "embed_dim=32", "num_heads=2", "--num_workers", "0"]


# ---------------------------------------------------------------- naive revisited scores
def naive_query(ranking, ok, junk, kappas=(1, 5, 10)):
    """Walk down the ranking, skipping junk; trapezoidal AP; revisitop's P@k (k clipped to the last positive)."""
    ok, junk = set(ok), set(junk)
    places = []
    place = 0
    for item in ranking:
        if item in junk:
            continue
        if item in ok:
            places.append(place)
        place += 1
    ap = 0.0
    for j, p in enumerate(places):
        before = 1.0 if p == 0 else j / p
        ap += (before + (j + 1) / (p + 1)) / 2 / len(ok)
    last = places[-1] + 1
    prs = [sum(p + 1 <= min(k, last) for p in places) / min(k, last) for k in kappas]
    return ap, prs


def test_average_precision_by_hand():
    # positives at places 1 and 3 of 2: (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert average_precision(np.array([1]), 2) == pytest.approx((0 + 0.5) / 2 / 2)
    assert average_precision(np.array([]), 2) == 0.0
    # revisitop's P@k: last positive at rank 3 -> P@5 and P@10 divide by 3
    np.testing.assert_allclose(precision_at(np.array([0, 2]), [1, 5, 10]), [1.0, 2 / 3, 2 / 3])


def test_junk_is_taken_out_of_the_ranking():
    # ranking: junk 7, positive 3, negative 9, positive 4 -> without junk the positives sit at places 0 and 2
    ranks = np.array([[7], [3], [9], [4]])
    value, aps, mpk, _ = compute_map(ranks, [{"ok": [3, 4], "junk": [7]}], [1])
    assert value == pytest.approx(average_precision(np.array([0, 2]), 2))
    assert mpk[0] == 1.0
    # a query without positives is left out of the mean
    value, aps, _, _ = compute_map(np.array([[0, 0], [1, 1]]), [{"ok": [0]}, {"ok": [], "junk": [1]}], [1])
    assert value == 1.0 and np.isnan(aps[1])


def test_three_setups_match_a_naive_walk_on_random_rankings():
    rng = np.random.default_rng(0)
    n, nq = 60, 7
    gnd, places, rankings = [], [], []
    for _ in range(nq):
        ids = rng.permutation(n)
        gnd.append({"easy": ids[:4], "hard": ids[4:7], "junk": ids[7:10]})
        ranking = rng.permutation(n)
        rankings.append(ranking)
        places.append({int(item): place for place, item in enumerate(ranking)})
    scores = revisited_scores(places, gnd, (1, 5, 10))
    for setup, ok_keys, junk_keys in (("easy", ["easy"], ["junk", "hard"]), ("medium", ["easy", "hard"], ["junk"]),
                                      ("hard", ["hard"], ["junk", "easy"])):
        naive = [naive_query(r, np.concatenate([g[k] for k in ok_keys]), np.concatenate([g[k] for k in junk_keys]))
                 for r, g in zip(rankings, gnd, strict=True)]
        assert scores[setup]["map"] == pytest.approx(np.mean([a for a, _ in naive]))
        np.testing.assert_allclose(list(scores[setup]["mp_at_k"].values()), np.mean([p for _, p in naive], axis=0))
        # revisitop's own entry point on the (database, queries) rank matrix agrees
        ranks = np.stack(rankings, axis=1)
        value, *_ = compute_map(ranks, [{"ok": np.concatenate([g[k] for k in ok_keys]),
                                         "junk": np.concatenate([g[k] for k in junk_keys])} for g in gnd], [1, 5, 10])
        assert value == pytest.approx(scores[setup]["map"])


# ---------------------------------------------------------------- search
def test_chunked_topk_equals_a_full_stable_sort():
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(9, 16), dim=1)
    database = F.normalize(torch.randn(203, 16), dim=1)
    database[50] = database[7]  # a tie: the smaller index must come first
    queries[0] = database[7]
    full = queries @ database.T
    order = torch.sort(-full, dim=1, stable=True).indices[:, :20]
    for chunk in (1, 17, 64, 1000):
        scores, indices = topk_cosine(queries, database, 20, chunk_size=chunk)
        assert torch.equal(indices, order)
        torch.testing.assert_close(scores, full.gather(1, order))
    assert indices[0, 0] == 7 and indices[0, 1] == 50


def test_ranking_positions_equal_the_places_in_a_full_sort():
    torch.manual_seed(1)
    queries = torch.randint(-3, 4, (5, 8)).double()  # small integers: exact scores with many ties
    database = torch.randint(-3, 4, (150, 8)).double()
    order = torch.sort(-(queries @ database.T), dim=1, stable=True).indices.numpy()
    targets = [np.array([0, 149, 75]), np.array([3]), np.array([], dtype=np.int64), np.arange(0, 150, 7),
               np.array([42, 42])]
    for chunk in (1, 13, 10_000):
        positions = ranking_positions(queries, database, targets, chunk_size=chunk)
        for q, rows in enumerate(targets):
            expected = [int(np.flatnonzero(order[q] == r)[0]) for r in rows]
            assert positions[q].tolist() == expected


def test_same_key_batches_never_mix_sizes():
    keys = {0: "a", 1: "b", 2: "a", 3: "a", 4: "b", 5: "a"}
    assert same_key_batches(range(6), keys.__getitem__, 2) == [[0, 2], [3, 5], [1, 4]]


def test_thumbnail_size_is_pillows():
    for width, height, side in ((1024, 768, 224), (768, 1024, 224), (500, 333, 224), (100, 80, 224), (225, 1, 224)):
        image = Image.new("L", (width, height))
        image.thumbnail((side, side))
        assert thumbnail_size(width, height, side) == image.size


# ---------------------------------------------------------------- ground truth
def test_restricted_unpickler_refuses_code_and_reads_numpy(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with pytest.raises(pickle.UnpicklingError, match="refused to load global"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps({"gnd": [Evil()]}))).load()
    assert not (tmp_path / "pwned").exists()
    data = {"a": np.arange(3), "b": [np.float32(2.5), "x", (1, 2)]}
    back = RestrictedUnpickler(io.BytesIO(pickle.dumps(data))).load()
    assert back["a"].tolist() == [0, 1, 2] and back["b"][0] == 2.5
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [Evil()]}))
    with pytest.raises(DataError, match="not a revisitop ground-truth file"):
        load_gnd(path)
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [5], "hard": [], "junk": []}]}))
    with pytest.raises(DataError, match="outside imlist"):
        load_gnd(path)


@pytest.fixture(scope="module")
def revisitop(tmp_path_factory):
    if not (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("revisitop")
    write_revisitop_style(root, "roxford5k", num_queries=4, easy=2, hard=2, junk=2, negatives=8, long_side=96)
    return root


def test_generated_layout_reads_like_the_real_one(revisitop):
    data = read_revisited(revisitop, "roxford5k")
    assert len(data.qimlist) == 4 and len(data.imlist) == 4 * 6 + 8
    assert all(isinstance(e["easy"], np.ndarray) and len(e["bbx"]) == 4 for e in data.gnd)
    sizes = {Image.open(data.image_path(n)).size for n in data.imlist}
    assert sizes == {(96, 72), (72, 96)}  # landscape and portrait: size-grouped batches
    with pytest.raises(DataError, match="no rparis6k/ folder"):
        read_revisited(revisitop, "rparis6k")
    with pytest.raises(DataError, match="holds no images"):
        read_distractors(revisitop / "roxford5k")


# ---------------------------------------------------------------- the driver
def naive_features(model, paths, imsize, boxes=None):
    """DINO's way: one image at a time, thumbnail (Lanczos), model(image)."""
    rows = []
    for i, path in enumerate(paths):
        image = ThumbnailDataset([path], imsize, None if boxes is None else [boxes[i]])[0]
        with torch.no_grad():
            rows.append(model(image[None, :, :image.shape[1] // 8 * 8, :image.shape[2] // 8 * 8])[0])
    return F.normalize(torch.stack(rows), dim=1)


def run(argv):
    assert cli.main(argv) == 0
    out = Path(argv[len(argv) - 1 - argv[::-1].index("--output_dir") + 1])  # the last one given wins
    return json.loads((out / "retrieval_roxford5k.json").read_text())


def parts(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("part-*.pt")}


@needs_fashion
def test_driver_matches_a_naive_pipeline_and_reuses_its_cache(revisitop, tmp_path):
    out = tmp_path / "ret"
    flags = ["--random_init", *TINY, "--data_path", str(revisitop), "--imsize", "64", "--batch_size_per_gpu", "5",
             "--output_dir", str(out)]
    result = run(flags)
    assert result["format"] == "simpool-retrieval-1" and result["num_queries"] == 4
    model, _ = load_model(None, random_init=True, arch="vit_tiny", mode="simpool", patch_size=8, depth=1,
                          embed_dim=32, num_heads=2)
    data = read_revisited(revisitop, "roxford5k")
    database = naive_features(model, [data.image_path(n) for n in data.imlist], 64)
    queries = naive_features(model, [data.image_path(n) for n in data.qimlist], 64)
    ranks = torch.argsort(-(database @ queries.T), dim=0, stable=True).numpy()
    for setup, ok, junk in (("medium", ("easy", "hard"), ("junk",)), ("hard", ("hard",), ("junk", "easy"))):
        gnd = [{"ok": np.concatenate([g[k] for k in ok]), "junk": np.concatenate([g[k] for k in junk])}
               for g in data.gnd]
        expected, _, mpk, _ = compute_map(ranks, gnd, [1, 5, 10])
        assert result[setup]["map"] == pytest.approx(expected, abs=1e-6)
        np.testing.assert_allclose(list(result[setup]["mp_at_k"].values()), mpk, atol=1e-6)

    cached = parts(out / "features")
    assert run(flags)["medium"] == result["medium"]
    assert parts(out / "features") == cached  # nothing embedded again
    multi = run([*flags, "--multiscale", "True"])
    new = set(parts(out / "features")) - set(cached)
    assert new and all("s1.0000" not in p for p in new)  # only the two new scales were embedded
    assert multi["multiscale"] is True
    cropped = run([*flags[:-4], "--crop_queries", "True", "--output_dir", str(tmp_path / "crop")])
    assert cropped["crop_queries"] is True
    # distractors join the database: positives can only move down the ranking
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    for name in data.imlist[:5]:
        (distractors / f"{name}.jpg").write_bytes(data.image_path(name).read_bytes())
    extended = run([*flags[:-2], "--distractors_path", str(distractors), "--output_dir", str(out)])
    assert extended["database_size"] == len(data.imlist) + 5 and extended["num_distractors"] == 5
    assert extended["medium"]["map"] <= result["medium"]["map"] + 1e-9


@needs_fashion
def test_feature_cache_refuses_another_identity(tmp_path):
    cache = FeatureCache(tmp_path, "x", {"imsize": 64}).open()
    cache.add(["a", "b"], torch.ones(2, 3))
    cache.flush()
    identity = json.loads((cache.folder / "identity.json").read_text())
    (cache.folder / "identity.json").write_text(json.dumps({**identity, "imsize": 32}))
    with pytest.raises(ValueError, match="imsize 32 -> 64"):
        FeatureCache(tmp_path, "x", {"imsize": 64}).open()


def test_bad_input_is_one_error_line(tmp_path, capsys):
    (tmp_path / "roxford5k" / "jpg").mkdir(parents=True)
    assert cli.main(["--random_init", *TINY, "--data_path", str(tmp_path)]) == 2
    assert "gnd_roxford5k.pkl is missing" in capsys.readouterr().err
    assert cli.main(["--random_init", *TINY, "--data_path", str(tmp_path / "nowhere")]) == 2
    assert "has no roxford5k/ folder" in capsys.readouterr().err
    result = run_module("simpool.evaluation.run_retrieval", *TINY, "--data_path", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert "--pretrained_weights" in result.stderr


@needs_fashion
@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(revisitop, tmp_path):
    flags = ["--random_init", *TINY, "--data_path", str(revisitop), "--imsize", "64"]
    single = run([*flags, "--output_dir", str(tmp_path / "one")])
    result = run_module("simpool.evaluation.run_retrieval", *flags,
                        "--output_dir", str(tmp_path / "two"), launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "retrieval_roxford5k.json").read_text())
    for setup in ("easy", "medium", "hard"):
        assert two[setup]["map"] == pytest.approx(single[setup]["map"], abs=1e-6)
    ranks = {p.name.split("-")[1] for p in (tmp_path / "two" / "features").rglob("part-*.pt")}
    assert ranks == {"0", "1"}  # both ranks embedded a share
