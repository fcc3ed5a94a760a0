"""load_model: one function from weights + flags to a backbone (checkpoint, backbone-only file, export, random)."""

from __future__ import annotations

import argparse

import pytest
import torch

from simpool.checkpoint import CheckpointError
from simpool.export import export_backbone
from simpool.loading import FROM_CHECKPOINT, load_model
from simpool.models import build_backbone
from simpool.run.flags import add_backbone_flags, backbone_flags
from tests.helpers import TINY_VIT, write_training_checkpoint

X = torch.randn(1, 3, 224, 224)  # the size at which the reference position-embedding rule changes nothing


def same_features(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a(X), b(X))


def test_training_checkpoint_as_recorded_and_with_flags(tmp_path):
    teacher, student = write_training_checkpoint(tmp_path / "c.pth", "vit_tiny", "simpool", TINY_VIT)
    model, source = load_model(tmp_path / "c.pth")
    assert not model.training and same_features(model, teacher)
    assert source.as_dict() == {"weights": str(tmp_path / "c.pth"), "checkpoint_key": "teacher",
                                "arch": "vit_tiny", "mode": "simpool", "gamma": 1.25, "epoch": 3}
    assert source.checkpoint.args["epochs"] == 100 and not source.checkpoint.reference_format
    model, source = load_model(tmp_path / "c.pth", "student")
    assert same_features(model, student) and source.checkpoint_key == "student"
    with pytest.raises(CheckpointError, match="use --mode simpool"):  # a flag beats the recorded mode
        load_model(tmp_path / "c.pth", mode="official")
    with pytest.raises(ValueError, match="checkpoint_key must be 'teacher' or 'student'"):
        load_model(tmp_path / "c.pth", "ema")


def test_backbone_only_file_needs_arch_and_mode(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", mode="official", **TINY_VIT).eval()
    torch.save(backbone.state_dict(), tmp_path / "b.pth")
    with pytest.raises(ValueError, match="pass --arch and --mode"):
        load_model(tmp_path / "b.pth", **TINY_VIT)
    with pytest.raises(ValueError, match="pass --mode simpool or --mode official"):
        load_model(tmp_path / "b.pth", arch="vit_tiny", **TINY_VIT)
    model, source = load_model(tmp_path / "b.pth", arch="vit_tiny", mode="official", **TINY_VIT)
    assert same_features(model, backbone) and source.checkpoint.reference_format  # a file without our format key
    assert source.checkpoint_key is None and source.epoch is None


def test_export_folder_fixes_the_model_and_refuses_model_flags(tmp_path):
    teacher, _ = write_training_checkpoint(tmp_path / "c.pth", "vit_tiny", "simpool", TINY_VIT)
    out = export_backbone(tmp_path / "c.pth", tmp_path / "export")
    model, source = load_model(out)
    assert same_features(model, teacher)
    assert (source.weights, source.checkpoint_key, source.epoch, source.gamma) == (str(out), None, None, 1.25)
    with pytest.raises(ValueError, match="fixes the model: drop arch, gamma, depth"):
        load_model(out, arch="vit_tiny", gamma=None, depth=2)


def test_random_init_defaults_and_flags():
    model, source = load_model(random_init=True, depth=1)
    assert (model.arch, model.mode, model.gamma, model.embed_dim) == ("vit_small", "simpool", 1.25, 384)
    assert source.as_dict()["weights"] is None and source.checkpoint is None
    model, _ = load_model(random_init=True, arch="resnet18", mode="official", gamma=None, layers=(1, 1, 1, 1))
    assert (model.arch, model.mode, model.gamma) == ("resnet18", "official", None)
    with pytest.raises(ValueError, match="random_init"):
        load_model("c.pth", random_init=True)
    with pytest.raises(ValueError, match="no weights given"):
        load_model()


def test_backbone_flags_are_load_model_keywords():
    parser = argparse.ArgumentParser()
    add_backbone_flags(parser)
    assert backbone_flags(parser.parse_args([])) == {"arch": None, "mode": None, "gamma": FROM_CHECKPOINT,
                                                     "patch_size": None}
    args = parser.parse_args(["--gamma", "None", "--patch_size", "8", "--model_overrides", "depth=1", "embed_dim=32"])
    assert backbone_flags(args) == {"arch": None, "mode": None, "gamma": None, "patch_size": 8, "depth": 1,
                                    "embed_dim": 32}


def test_random_init_is_the_same_network_in_every_process():
    """torch's start seed differs per process: random_init seeds its own draw (and leaves the global RNG alone)."""
    torch.manual_seed(torch.seed())  # any global state, as a fresh process has
    before = torch.get_rng_state()
    a, _ = load_model(random_init=True, depth=1)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(torch.seed())
    b, _ = load_model(random_init=True, depth=1)
    c, _ = load_model(random_init=True, depth=1, seed=1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_arch_of_another_family_than_the_run_is_named_not_a_type_error(tmp_path):
    write_training_checkpoint(tmp_path / "c.pth", "vit_tiny", "simpool", {**TINY_VIT, "depth": 1})
    with pytest.raises(ValueError, match=r"are a vit_tiny \(simpool mode.*--arch resnet18 does not fit them"):
        load_model(tmp_path / "c.pth", arch="resnet18")
    write_training_checkpoint(tmp_path / "r.pth", "resnet18", "simpool", {"layers": (1, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"are a resnet18 \(simpool mode.*--arch convnext_tiny does not fit"):
        load_model(tmp_path / "r.pth", arch="convnext_tiny")


def test_model_overrides_an_arch_does_not_take_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"cannot build resnet18 .*depth \(--model_overrides\)"):
        load_model(random_init=True, arch="resnet18", mode="simpool", depth=2)
