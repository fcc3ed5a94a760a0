"""train_dino.py --pretrained_weights: continued pretraining from the reference fixtures and export folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simpool.dino.config import parse_args
from simpool.dino.init_from import head_state_dict
from simpool.dino.run_train import main
from simpool.dino.train import Trainer
from simpool.distributed import unwrap
from simpool.export import export_backbone
from simpool.loading import load_model

VIT = ["--arch", "vit_tiny", "--patch_size", "16", "--model_overrides", "depth=2"]
REF_HEAD = ["--out_dim", "256", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--head_nlayers", "3",
            "--use_bn_in_head", "False"]
RUN = ["--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
       "--batch_size_per_gpu", "4", "--num_workers", "0", "--precision", "fp32", "--optimizer", "adamw",
       "--warmup_epochs", "0", "--warmup_teacher_temp_epochs", "0", "--eval_every", "0", "--nb_knn", "1",
       "--log_every", "1", "--epochs", "1"]
SOURCES = {  # fixture -> (flags that describe its backbone, reference output, checkpoint_key)
    "vit_simpool_dino_checkpoint.pth": ([*VIT, "--mode", "simpool", *REF_HEAD], "vit_simpool_teacher_224"),
    "vit_official_backbone.pth": ([*VIT, "--mode", "official"], "vit_official_224"),
    "resnet_simpool_teacher.pth": (["--arch", "resnet18", "--mode", "simpool", "--model_overrides",
                                    "layers=[1,1,1,1]"], "resnet_simpool_224"),
    "convnext_simpool_teacher.pth": (["--arch", "convnext_tiny", "--mode", "simpool", "--gamma", "None",
                                      "--model_overrides", "depths=[1,1,1,1]", "dims=[32,64,128,256]"],
                                     "convnext_simpool_224"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny train/ ImageFolder: 2 classes x 4 random 32 px images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def trainer(images, out, flags) -> Trainer:
    return Trainer(parse_args([*flags, *RUN, "--data_path", str(images), "--output_dir", str(out)]))


def load_model_flags(flags: list[str]) -> dict:
    args = parse_args([*flags, "--data_path", "x"])
    return {"arch": args.arch, "mode": args.mode, "gamma": args.gamma, "patch_size": args.patch_size,
            **args.model_overrides}


@pytest.mark.parametrize("name", list(SOURCES))
def test_teacher_and_student_start_from_the_weights(reference_dir, images, tmp_path, name, capsys):
    flags, output = SOURCES[name]
    path = reference_dir / name
    run = trainer(images, tmp_path / "run", [*flags, "--pretrained_weights", str(path)])
    out_text = capsys.readouterr().out
    assert f"initialised from {'teacher of ' if 'dino' in name or 'teacher' in name else ''}{path}" in out_text
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    expected = torch.load(reference_dir / "outputs.pt", weights_only=True)[output]
    loaded, _ = load_model(path, **load_model_flags(flags))
    teacher, student = unwrap(run.teacher).backbone.eval(), unwrap(run.student).backbone.eval()
    with torch.no_grad():
        features = teacher(inputs)
        assert torch.equal(features, loaded(inputs))  # step 0: the teacher is the loaded model
        assert torch.equal(student(inputs), features)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)  # and reproduces the reference
    if "dino" not in name:
        assert "holds no DINO head: student and teacher heads start fresh" in out_text


def test_full_checkpoint_loads_heads_and_centre_and_checkpoint_key_picks_the_network(reference_dir, images,
                                                                                     tmp_path, capsys):
    path = reference_dir / "vit_simpool_dino_checkpoint.pth"
    checkpoint = torch.load(path, weights_only=True)
    flags, _ = SOURCES[path.name]
    run = trainer(images, tmp_path / "run", [*flags, "--pretrained_weights", str(path),
                                                 "--checkpoint_key", "student"])
    out_text = capsys.readouterr().out
    assert "DINO head loaded into student and teacher" in out_text and "DINO loss centre loaded" in out_text
    assert "position embeddings resampled as the reference does" in out_text
    saved_head = head_state_dict(checkpoint["student"])
    for net in (run.student, run.teacher):
        head = unwrap(net).head.state_dict()
        assert head.keys() == saved_head.keys()
        assert all(torch.equal(head[k], saved_head[k]) for k in head)
        assert unwrap(net).backbone.pos_embed_resampling == "reference"
    assert torch.equal(run.loss_fn.center, checkpoint["dino_loss"]["center"])
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    expected = torch.load(reference_dir / "outputs.pt", weights_only=True)["vit_simpool_student_224"]
    with torch.no_grad():
        torch.testing.assert_close(unwrap(run.teacher).backbone.eval()(inputs), expected, rtol=1e-4, atol=1e-5)
    assert run.progress.iteration == 0 and not run.optimizer.state  # optimizer and schedules start fresh


def test_mismatched_head_is_reported_and_initialised_fresh(reference_dir, images, tmp_path, capsys):
    path = reference_dir / "vit_simpool_dino_checkpoint.pth"
    flags = [*VIT, "--mode", "simpool", *REF_HEAD, "--out_dim", "128"]
    run = trainer(images, tmp_path / "run", [*flags, "--pretrained_weights", str(path)])
    out_text = capsys.readouterr().out
    assert "does not fit the head flags" in out_text and "last_layer.weight_v (256, 32) vs (128, 32)" in out_text
    scratch = trainer(images, tmp_path / "scratch", flags)  # same seed, no --pretrained_weights
    fresh = unwrap(scratch.teacher).head.state_dict()
    for net in (run.student, run.teacher):
        head = unwrap(net).head.state_dict()
        assert all(torch.equal(head[k], fresh[k]) for k in head)  # exactly the from-scratch initialisation
    assert torch.count_nonzero(run.loss_fn.center) == 0
    assert not torch.equal(unwrap(run.teacher).backbone.pos_embed, unwrap(scratch.teacher).backbone.pos_embed)


def test_timm_state_dict_classifier_is_not_taken_for_a_dino_head(reference_dir, images, tmp_path, capsys):
    state = torch.load(reference_dir / "vit_official_backbone.pth", weights_only=True)
    state = {**state, "head.weight": torch.randn(1000, 192), "head.bias": torch.zeros(1000)}  # timm's classifier
    torch.save(state, tmp_path / "timm_vit.pth")
    flags, output = SOURCES["vit_official_backbone.pth"]
    run = trainer(images, tmp_path / "run", [*flags, "--pretrained_weights", str(tmp_path / "timm_vit.pth")])
    assert "holds no DINO head: student and teacher heads start fresh" in capsys.readouterr().out
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    expected = torch.load(reference_dir / "outputs.pt", weights_only=True)[output]
    with torch.no_grad():
        torch.testing.assert_close(unwrap(run.teacher).backbone.eval()(inputs), expected, rtol=1e-4, atol=1e-5)


def test_export_folder_initialises_the_run(reference_dir, images, tmp_path, capsys):
    flags, output = SOURCES["vit_official_backbone.pth"]
    folder = export_backbone(reference_dir / "vit_official_backbone.pth", tmp_path / "export",
                             **load_model_flags(flags))
    run = trainer(images, tmp_path / "run", [*flags, "--pretrained_weights", str(folder)])
    assert f"initialised from {folder}\n" in capsys.readouterr().out
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    expected = torch.load(reference_dir / "outputs.pt", weights_only=True)[output]
    with torch.no_grad():
        torch.testing.assert_close(unwrap(run.teacher).backbone.eval()(inputs), expected, rtol=1e-4, atol=1e-5)


def test_checkpoint_in_output_dir_wins_over_pretrained_weights(reference_dir, images, tmp_path, capsys):
    flags, _ = SOURCES["vit_simpool_dino_checkpoint.pth"]
    out = tmp_path / "run"
    assert main([*flags, *RUN, "--data_path", str(images), "--output_dir", str(out),
                 "--pretrained_weights", str(reference_dir / "vit_simpool_dino_checkpoint.pth")]) == 0
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["teacher"]
    capsys.readouterr()  # below, a file that does not fit: never read, because the run resumes
    run = trainer(images, out, [*flags, "--pretrained_weights", str(reference_dir / "resnet_simpool_teacher.pth")])
    out_text = capsys.readouterr().out
    assert run.resumed and "not read: resuming from" in out_text
    assert all(torch.equal(v, saved[k]) for k, v in unwrap(run.teacher).state_dict().items())
    # The reference position-embedding rule the run started with survives the resume and reaches load_model.
    teacher = unwrap(run.teacher).backbone.eval()
    assert teacher.pos_embed_resampling == "reference"
    loaded, _ = load_model(out / "checkpoint.pth")
    assert loaded.pos_embed_resampling == "reference"
    images = torch.load(reference_dir / "inputs.pt", weights_only=True)["images224"]
    with torch.no_grad():
        assert torch.equal(loaded(images), teacher(images))


@pytest.mark.parametrize(("weights", "extra", "message"), [
    ("missing.pth", [], "does not exist"),
    ("garbage.pth", [], "cannot read"),
    ("empty_folder", [], "is a folder without config.json"),
    ("resnet_simpool_teacher.pth", [], "weights do not fit"),  # a ResNet for a ViT run
    ("resnet_simpool_teacher.pth", ["--checkpoint_key", "student"], "has no 'student' entry"),
])
def test_bad_weights_stop_with_exit_2_before_anything_is_written(reference_dir, images, tmp_path, capsys,
                                                                 weights, extra, message):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "empty_folder").mkdir()
    path = reference_dir / weights if (reference_dir / weights).exists() else tmp_path / weights
    out = tmp_path / "run"
    flags, _ = SOURCES["vit_simpool_dino_checkpoint.pth"]
    code = main([*flags, *RUN, *extra, "--data_path", str(images), "--output_dir", str(out),
                 "--pretrained_weights", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
