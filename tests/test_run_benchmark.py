"""simpool-benchmark: the paper's tables for several weights from one command, on a generated data root in every
evaluator's layout (the demo export and a tiny official ViT side by side); reruns that skip what is finished; bad
suites, roots and weights refused before any model; data sets missing from the root as skipped columns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from simpool import build_backbone
from simpool.data.coco20k import read_coco20k
from simpool.data.generated.benchmark_root import write_benchmark_root
from simpool.data.voc_boxes import read_voc_boxes
from simpool.data.wsol import read_wsol
from simpool.evaluation.benchmark.cells import CELL_FILE, plan
from simpool.evaluation.benchmark.registry import EVALUATORS
from simpool.evaluation.benchmark.rows import build_rows, network_of
from simpool.evaluation.benchmark.suite import parse_strict, read_suite
from simpool.evaluation.benchmark.table import table_markdown, table_payload
from simpool.evaluation.run_benchmark import main
from simpool.evaluation.run_localization import get_args_parser
from simpool.loading import load_model
from simpool.run.config import ConfigError
from simpool.run.flags import backbone_flags
from tests.helpers import REPO, needs_fashion

pytestmark = needs_fashion
DEMO = REPO / "tests" / "fixtures" / "demo_backbone"
DEMO_SUITE = REPO / "configs" / "benchmark_demo.yaml"
PAPER_SUITE = REPO / "configs" / "benchmark_paper.yaml"
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32}  # 4 blocks: the probe's n_last_blocks
OPTIONS = ["--num_workers", "0", "--no_progress"]


def tiny_official_checkpoint(path: Path) -> Path:
    """A training checkpoint of a random small official ViT (patch 8: the demo suite's 56 / 112 px fit it)."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", mode="official", patch_size=8, **TINY)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"simpool_format": 1, "epoch": 2,
                "teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "vit_tiny", "mode": "official", "patch_size": 8, "model_overrides": TINY}}, path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under the weights' folders with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.parent != folder}


def suite_file(tmp: Path, entries: dict, **extra) -> Path:
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump({"entries": entries, **extra}))
    return path


LOC = {"evaluator": "localization", "label": "CUB",
       "data": {"data_path": "CUB_200_2011/images", "metadata": "wsolevaluation/metadata/CUB/test"},
       "flags": {"image_size": 56}}
