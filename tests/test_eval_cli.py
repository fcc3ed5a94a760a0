"""eval_knn.py / eval_linear.py end to end on real photos and a checkpoint written by train_dino.py itself.

Tiny everything (a 1-block ViT of width 32, 16 px crops, 16 train / 8 val photos), so the file runs in
well under a minute on two busy cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import simpool.evaluation.linear_probe as linear_probe
import simpool.evaluation.run_knn as run_knn
import simpool.evaluation.run_linear as run_linear
from simpool.dino.run_train import main as train_main
from simpool.evaluation.features import eval_transform, extract_features, feature_fn
from simpool.evaluation.knn import knn_classifier
from simpool.evaluation.linear import train_linear_on_features
from simpool.export import export_backbone
from simpool.loading import load_model
from tests.helpers import REPO, TINY, Killed, free_port

CLASSES = ("cat", "coffee", "rocket", "astronaut")
IMAGE_SIZE = "16"  # the crop size the tiny checkpoint was trained at
COMMON = ["--image_size", IMAGE_SIZE, "--num_workers", "0", "--batch_size_per_gpu", "8"]
TINY_MODEL = ["--arch", "vit_tiny", "--patch_size", "4", "--model_overrides", "depth=1", "embed_dim=32",
              "num_heads=2"]


def make_photo_folder(root: Path, splits=(("train", 4), ("val", 2)), classes=CLASSES) -> Path:
    """Real photos (skimage.data), several 48x40 crops per class, train/ and val/ crops at other offsets."""
    from skimage import data

    photos = {"cat": data.chelsea, "coffee": data.coffee, "rocket": data.rocket, "astronaut": data.astronaut}
    for split, count in splits:
        offset = 0 if split == "train" else 4
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(photos[name]())
            for i in range(count):
                o = i + offset
                crop = image.crop((o * 20, o * 10, o * 20 + 240, o * 10 + 200))
                crop.resize((48, 40)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(photo folder, checkpoint.pth of a 1-epoch train_dino.py run on it)."""
    root = tmp_path_factory.mktemp("eval_cli")
    photos = make_photo_folder(root / "photos")
    out = root / "dino"
    flags = ["--data_path", str(photos), "--subset", "2", "--epochs", "1", "--output_dir", str(out)]
    assert train_main([*TINY, *flags]) == 0
    return photos, out / "checkpoint.pth"


