"""Export of a backbone to model.safetensors + config.json, loading it back, torch.hub, and the timm copy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from simpool.checkpoint import CheckpointError, safe_load
from simpool.export import TIMM_WEIGHTS_FILE, export_backbone
from simpool.loading import WEIGHTS_FILE, load_backbone, load_model
from tests.helpers import REPO, TINY_RESNET, TINY_VIT, write_training_checkpoint


def load_cli(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "utils" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = [("vit_tiny", "simpool", TINY_VIT, 224), ("vit_tiny", "official", TINY_VIT, 224),
         ("resnet18", "simpool", TINY_RESNET, 64)]


@pytest.mark.parametrize("arch,mode,overrides,size", CASES, ids=[f"{a}-{m}" for a, m, _, _ in CASES])
def test_exported_features_equal_the_checkpoint_teacher(tmp_path, arch, mode, overrides, size):
    teacher, student = write_training_checkpoint(tmp_path / "checkpoint.pth", arch, mode, overrides)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export")

    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["mode"], config["family"]) == (arch, mode, teacher.family)
    assert config["embed_dim"] == teacher.embed_dim and config["gamma"] == teacher.gamma
    assert config["training"]["epochs"] == 100 and config["training"]["data_path"] == "/data/imagenet"
    assert config["training"]["global_crops_scale"] == [0.25, 1.0] and "dist_url" not in config["training"]
    assert config["source"]["which"] == "teacher" and config["source"]["epoch"] == 3
    if arch.startswith("vit"):
        assert config["pos_embed_resampling"] == "exact" and config["patch_size"] == 16
    weights = load_file(str(out / WEIGHTS_FILE))
    assert set(weights) == set(teacher.state_dict()), "backbone keys only: no head, no prefix"

    model = load_backbone(out)
    assert not model.training
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model(x)
        assert torch.equal(features, teacher(x))
        assert not torch.allclose(features, student(x))
    if arch.startswith("vit"):  # another resolution exercises the position-embedding rule too
        x96 = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            assert torch.equal(model(x96), teacher(x96))


def test_student_export_and_flag_overrides(tmp_path):
    _, student = write_training_checkpoint(tmp_path / "checkpoint.pth", "vit_tiny", "simpool", TINY_VIT)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export", which="student")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(load_backbone(out)(x), student(x))
    assert json.loads((out / "config.json").read_text())["source"]["which"] == "student"
    # a flag beats the recorded args: mode official does not fit SimPool weights, and the error says so
    with pytest.raises(CheckpointError, match="use --mode simpool"):
        export_backbone(tmp_path / "checkpoint.pth", tmp_path / "bad", mode="official")


def test_checkpoint_with_default_gamma_auto(tmp_path):
    teacher, _ = write_training_checkpoint(tmp_path / "c.pth", "vit_tiny", "simpool", TINY_VIT, gamma="auto")
    model = load_backbone(export_backbone(tmp_path / "c.pth", tmp_path / "export"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))


def test_torch_hub_loads_the_export(tmp_path):
    teacher, _ = write_training_checkpoint(tmp_path / "checkpoint.pth", "vit_tiny", "simpool", TINY_VIT)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export")
    model = torch.hub.load(str(REPO), "backbone", path=str(out), source="local", trust_repo=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))


@pytest.mark.parametrize("arch,overrides,timm_name", [("vit_tiny", TINY_VIT, "vit_tiny_patch16_224"),
                                                      ("resnet18", TINY_RESNET, "resnet18")])
def test_official_export_loads_into_timm_create_model(tmp_path, arch, overrides, timm_name):
    teacher, _ = write_training_checkpoint(tmp_path / "checkpoint.pth", arch, "official", overrides)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export")
    entry = json.loads((out / "config.json").read_text())["timm"]
    assert entry["model_name"] == timm_name and entry["file"] == TIMM_WEIGHTS_FILE
    model = timm.create_model(
        entry["model_name"], pretrained=True, num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out / entry["file"])), **entry["kwargs"],
    ).eval()
    # timm's loader is not strict once it drops the classifier: check the keys match one for one ourselves
    assert set(load_file(str(out / entry["file"]))) == set(model.state_dict())
    if arch.startswith("vit"):
        assert model.global_pool == "token" and model.cls_token is not None
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher(x), rtol=1e-6, atol=1e-6)


def test_simpool_export_has_no_timm_copy(tmp_path):
    write_training_checkpoint(tmp_path / "checkpoint.pth", "resnet18", "simpool", TINY_RESNET)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["timm"] is None
    assert not (out / TIMM_WEIGHTS_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# weights written by the reference code
# ----------------------------------------------------------------------------------------------------------
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_reference_checkpoint_export_keeps_reference_features(reference_dir, tmp_path):
    inputs, outputs = safe_load(reference_dir / "inputs.pt"), safe_load(reference_dir / "outputs.pt")
    checkpoint = reference_dir / "vit_simpool_dino_checkpoint.pth"
    # arch/mode/gamma/patch_size come from the reference's argparse.Namespace; only the tiny sizes are flags
    teacher_out = export_backbone(checkpoint, tmp_path / "teacher", **TINY_VIT)
    config = json.loads((teacher_out / "config.json").read_text())
    assert config["pos_embed_resampling"] == "reference" and config["source"]["reference_format"]
    assert (config["arch"], config["mode"], config["gamma"]) == ("vit_tiny", "simpool", 1.25)
    assert config["training"]["epochs"] == 100 and config["training"]["out_dim"] == 256

    model = load_backbone(teacher_out)
    assert model.pos_embed_resampling == "reference"
    with torch.no_grad():
        assert _relative_error(model(inputs["images224"]), outputs["vit_simpool_teacher_224"]) < 1e-5
        assert _relative_error(model(inputs["images96"]), outputs["vit_simpool_teacher_96"]) < 1e-5
        student_out = export_backbone(checkpoint, tmp_path / "student", which="student", **TINY_VIT)
        student = load_backbone(student_out)
        assert _relative_error(student(inputs["images224"]), outputs["vit_simpool_student_224"]) < 1e-5


def test_reference_backbone_only_file_needs_arch_and_mode(reference_dir, tmp_path):
    weights = reference_dir / "vit_official_backbone.pth"
    with pytest.raises(ValueError, match="pass --arch and --mode"):
        export_backbone(weights, tmp_path / "export", **TINY_VIT)
    with pytest.raises(ValueError, match="--mode"):
        export_backbone(weights, tmp_path / "export", arch="vit_tiny", **TINY_VIT)

    out = export_backbone(weights, tmp_path / "export", arch="vit_tiny", mode="official", **TINY_VIT)
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["which"] is None and config["training"] == {}
    inputs, outputs = safe_load(reference_dir / "inputs.pt"), safe_load(reference_dir / "outputs.pt")
    with torch.no_grad():
        assert _relative_error(load_backbone(out)(inputs["images224"]), outputs["vit_official_224"]) < 1e-5
        timm_model = timm.create_model(
            config["timm"]["model_name"], pretrained=True, num_classes=0,
            pretrained_cfg_overlay=dict(file=str(out / TIMM_WEIGHTS_FILE)), **config["timm"]["kwargs"],
        ).eval()
        # at 224 px the reference rule leaves an official ViT's position embeddings alone, as timm does
        assert _relative_error(timm_model(inputs["images224"]), outputs["vit_official_224"]) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# errors and the command line
# ----------------------------------------------------------------------------------------------------------
def test_load_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_backbone(tmp_path)
    write_training_checkpoint(tmp_path / "checkpoint.pth", "resnet18", "simpool", TINY_RESNET)
    out = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "export")
    weights = load_file(str(out / WEIGHTS_FILE))
    weights.pop("simpool.wq.weight")
    save_file(weights, str(out / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="missing keys: simpool.wq.weight"):
        load_backbone(out)
    with pytest.raises(ValueError, match="drop arch"):
        load_model(out, arch="resnet50")
    with pytest.raises(ValueError, match="export folder already"):
        export_backbone(out, tmp_path / "again")


def test_cli_errors_exit_2_with_the_fix(reference_dir, tmp_path, capsys):
    cli = load_cli("export_backbone")
    assert cli.main([str(reference_dir / "vit_official_backbone.pth"), str(tmp_path / "x")]) == 2
    assert "pass --arch and --mode" in capsys.readouterr().err


def test_cli_script_runs(tmp_path):
    write_training_checkpoint(tmp_path / "checkpoint.pth", "resnet18", "official", TINY_RESNET)
    result = subprocess.run(
        [sys.executable, str(REPO / "utils" / "export_backbone.py"), str(tmp_path / "checkpoint.pth"),
         str(tmp_path / "export"), "--which", "student"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "timm.create_model('resnet18'" in result.stdout
    written = {p.name for p in (tmp_path / "export").iterdir()}
    assert written == {"config.json", WEIGHTS_FILE, TIMM_WEIGHTS_FILE}