VOC = {"evaluator": "object_discovery", "label": "VOC07", "data": {"data_path": "VOCdevkit/VOC2007"}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_benchmark_root(tmp_path_factory.mktemp("data"), n=6, n_train=27, image_size=64, in9_size=56)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return tiny_official_checkpoint(tmp_path_factory.mktemp("weights") / "tiny_official" / "checkpoint.pth")


@pytest.fixture(scope="module")
def bench(root, official, tmp_path_factory):
    """One run of configs/benchmark_demo.yaml for the demo export and the tiny official ViT."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["--weights", str(DEMO), str(official), "--suite", str(DEMO_SUITE), "--data_root", str(root),
                 "--output_dir", str(out), *OPTIONS])
    return code, out


# ----------------------------------------------------------------------------------------------------------
# the table for two models from one command
# ----------------------------------------------------------------------------------------------------------
def test_two_models_side_by_side(bench):
    code, out = bench
    assert code == 0
    payload = json.loads((out / "benchmark.json").read_text())
    suite = read_suite(DEMO_SUITE)
    assert [row["name"] for row in payload["rows"]] == ["demo_backbone", "tiny_official"]
    for row in payload["rows"]:
        assert set(row["values"]) == set(suite.headers())
        assert all(isinstance(v, float) for v in row["values"].values()), row["values"]
        assert {c["status"] for c in row["cells"].values()} == {"ran"}
    demo, tiny = payload["rows"]
    assert (demo["model"]["mode"], tiny["model"]["mode"], tiny["model"]["epoch"]) == ("simpool", "official", 2)

    # each column is the evaluator's own number: SimPool's single map, the official ViT's head-mean map
    def result(row: str, entry: str, name: str) -> dict:
        return json.loads((out / row / entry / name).read_text())

    assert demo["values"]["CUB"] == result("demo_backbone", "loc_cub", "localization.json")["rows"]["map"]
    official_loc = result("tiny_official", "loc_cub", "localization.json")["rows"]
    assert tiny["values"]["CUB"] == official_loc["head-mean map"]
    assert tiny["cells"]["loc_cub"]["details"] == official_loc  # the best head is kept beside the column
    discovery = result("tiny_official", "coco20k", "object_discovery.json")["rows"]
    assert tiny["values"]["DINO-seg COCO20k"] == discovery["DINO-seg head-mean map"]
    assert tiny["values"]["LOST COCO20k"] == discovery["LOST"]
    in9 = result("demo_backbone", "in9", "background_robustness.json")
    assert demo["values"]["Mixed-Rand"] == in9["accuracy"]["mixed_rand"]
    assert demo["values"]["BG-Gap"] == pytest.approx(in9["accuracy"]["mixed_same"] - in9["accuracy"]["mixed_rand"])
    knn = result("demo_backbone", "knn", "knn.json")
    assert demo["values"]["k-NN ImageNet"] == knn["results"]["20"]["top1"]
    # the linear column: the best top-1 of any epoch and lr, as the probe's log.txt records them
    log = [json.loads(line) for line in (out / "demo_backbone" / "linear" / "log.txt").read_text().splitlines()]
    best = max(max(r["top1"] for r in line["per_lr"].values()) for line in log if "per_lr" in line)
    assert demo["values"]["linear ImageNet"] == pytest.approx(best)
    # the probe of IN-9 is the linear entry's, for the same weights
    assert in9["probe"] == str((out / "demo_backbone" / "linear").resolve())
    # DINO's other evaluators, their fractions as percents: rparis' file is named after its data set
    rparis = result("tiny_official", "rparis", "retrieval_rparis6k.json")
    assert tiny["values"]["RPar M"] == pytest.approx(100 * rparis["medium"]["map"])
    assert tiny["values"]["RPar H"] == pytest.approx(100 * rparis["hard"]["map"])
    copydays = result("demo_backbone", "copydays", "copy_detection.json")
    assert demo["values"]["Copydays strong"] == pytest.approx(100 * copydays["map"]["strong"])
    assert copydays["num_distractors"] > 0 and copydays["num_whitening"] > 0  # both YFCC folders were used
    davis = result("demo_backbone", "davis", "video_segmentation.json")
    assert demo["values"]["J&F DAVIS"] == pytest.approx(100 * davis["J&F-Mean"])

    # data set sizes actually used: 6 images per set (COCO20k: those of LOST's list), 27 + 9 for the probe
    entries = payload["entries"]
    assert entries["loc_cub"]["images"] == 6 and entries["voc07"]["images"] == 6
    assert entries["coco20k"]["images"] == len(read_coco20k(
        *(Path(payload["data_root"]) / p for p in entries["coco20k"]["data"].values())))
    assert entries["linear"]["images"] == {"train": 27, "val": 9}
    assert set(entries["in9"]["images"]) == {"original", "only_fg", "mixed_same", "mixed_rand", "mixed_next",
                                             "no_fg", "only_bg_b", "only_bg_t"}

    md = (out / "benchmark.md").read_text()
    for title in payload["tables"]:
        assert f"## {title}" in md
    header = "| weights | model | " + " | ".join(payload["tables"]["Table 5: localisation, MaxBoxAccV2 (%)"]) + " |"
    assert header == "| weights | model | CUB | ImageNet |" and header in md
    cub, imagenet = demo["values"]["CUB"], demo["values"]["ImageNet"]
    assert f"| demo_backbone | vit_tiny simpool | {cub:.1f} | {imagenet:.1f} |" in md
    assert "| tiny_official | vit_tiny official, epoch 2 |" in md
    assert "## Not computed" not in md


def test_rerun_runs_nothing(bench, root, official, capsys):
    _, out = bench
    before = snapshot(out)
    code, stdout, _ = run(capsys, "--weights", DEMO, official, "--suite", DEMO_SUITE, "--data_root", root,
                          "--output_dir", out, *OPTIONS)
    assert code == 0
    assert "0 to run, 24 finished earlier" in stdout
    assert "==" not in stdout  # no evaluator started
    assert snapshot(out) == before  # not one result, log or checkpoint rewritten
    payload = json.loads((out / "benchmark.json").read_text())
    assert {c["status"] for row in payload["rows"] for c in row["cells"].values()} == {"done"}


def test_a_cut_short_cell_is_the_only_one_rerun(bench, root, official, capsys):
    _, out = bench
    (out / "tiny_official" / "voc12" / "object_discovery.json").unlink()  # as if killed before the summary
    before = snapshot(out)
    code, stdout, _ = run(capsys, "--weights", DEMO, official, "--suite", DEMO_SUITE, "--data_root", root,
                          "--output_dir", out, *OPTIONS)
    assert code == 0 and "1 to run, 23 finished earlier" in stdout
    payload = json.loads((out / "benchmark.json").read_text())
    statuses = {(row["name"], name): c["status"] for row in payload["rows"] for name, c in row["cells"].items()}
    assert [key for key, status in statuses.items() if status == "ran"] == [("tiny_official", "voc12")]
    after = snapshot(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed and all(name.startswith("tiny_official/voc12/") for name in changed), changed


def test_changed_protocol_is_refused_before_any_model(bench, root, official, tmp_path, capsys):
    _, out = bench
    suite = yaml.safe_load(DEMO_SUITE.read_text())
    suite["entries"]["loc_cub"]["flags"]["image_size"] = 56
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(suite))
    before = snapshot(out)
    code, stdout, err = run(capsys, "--weights", DEMO, official, "--suite", path, "--data_root", root,
                            "--output_dir", out, *OPTIONS)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {out / 'demo_backbone' / 'loc_cub'} holds results of")
    assert "flags.image_size 112 -> 56" in err
    suite["entries"]["loc_cub"]["flags"] = {"image_size": 112, "cam_curve_interval": 0.02}  # a flag added
    path.write_text(yaml.safe_dump(suite))
    code, _, err = run(capsys, "--weights", DEMO, official, "--suite", path, "--data_root", root,
                       "--output_dir", out, *OPTIONS)
    assert code == 2 and "flags.cam_curve_interval None -> 0.02" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------
# rows: names, random-init twins
# ----------------------------------------------------------------------------------------------------------
def test_random_init_twin_is_the_same_network(root, tmp_path, capsys):
    out = tmp_path / "bench"
    code, _, _ = run(capsys, "--weights", DEMO, "--random_init", "--suite", suite_file(tmp_path, {"loc": LOC}),
                     "--data_root", root, "--output_dir", out, *OPTIONS)
    assert code == 0
    twin = json.loads((out / "demo_backbone_random_init" / "loc" / "localization.json").read_text())
    trained = json.loads((out / "demo_backbone" / "loc" / "localization.json").read_text())
    assert twin["weights"] is None and (twin["arch"], twin["mode"], twin["gamma"]) == ("vit_tiny", "simpool", 1.25)
    assert trained["weights"] == str(DEMO)
    # the twin's words build the demo's network: same parameters and shapes, other values
    args = get_args_parser().parse_args([*build_rows([str(DEMO)], random_init=True)[1].words, "--data_path", "d",
                                         "--metadata", "m", "--output_dir", "o"])
    twin_model, _ = load_model(None, random_init=True, **backbone_flags(args))
    demo_model, _ = load_model(DEMO)
    shapes = {k: v.shape for k, v in demo_model.state_dict().items()}
    assert {k: v.shape for k, v in twin_model.state_dict().items()} == shapes
    assert not torch.equal(twin_model.state_dict()["blocks.0.attn.qkv.weight"],
                           demo_model.state_dict()["blocks.0.attn.qkv.weight"])
    config = json.loads((DEMO / "config.json").read_text())["build_kwargs"]
    words = build_rows([str(DEMO)], random_init=True)[1].words
    overrides = [f"{k}={config[k]}" for k in ("img_size", "embed_dim", "depth", "num_heads")]
    assert words == ("--random_init", "--arch", "vit_tiny", "--mode", "simpool", "--gamma", "1.25", "--patch_size",
                     "7", "--model_overrides", *overrides)


def test_rows_names_and_bad_weights(official, tmp_path):
    rows = build_rows([str(official)], random_init=True)
    assert [r.name for r in rows] == ["tiny_official", "tiny_official (random init)"]
    assert network_of(official) == {"arch": "vit_tiny", "mode": "official", "gamma": "auto", "patch_size": 8,
                                    "overrides": TINY}
    kept = official.parent / "checkpoint0004.pth"
    shutil.copy(official, kept)
    assert build_rows([str(kept)])[0].name == "tiny_official/checkpoint0004"
    assert [r.name for r in build_rows([str(official)], names=["a"])] == ["a"]
    with pytest.raises(ConfigError, match="share the folder name"):
        build_rows([str(official), str(official)])
    with pytest.raises(ConfigError, match="export folder, whose config.json fixes the model: drop --mode"):
        build_rows([str(DEMO)], model={"mode": "official"})
    backbone_only = tmp_path / "backbone.pth"
    torch.save(build_backbone("vit_tiny", mode="official", patch_size=8, **TINY).state_dict(), backbone_only)
    with pytest.raises(ConfigError, match="pass --arch and --mode for its random-init row"):
        build_rows([str(backbone_only)], random_init=True)
    assert build_rows([str(backbone_only)], random_init=True, model={"arch": "vit_tiny", "mode": "simpool"})[1].words \
        == ("--random_init", "--arch", "vit_tiny", "--mode", "simpool")
    with pytest.raises(ConfigError, match="2 names for 1 --weights"):
        build_rows([str(official)], names=["a", "b"])


# ----------------------------------------------------------------------------------------------------------
# bad input: one error line, before any model (nothing is written)
# ----------------------------------------------------------------------------------------------------------
BAD_SUITES = {
    "unknown evaluator": ({"loc": {**LOC, "evaluator": "localisation"}},
                          "entry loc: unknown evaluator 'localisation'; choose one of knn, linear, localization"),
    "unknown flag": ({"loc": {**LOC, "flags": {"thresholds": 3}}}, "entry loc: unrecognized arguments: --thresholds 3"),
    "bad value": ({"loc": {**LOC, "flags": {"cam_curve_interval": 2}}},
                  "entry loc: --cam_curve_interval must be in (0, 1), got 2.0"),
    "wrong type": ({"voc": {**VOC, "flags": {"k_patches": "many"}}}, "entry voc: argument --k_patches: invalid int"),
    "data flag under flags": ({"loc": {**LOC, "flags": {"metadata": "x"}}}, "flags: metadata are set by the benchmark"),
    "flag under data": ({"loc": {**LOC, "data": {**LOC["data"], "image_size": "56"}}},
                        "data: image_size is not a data flag of localization"),
    "model flag": ({"voc": {**VOC, "flags": {"arch": "vit_small"}}}, "flags: arch are set by the benchmark"),
    "no probe": ({"in9": {"evaluator": "background_robustness", "data": {"data_path": "bg_challenge"}}},
                 "inputs must name the entries that give background_robustness its probe"),
    "probe of no entry": ({"in9": {"evaluator": "background_robustness", "data": {"data_path": "bg_challenge"},
                                   "inputs": {"probe": "lin"}}}, "inputs: probe: 'lin' is not a linear entry"),
    "unknown key": ({"loc": {**LOC, "dataset": "CUB"}}, "entry loc: unknown keys ['dataset']"),
    "same columns": ({"a": LOC, "b": LOC}, "the columns ['CUB'] come from several entries"),
    "bad name": ({"a/b": LOC}, "entry name 'a/b' must be letters"),
    "no entries": ({}, "has no entries"),
}


@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_bad_suite_is_one_error_line(case, root, tmp_path, capsys):
    entries, message = BAD_SUITES[case]
    code, stdout, err = run(capsys, "--weights", DEMO, "--suite", suite_file(tmp_path, entries), "--data_root", root,
                            "--output_dir", tmp_path / "out")
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"error: --suite {tmp_path / 'suite.yaml'}"), err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_published_rows_must_name_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"published: paper: \['LOST VOC12'\] are not columns"):
        read_suite(suite_file(tmp_path, {"voc": VOC}, published={"paper": {"LOST VOC12": 50.0}}))
    suite = read_suite(PAPER_SUITE)
    assert suite.published["DINO ViT-S/16 100 ep, SimPool (paper)"]["LOST VOC07"] == 59.8
    md = table_markdown(table_payload(suite, "/data", []))
    assert "| *DINO ViT-S/16 100 ep, official (paper)* | | 82.7 | 62.0 |" in md
    assert "| *DINO ViT-S/16 100 ep, SimPool (paper)* | | 95.6 | — | 80.6 | 78.7 | — |" in md


@pytest.mark.parametrize("case", ["empty root", "missing weights", "not a root", "under torchrun", "wrong layout"])
def test_bad_input_before_any_model(case, root, tmp_path, capsys, monkeypatch):
    argv = ["--weights", DEMO, "--suite", DEMO_SUITE, "--data_root", root, "--output_dir", tmp_path / "out"]
    if case == "empty root":
        (tmp_path / "empty").mkdir()
        argv[5], expected = tmp_path / "empty", "holds none of the data of"
    elif case == "missing weights":
        argv[1], expected = tmp_path / "nope.pth", "--weights"
    elif case == "not a root":
        argv[5], expected = tmp_path / "nowhere", "is not a folder"
    elif case == "under torchrun":
        monkeypatch.setenv("WORLD_SIZE", "2")
        expected = "run simpool-benchmark as one process"
    else:  # a VOC folder without its image list: found, but not in VOC's layout
        broken = tmp_path / "root"
        shutil.copytree(root / "VOCdevkit", broken / "VOCdevkit")
        (broken / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").unlink()
        argv[5], expected = broken, "entry voc12 of the suite: "
    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert expected in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# a root with some of the data; a cell that fails
# ----------------------------------------------------------------------------------------------------------
def test_missing_data_sets_are_skipped_columns(tmp_path, capsys):
    root = write_benchmark_root(tmp_path / "data", n=4, image_size=64, in9_size=32,
                                datasets=["voc07", "cub", "bg_challenge"])
    out = tmp_path / "bench"
    code, stdout, _ = run(capsys, "--weights", DEMO, "--suite", DEMO_SUITE, "--data_root", root, "--output_dir", out,
                          *OPTIONS)
    assert code == 0 and "2 to run, 0 finished earlier, 10 skipped" in stdout
    payload = json.loads((out / "benchmark.json").read_text())
    (row,) = payload["rows"]
    ran = {name for name, cell in row["cells"].items() if cell["status"] == "ran"}
    assert ran == {"loc_cub", "voc07"}
    assert row["cells"]["voc12"] == {**row["cells"]["voc12"], "status": "skipped",
                                     "reason": f"not under {root}: VOCdevkit/VOC2012"}
    assert row["cells"]["in9"]["reason"] == "needs entry linear, which is skipped"
    assert [h for h, v in row["values"].items() if v is not None] == ["CUB", "DINO-seg VOC07", "LOST VOC07"]
    assert payload["entries"]["coco20k"]["not_found"] == ["COCO/images/train2014",
                                                          "COCO/annotations/instances_train2014.json",
                                                          "LOST/datasets/coco_20k_filenames.txt"]
    md = (out / "benchmark.md").read_text()
    assert "| voc12 | object_discovery | VOCdevkit/VOC2012 | not found: VOCdevkit/VOC2012 |" in md
    assert f"- demo_backbone / voc12: skipped: not under {root}: VOCdevkit/VOC2012" in md
    assert not (out / "demo_backbone" / "voc12").exists()


def test_a_failing_evaluator_is_a_reason_not_a_crash(root, tmp_path, capsys):
    resnet = tmp_path / "resnet" / "checkpoint.pth"
    resnet.parent.mkdir()
    model = build_backbone("resnet18", mode="official", layers=(1, 1, 1, 1))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "args": {"arch": "resnet18", "mode": "official", "model_overrides": {"layers": [1, 1, 1, 1]}}}, resnet)
    out = tmp_path / "bench"
    code, _, err = run(capsys, "--weights", resnet, "--suite", suite_file(tmp_path, {"loc": LOC, "voc": VOC}),
                       "--data_root", root, "--output_dir", out, *OPTIONS)
    assert code == 1
    cells = json.loads((out / "benchmark.json").read_text())["rows"][0]["cells"]
    assert cells["loc"]["status"] == cells["voc"]["status"] == "failed"
    assert cells["loc"]["reason"].startswith("resnet18 in official mode pools by averaging and has no attention map")
    assert "error: resnet18 in official mode" in err  # the evaluator's own line, shown as it came
    assert json.loads((out / "resnet" / "loc" / CELL_FILE).read_text())["status"] == "failed"


# ----------------------------------------------------------------------------------------------------------
# the registry, the plan's command lines, the generated root
# ----------------------------------------------------------------------------------------------------------
def test_registry_matches_its_drivers():
    for name, evaluator in EVALUATORS.items():
        module = evaluator.module
        assert module.RESULTS_FILE == evaluator.results_file, name
        parser = module.get_args_parser()
        words = ["--random_init", "--output_dir", "o", *[w for f in evaluator.data_flags for w in (f"--{f}", "d")],
                 *[w for f in evaluator.inputs for w in (f"--{f}", "i")]]
        for option in evaluator.options:
            words += [f"--{option}"] if option == "no_progress" else [f"--{option}", "1"]
        parse_strict(parser, words)  # every flag the registry names is one of the driver's
        assert set(evaluator.inputs.values()) <= set(EVALUATORS)


def test_plan_passes_each_driver_its_options(root, official, tmp_path):
    cells = plan(read_suite(DEMO_SUITE), build_rows([str(official)]), root, tmp_path,
                 ["--num_workers", "3", "--batch_size_per_gpu", "5", "--no_progress"])
    argv = {cell.entry.name: cell.argv for cell in cells}
    assert argv["loc_cub"][-7:] == ["--num_workers", "3", "--batch_size_per_gpu", "5", "--no_progress",
                                    "--output_dir", str(tmp_path / "tiny_official" / "loc_cub")]
    assert "--no_progress" not in argv["knn"] and argv["knn"][-4:-2] == ["--batch_size_per_gpu", "5"]
    assert "5" not in argv["linear"][argv["linear"].index("--num_workers"):]  # the probe's batch is protocol
    assert argv["in9"][argv["in9"].index("--probe") + 1] == str(tmp_path / "tiny_official" / "linear")
    assert argv["voc07"][:4] == ["--pretrained_weights", str(official), "--checkpoint_key", "teacher"]
    assert "--no_progress" not in argv["davis"] and argv["davis"][-4:-2] == ["--batch_size_per_gpu", "5"]
    assert [c.status for c in cells] == ["pending"] * 12


def test_plan_prints_the_commands_and_writes_nothing(root, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, _ = run(capsys, "--weights", DEMO, "--suite", suite_file(tmp_path, {"loc": LOC, "voc": VOC}),
                          "--data_root", root, "--output_dir", out, "--plan")
    assert code == 0 and not out.exists()
    assert "demo_backbone / loc: pending" in stdout
    assert f"-m simpool.evaluation.run_localization --pretrained_weights {DEMO} --checkpoint_key teacher" in stdout


def test_generated_root_is_in_each_authors_layout(root):
    assert len(read_wsol(root / "CUB_200_2011/images", root / "wsolevaluation/metadata/CUB/test")) == 6
    assert len(read_wsol(root / "ILSVRC", root / "wsolevaluation/metadata/ILSVRC/test")) == 6
    assert len(read_voc_boxes(root / "VOCdevkit/VOC2012")) == 6
    for split in ("train", "val"):  # every one of IN-9's nine classes in both splits
        assert len(os.listdir(root / "imagenet" / split)) == 9
    with pytest.raises(ValueError, match="unknown data sets"):
        write_benchmark_root(root, datasets=["voc2007"])


@pytest.mark.slow
def test_each_evaluator_under_torchrun(root, tmp_path, capsys, monkeypatch):
    """--nproc_per_node 2: each cell is its own torchrun (2 gloo processes), with the numbers of one process."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    suite = suite_file(tmp_path, {"loc": LOC, "voc": VOC})
    values = {}
    for launch in ([], ["--nproc_per_node", "2"]):
        out = tmp_path / f"bench{len(launch)}"
        code, _, err = run(capsys, "--weights", DEMO, "--suite", suite, "--data_root", root, "--output_dir", out,
                           "--batch_size_per_gpu", "1", *OPTIONS, *launch)
        assert code == 0, err
        values[len(launch)] = json.loads((out / "benchmark.json").read_text())["rows"][0]["values"]
    assert values[0] == values[2]
    assert json.loads((tmp_path / "bench2" / "demo_backbone" / "loc" / CELL_FILE).read_text())["status"] == "ran"
    assert len(list((tmp_path / "bench2" / "demo_backbone" / "loc").glob("localization.rank*.jsonl"))) == 2