def knn_args(photos: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["--pretrained_weights", str(checkpoint), "--data_path", str(photos), *COMMON, *extra]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------------------
def test_knn_prints_table_writes_json_equal_to_the_library(trained, tmp_path, capsys, monkeypatch):
    photos, checkpoint = trained
    dump = tmp_path / "features"
    args = knn_args(photos, checkpoint, "--nb_knn", "1", "3", "100", "--dump_features", str(dump))
    assert run_knn.main(args) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "k > 16 skipped" in out
    written = json.loads((checkpoint.parent / "knn.json").read_text())
    assert set(written["results"]) == {"1", "3"} and written["num_train"] == 16 and written["num_val"] == 8
    assert (written["checkpoint_key"], written["mode"], written["gamma"]) == ("teacher", "simpool", 1.25)
    for k, scores in written["results"].items():
        assert f"{int(k):>6} {scores['top1']:>8.2f} {scores['top5']:>8.2f}" in out

    # The same numbers from the library, by hand: the checkpoint's teacher, eval transform, k-NN.
    model, _ = load_model(checkpoint, "teacher")
    splits = run_knn.labelled_splits(run_knn.get_args_parser().parse_args(["--data_path", str(photos)]),
                                     eval_transform(int(IMAGE_SIZE)))
    train_x, train_y = extract_features(model, splits[0], batch_size=5)
    val_x, val_y = extract_features(model, splits[1], batch_size=3)
    # real loader workers (their worker_init_fn ignores preemption signals) give the same features
    workers_x, workers_y = extract_features(model, splits[0], batch_size=5, num_workers=2)
    assert torch.equal(workers_x, train_x) and torch.equal(workers_y, train_y)
    dumped = {split: torch.load(dump / f"{split}.pth", weights_only=True) for split in ("train", "val")}
    torch.testing.assert_close(dumped["train"]["features"], train_x)  # teacher, eval transform, normalised
    torch.testing.assert_close(dumped["val"]["features"], val_x)
    assert torch.equal(dumped["val"]["labels"], val_y)
    expected = knn_classifier(train_x, train_y, val_x, val_y, [1, 3], T=0.07, num_classes=4)
    for k, (top1, top5) in expected.items():
        assert written["results"][str(k)] == {"top1": top1, "top5": top5}

    # An export folder of the same teacher: same results, knn.json inside the folder.
    exported = export_backbone(checkpoint, tmp_path / "export")
    assert run_knn.main(knn_args(photos, exported, "--nb_knn", "1", "3")) == 0
    assert json.loads((exported / "knn.json").read_text())["results"] == written["results"]

    # --load_features: no model and no images, same results.
    monkeypatch.setattr(run_knn, "build_model", lambda *a, **k: pytest.fail("built with --load_features"))
    reloaded = tmp_path / "reloaded"
    args = ["--load_features", str(dump), "--nb_knn", "1", "3", "--output_dir", str(reloaded)]
    assert run_knn.main(args) == 0
    assert json.loads((reloaded / "knn.json").read_text())["results"] == written["results"]


def test_knn_without_weights_stops_unless_random_init(trained, tmp_path, capsys):
    photos, _ = trained
    assert run_knn.main(["--data_path", str(photos), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "--pretrained_weights" in err and "--random_init" in err

    out = tmp_path / "random"
    args = ["--random_init", *TINY_MODEL, "--data_path", str(photos), *COMMON, "--nb_knn", "2",
            "--output_dir", str(out)]
    assert run_knn.main(args) == 0
    written = json.loads((out / "knn.json").read_text())
    assert written["weights"] is None and written["arch"] == "vit_tiny" and set(written["results"]) == {"2"}


def test_mode_mismatch_stops_before_extraction(trained, tmp_path, capsys, monkeypatch):
    photos, checkpoint = trained
    monkeypatch.setattr(run_knn, "extract_features", lambda *a, **k: pytest.fail("ran with bad weights"))
    monkeypatch.chdir(tmp_path)  # the default --output_dir is "."
    assert run_knn.main(knn_args(photos, checkpoint, "--mode", "official")) == 2
    err = capsys.readouterr().err
    assert "missing keys: cls_token" in err
    assert "hint: this checkpoint has no [CLS] token: use --mode simpool" in err
    assert run_linear.main(knn_args(photos, checkpoint, "--mode", "official")) == 2
    assert "use --mode simpool" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["no_val", "other_classes"])
def test_bad_data_folders_stop_before_the_model_is_built(trained, tmp_path, capsys, monkeypatch, layout):
    _, checkpoint = trained
    if layout == "no_val":
        data = make_photo_folder(tmp_path / "data", splits=(("train", 1),))
        expected = str(data / "val")
    else:
        data = make_photo_folder(tmp_path / "data", splits=(("train", 1),))
        make_photo_folder(data, splits=(("val", 1),), classes=("cat", "coffee"))
        expected = "different class folders"
    for module in (run_knn, run_linear):
        monkeypatch.setattr(module, "build_model", lambda *a, **k: pytest.fail("model built with bad data"))
    assert run_knn.main(knn_args(data, checkpoint)) == 2
    assert expected in capsys.readouterr().err
    assert run_linear.main(knn_args(data, checkpoint, "--output_dir", str(tmp_path / "lin"))) == 2
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------------------
def test_linear_two_epochs_logs_checkpoints_and_resumes_exactly(trained, tmp_path, capsys, monkeypatch):
    photos, checkpoint = trained
    out = tmp_path / "lin"
    args = knn_args(photos, checkpoint, "--output_dir", str(out), "--lrs", "0.01", "1.0")
    assert run_linear.main([*args, "--epochs", "2"]) == 0
    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1]
    assert set(log[-1]["per_lr"]) == {"0.01", "1.0"} and len(log[-1]["train_loss"]) == 2
    # lr scaled by the global batch / 256, then cosine over the epochs: epoch 1 of 2 is at half.
    assert log[0]["train_lr"] == pytest.approx([0.01 * 8 / 256, 8 / 256])
    assert log[1]["train_lr"] == pytest.approx([0.01 * 8 / 256 / 2, 8 / 256 / 2])
    state = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 2 and state["heads"]["heads.0.weight"].shape == (4, 32)
    assert not torch.equal(state["heads"]["heads.0.weight"], state["heads"]["heads.1.weight"])  # other lrs
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == pytest.approx([0.0, 0.0], abs=1e-18)
    assert len(state["optimizer"]["state"]) == 4 and state["scheduler"]["last_epoch"] == 2  # 2 heads x (W, b)
    assert "best top-1" in capsys.readouterr().out
    assert run_linear.main([*args, "--epochs", "3"]) == 2  # another schedule: refused, not mixed
    assert "holds a probe of other features or flags: epochs 2 -> 3" in capsys.readouterr().err

    # Killed after its second epoch and rerun, a 3-epoch probe ends on the same bits as one run straight.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torch.manual_seed(0)  # the augmentations draw from the global RNG
    assert run_linear.main([*args, "--epochs", "3", "--output_dir", str(straight)]) == 0
    epochs_done = []
    log_line = linear_probe.append_json_line

    def killed_after_two_epochs(*args):  # the kill comes once epoch 2's checkpoint and log line are written
        log_line(*args)
        epochs_done.append(1)
        if len(epochs_done) == 2:
            raise Killed

    monkeypatch.setattr(linear_probe, "append_json_line", killed_after_two_epochs)
    torch.manual_seed(0)
    with pytest.raises(Killed):
        run_linear.main([*args, "--epochs", "3", "--output_dir", str(resumed)])
    monkeypatch.undo()
    torch.manual_seed(1)  # the rerun starts elsewhere: the checkpoint restores the RNGs
    assert run_linear.main([*args, "--epochs", "3", "--output_dir", str(resumed)]) == 0
    assert f"resumed from {resumed / 'checkpoint.pth.tar'} at epoch 2" in capsys.readouterr().out
    assert read_log(resumed) == read_log(straight) and len(read_log(straight)) == 3
    expected, got = (torch.load(d / "checkpoint.pth.tar", weights_only=True) for d in (straight, resumed))
    for key, value in expected["heads"].items():
        assert torch.equal(got["heads"][key], value), key
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"]), key

    assert run_linear.main([*knn_args(photos, checkpoint, "--output_dir", str(straight)), "--evaluate"]) == 0
    printed = capsys.readouterr().out
    for lr, scores in read_log(straight)[-1]["per_lr"].items():
        assert f"evaluate: lr {float(lr):g}: top-1 {scores['top1']:.2f}%" in printed

    assert run_linear.main([*args, "--epochs", "3", "--lrs", "0.5", "--output_dir", str(straight)]) == 2
    assert "holds a probe of other features or flags: lrs [0.01, 1.0] -> [0.5]" in capsys.readouterr().err


def test_linear_cached_features_equals_library(trained, tmp_path):
    photos, checkpoint = trained
    out = tmp_path / "cached"
    args = knn_args(photos, checkpoint, "--output_dir", str(out), "--epochs", "2", "--cached_features",
                    "True", "--lrs", "0.01", "0.1")
    assert run_linear.main(args) == 0
    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1] and all(line["cached_features"] is True for line in log)
    assert set(log[-1]["per_lr"]) == {"0.01", "0.1"}

    model, _ = load_model(checkpoint, "teacher")
    parsed = run_linear.get_args_parser().parse_args(["--data_path", str(photos), "--output_dir", str(out)])
    train, val, _ = run_linear.labelled_splits(parsed, eval_transform(int(IMAGE_SIZE)))
    features = feature_fn(model)
    train_x, train_y = extract_features(features, train, batch_size=8, normalize=False)
    val_x, val_y = extract_features(features, val, batch_size=8, normalize=False)
    scaled = [0.01 * 8 / 256, 0.1 * 8 / 256]
    expected = train_linear_on_features(train_x, train_y, val_x, val_y, scaled, epochs=2, batch_size=8,
                                        num_labels=4, seed=0)
    for lr, scaled_lr in zip(("0.01", "0.1"), scaled):
        assert log[-1]["per_lr"][lr]["top1"] == expected["per_lr"][scaled_lr]["top1"]
        assert log[-1]["per_lr"][lr]["loss"] == pytest.approx(expected["per_lr"][scaled_lr]["loss"], rel=1e-5)
    saved = torch.load(out / "checkpoint.pth.tar", weights_only=True)["heads"]
    for key, value in expected["model"].state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes
# ----------------------------------------------------------------------------------------------------------
DDP_SCRIPT = '''
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from simpool.distributed import cleanup, init_distributed
from simpool.evaluation.features import extract_features
from simpool.models import build_backbone


class NoiseImages(Dataset):
    """Image i is a fixed 16x16 noise picture; 7 of them, so 2 ranks get 4 and 3."""

    def __len__(self):
        return 7

    def __getitem__(self, index):
        return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(index)), index % 3


def tiny_model():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", mode="simpool", patch_size=4, depth=1, embed_dim=32, num_heads=2).eval()


def linear_probe(photos, out, rank):
    import simpool.evaluation.run_linear as run_linear

    train_probe = run_linear.train_probe

    def train_and_keep_the_heads(state, *args):
        train_probe(state, *args)
        torch.save(state.heads.state_dict(), Path(out) / f"heads_rank{rank}.pt")

    run_linear.train_probe = train_and_keep_the_heads
    torch.manual_seed(0)  # the same random backbone on both ranks
    assert run_linear.main([
        "--random_init", "--arch", "vit_tiny", "--patch_size", "4", "--model_overrides", "depth=1",
        "embed_dim=32", "num_heads=2", "--data_path", photos, "--output_dir", out, "--epochs", "1",
        "--image_size", "16", "--batch_size_per_gpu", "4", "--num_workers", "0", "--lrs", "0.1", "1.0"]) == 0


if __name__ == "__main__":
    dist_info = init_distributed()
    features, labels = extract_features(tiny_model(), NoiseImages(), batch_size=2)
    if dist_info.rank == 0:
        torch.save({"features": features, "labels": labels}, sys.argv[1])
    linear_probe(sys.argv[2], sys.argv[3], dist_info.rank)
    cleanup()
'''




def test_two_gloo_processes_extract_like_one_and_keep_identical_linear_heads(trained, tmp_path):
    photos, _ = trained
    script = tmp_path / "ddp_extract.py"
    script.write_text(DDP_SCRIPT)
    result_file, out = tmp_path / "ddp_features.pt", tmp_path / "ddp_linear"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), str(result_file), str(photos), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    spec = importlib.util.spec_from_file_location("ddp_extract", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single_x, single_y = extract_features(module.tiny_model(), module.NoiseImages(), batch_size=2)
    ddp = torch.load(result_file, weights_only=True)
    assert ddp["features"].shape == (7, 32)
    assert torch.equal(ddp["labels"], single_y)  # dataset order, no padding duplicates
    torch.testing.assert_close(ddp["features"], single_x, rtol=1e-5, atol=1e-6)

    heads = [torch.load(out / f"heads_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key]), key  # DDP kept the ranks in step
    assert heads[0]["heads.1.bias"].abs().sum() > 0  # and they did train (biases start at zero)
    assert [line["epoch"] for line in read_log(out)] == [0]
