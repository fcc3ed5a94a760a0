"""Background robustness: the IN-9 mapping by hand, the probe head it reads, the backgrounds-challenge reader on
generated data in its layout, and the simpool-background-robustness driver against a naive loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from simpool import build_backbone
from simpool.checkpoint import CheckpointError
from simpool.data import DataError
from simpool.data.bg_challenge import IN9_CLASSES, IN9_VARIANTS, find_variants, in9_folder
from simpool.data.generated.bg_challenge import write_bg_challenge
from simpool.evaluation.background_robustness import IN_TO_IN9, in9_correct, load_probe_head, map_to_in9
from simpool.evaluation.run_background_robustness import in9_transform, main
from simpool.evaluation.run_linear import main as linear_main
from simpool.loading import load_model
from tests.helpers import run_module, torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--mode", "simpool", "--patch_size", "8", "--model_overrides", "depth=2",
        "embed_dim=48", "num_heads=3"]


# ----------------------------------------------------------------------------------------------------------
# the mapping
# ----------------------------------------------------------------------------------------------------------
def test_in9_mapping_hand_cases_and_class_sizes():
    assert map_to_in9(torch.tensor([0, 6, 7, 24, 25, 151, 170, 171, 172, 173, 268, 269, 300, 326, 327, 365, 384,
                                    389, 397, 398, 407, 880, 889, 999])).tolist() == [
        8, 8, 1, 1, -1, 0, 0, -1, -1, 0, 0, 4, 5, 5, -1, 7, 7, 8, 8, -1, 2, 2, 6, -1]
    # per super-class sizes of backgrounds_challenge's in_to_in9.json, counted by hand from its ranges
    sizes = [sum(stop - start + 1 for start, stop in ranges) for ranges in IN_TO_IN9]
    assert sizes == [116, 52, 42, 36, 35, 27, 26, 20, 16]
    table = map_to_in9(torch.arange(1000))
    assert [(table == c).sum().item() for c in range(9)] == sizes and (table == -1).sum().item() == 630
    starts = sorted(start for ranges in IN_TO_IN9 for start, _ in ranges)
    stops = sorted(stop for ranges in IN_TO_IN9 for _, stop in ranges)
    assert all(stop < start for stop, start in zip(stops, starts[1:], strict=False))  # no index in two classes
    with pytest.raises(ValueError):
        map_to_in9(torch.tensor([1000]))


def test_unmapped_predictions_are_wrong():
    assert in9_correct(torch.tensor([151, 171, 0, 389]), torch.tensor([0, 0, 8, 1])).tolist() == [
        True, False, True, False]


# ----------------------------------------------------------------------------------------------------------
# the data layout
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def in9(tmp_path_factory):
    return write_bg_challenge(tmp_path_factory.mktemp("in9"), n_val=27, n_train=54, image_size=32)


def test_reader_finds_variants_and_maps_folders_by_name(tmp_path, in9):
    assert list(find_variants(in9)) == list(IN9_VARIANTS)
    assert list(find_variants(in9, ["mixed_rand", "original"])) == ["mixed_rand", "original"]
    data = in9_folder(in9 / "original" / "val")
    assert data.classes == list(IN9_CLASSES) and len(data) == 27
    folder = tmp_path / "renamed" / "val"
    for source in sorted((in9 / "original" / "val").iterdir()):  # WordNet ids instead of names, shuffled prefixes
        index = IN9_CLASSES.index(source.name[3:])
        wnid = ["n02084071", "n01503061", "n04576211", "n01661091", "n02075296", "n02159955", "n03800933",
                "n02469914", "n02512053"][index]
        target = folder / f"{8 - index:02d}_{wnid}"
        target.mkdir(parents=True)
        for image in source.iterdir():
            (target / image.name).write_bytes(image.read_bytes())
    renamed = in9_folder(folder)
    by_file = {Path(path).name: label for path, label in renamed.samples}
    assert by_file == {Path(path).name: label for path, label in data.samples}
    (folder / "09_cat").mkdir()
    with pytest.raises(DataError, match="09_cat"):
        in9_folder(folder)
    with pytest.raises(DataError, match="lacks mixed_next/val/"):
        find_variants(tmp_path / "renamed", ["mixed_next"])


# ----------------------------------------------------------------------------------------------------------
# probe and driver
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe(tmp_path_factory, in9):
    folder = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    weights = folder / "tiny.pth"
    torch.save(build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=2, embed_dim=48,
                              num_heads=3).state_dict(), weights)
    assert linear_main(["--pretrained_weights", str(weights), *TINY, "--data_path", str(in9 / "original"),
                        "--image_size", "32", "--cached_features", "True", "--epochs", "3", "--lrs", "0.01", "1.0",
                        "--num_workers", "0", "--output_dir", str(folder / "linear")]) == 0
    return weights, folder / "linear"


def test_probe_head_choice_and_refusals(tmp_path, probe):
    _, linear = probe
    saved = torch.load(linear / "checkpoint.pth.tar", weights_only=True)
    head = load_probe_head(linear)
    scores = [r["top1"] for r in saved["last"]]
    assert head.lr == saved["lrs"][scores.index(max(scores))] and head.num_labels == 9
    assert load_probe_head(linear, lr=1.0).lr == 1.0
    with pytest.raises(CheckpointError, match="lrs"):
        load_probe_head(linear, lr=0.5)
    saved["num_labels"] = 10
    (tmp_path / "ten").mkdir()
    torch.save(saved, tmp_path / "ten" / "checkpoint.pth.tar")
    with pytest.raises(CheckpointError, match="10 classes, which do not map"):
        load_probe_head(tmp_path / "ten")
    with pytest.raises(CheckpointError, match="no checkpoint.pth.tar"):
        load_probe_head(tmp_path)


def run_driver(weights: Path, linear: Path, data: Path, out: Path, *extra: str) -> dict:
    assert main(["--pretrained_weights", str(weights), *TINY, "--probe", str(linear), "--data_path", str(data),
                 "--image_size", "32", "--num_workers", "0", "--no_progress", "--output_dir", str(out), *extra]) == 0
    return json.loads((out / "background_robustness.json").read_text())


def naive_accuracy(weights: Path, linear: Path, folder: Path) -> float:
    model, _ = load_model(str(weights), arch="vit_tiny", mode="simpool", patch_size=8, depth=2, embed_dim=48,
                          num_heads=3)
    head = load_probe_head(linear)
    data, hits = in9_folder(folder, in9_transform(32)), 0
    with torch.no_grad():
        for image, label in data:
            hits += int(head(model.eval()(image[None])).argmax()) == label
    return 100.0 * hits / len(data)


def test_driver_equals_a_naive_loop_and_resumes_per_variant(tmp_path, in9, probe):
    weights, linear = probe
    out = tmp_path / "in9"
    first = run_driver(weights, linear, in9, out, "--variants", "original", "mixed_rand", "mixed_same")
    assert first["num_images"] == {"original": 27, "mixed_rand": 27, "mixed_same": 27}
    for variant in ("original", "mixed_rand"):
        assert first["accuracy"][variant] == pytest.approx(naive_accuracy(weights, linear, in9 / variant / "val"))
    assert first["rows"]["BG-Gap"] == pytest.approx(first["accuracy"]["mixed_same"] - first["accuracy"]["mixed_rand"])
    lines = (out / "background_robustness.rank0.jsonl").read_text().splitlines()
    (out / "background_robustness.rank0.jsonl").write_text(lines[0] + "\n")  # as if killed after one variant
    second = run_driver(weights, linear, in9, out, "--variants", "original", "mixed_rand", "mixed_same")
    assert len((out / "background_robustness.rank0.jsonl").read_text().splitlines()) == 3  # two redone
    assert second["accuracy"] == first["accuracy"]


def test_a_1000_way_probe_mapped_to_in9_scores_like_the_9_way_one(tmp_path, in9, probe):
    weights, linear = probe
    nine = run_driver(weights, linear, in9, tmp_path / "nine", "--variants", "original", "only_fg")
    saved = torch.load(linear / "checkpoint.pth.tar", weights_only=True)
    # each IN-9 class's row goes to one ImageNet index of that class; the other 991 outputs never win
    representative = [ranges[-1][0] for ranges in IN_TO_IN9]
    for key in [k for k in saved["heads"] if k.endswith("weight")]:
        weight, bias = saved["heads"][key], saved["heads"][key.replace("weight", "bias")]
        wide_w, wide_b = torch.zeros(1000, weight.shape[1]), torch.full((1000,), -1e4)
        wide_w[representative], wide_b[representative] = weight, bias
        saved["heads"][key], saved["heads"][key.replace("weight", "bias")] = wide_w, wide_b
    saved["num_labels"] = 1000
    (tmp_path / "wide").mkdir()
    torch.save(saved, tmp_path / "wide" / "checkpoint.pth.tar")
    wide = run_driver(weights, tmp_path / "wide", in9, tmp_path / "mapped", "--variants", "original", "only_fg")
    assert wide["probe_classes"] == 1000 and wide["accuracy"] == nine["accuracy"]


def test_bad_input_is_one_error_line(tmp_path, in9, probe, capsys):
    weights, linear = probe
    broken = tmp_path / "broken"
    (broken / "original" / "val" / "cats").mkdir(parents=True)
    result = run_module("simpool.evaluation.run_background_robustness", "--pretrained_weights", str(weights), *TINY,
                        "--probe", str(linear), "--data_path", str(broken),
                      "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cats: a class folder that is no IN-9 class" in result.stderr
    other = tmp_path / "other.pth"
    torch.save(build_backbone("vit_tiny", mode="simpool", patch_size=8, depth=2, embed_dim=48,
                              num_heads=3).state_dict(), other)
    capsys.readouterr()
    assert main(["--pretrained_weights", str(other), *TINY, "--probe", str(linear), "--data_path", str(in9),
                 "--output_dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --probe holds a head trained on other features") and error.count("\n") == 1



def test_an_unreadable_image_in_a_variant_is_one_error_line_from_a_loader_worker(tmp_path, in9, probe):
    weights, linear = probe
    copy = tmp_path / "in9"
    shutil.copytree(in9 / "mixed_rand", copy / "mixed_rand")
    victim = sorted((copy / "mixed_rand").rglob("*.JPEG"))[5]
    victim.write_bytes(b"not an image")
    result = run_module("simpool.evaluation.run_background_robustness", "--pretrained_weights", str(weights), *TINY,
                        "--probe", str(linear), "--data_path", str(copy), "--image_size", "32", "--num_workers", "2",
                        "--no_progress", "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {victim} cannot be read as an image (") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o" / "background_robustness.json").exists()

@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path, in9, probe):
    weights, linear = probe
    # one image per forward pass in both runs: a batch's size may change a GEMM's rounding, not the protocol
    single = run_driver(weights, linear, in9, tmp_path / "single", "--variants", "original", "mixed_next",
                        "--batch_size_per_gpu", "1")
    flags = ["--pretrained_weights", str(weights), *TINY, "--probe", str(linear), "--data_path", str(in9),
             "--variants", "original", "mixed_next", "--image_size", "32", "--batch_size_per_gpu", "1",
             "--num_workers", "0", "--no_progress", "--output_dir", str(tmp_path / "ddp")]
    result = run_module("simpool.evaluation.run_background_robustness", *flags, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "background_robustness.json").read_text())
    assert ddp["per_variant"] == single["per_variant"]
