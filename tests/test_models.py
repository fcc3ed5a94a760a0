"""Backbones: every family and mode, input sizes, attention maps, errors; loading and its errors."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from simpool import CheckpointError, build_backbone, load_pretrained
from simpool.checkpoint import FORMAT_KEY, atomic_save
from simpool.models import ARCHS, arch_family, default_gamma
from tests.helpers import TINY_CONVNEXT, TINY_RESNET, TINY_VIT

TINY = {"vit_tiny": TINY_VIT, "resnet18": TINY_RESNET, "convnext_tiny": TINY_CONVNEXT}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_forward_shapes(arch, mode):
    model = build_backbone(arch, mode=mode, **TINY[arch]).eval()
    for size in (96, 64):
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, model.embed_dim)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, model.embed_dim)


def test_gamma_defaults_and_none():
    assert build_backbone("vit_tiny", **TINY_VIT).gamma == 1.25
    assert build_backbone("resnet18", **TINY_RESNET).gamma == 2.0
    assert build_backbone("convnext_tiny", **TINY_CONVNEXT).gamma == 2.0
    assert build_backbone("resnet18", gamma=None, **TINY_RESNET).simpool.gamma is None
    vit = build_backbone("vit_tiny", **TINY_VIT)
    assert vit.simpool.beta is not None, "the self-supervised ViT's SimPool has a learnable beta"
    assert build_backbone("resnet18", **TINY_RESNET).simpool.beta is None


def test_vit_simpool_has_no_cls_token_and_official_has_one():
    simpool_vit = build_backbone("vit_tiny", mode="simpool", **TINY_VIT)
    official = build_backbone("vit_tiny", mode="official", **TINY_VIT)
    assert simpool_vit.cls_token is None and simpool_vit.pos_embed.shape[1] == 196
    assert official.cls_token is not None and official.pos_embed.shape[1] == 197
    assert build_backbone("vit_tiny", patch_size=8, **TINY_VIT).pos_embed.shape[1] == 784


def test_vit_simpool_norm_applies_to_pooled_vector():
    model = build_backbone("vit_tiny", **TINY_VIT).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.norm(model.simpool(model.forward_tokens(x)))
        torch.testing.assert_close(model(x), expected)


def test_exact_rule_keeps_pos_embed_at_native_grid():
    model = build_backbone("vit_tiny", **TINY_VIT)
    assert torch.equal(model.patch_pos_embed(14, 14), model.pos_embed)
    assert model.patch_pos_embed(6, 6).shape == (1, 36, 192)


@pytest.mark.parametrize("grid", [(6, 6), (7, 5), (20, 20), (14, 14)])
def test_exact_rule_is_plain_bicubic_to_the_new_grid(grid):
    model = build_backbone("vit_tiny", **TINY_VIT)
    with torch.no_grad():
        model.pos_embed.normal_()
        patch_pe = model.pos_embed.reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        expected = F.interpolate(patch_pe, size=grid, mode="bicubic", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        assert torch.equal(model.patch_pos_embed(*grid), expected)


@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_last_block_outputs_are_normalised_block_outputs(mode):
    model = build_backbone("vit_tiny", mode=mode, **{**TINY_VIT, "depth": 3}).eval()
    x = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        tokens, naive = model.prepare_tokens(x), []
        for block in model.blocks:
            tokens = block(tokens)
            naive.append(model.norm(tokens))
        for n in (1, 2, 3):
            outputs = model.last_block_outputs(x, n)
            assert len(outputs) == n
            assert all(torch.equal(out, ref) for out, ref in zip(outputs, naive[-n:]))
    with pytest.raises(ValueError, match="n_last_blocks=4 is out of range: this ViT has 3 blocks"):
        model.last_block_outputs(x, 4)


def test_archs_are_named_records():
    assert ARCHS["vit_small"].default_gamma == 1.25 and ARCHS["vit_small"].kwargs["embed_dim"] == 384
    assert ARCHS["resnet50"].name == "resnet50" and ARCHS["resnet50"].family == "resnet"
    assert {name: default_gamma(name) for name in ("vit_base", "resnet18", "convnext_tiny", "resnet10t")} == {
        "vit_base": 1.25, "resnet18": 2.0, "convnext_tiny": 2.0, "resnet10t": None}
    assert [arch_family(name) for name in ("vit_tiny", "resnet34", "convnext_base", "resnet10t")] == [
        "vit", "resnet", "convnext", "timm"]
    with pytest.raises(ValueError, match="unknown arch 'vit_gigantic_typo'"):
        arch_family("vit_gigantic_typo")
    with pytest.raises(TypeError):
        ARCHS["vit_small"].kwargs["depth"] = 2  # a record is read-only: overrides go through build_backbone


@pytest.mark.parametrize("arch", sorted(TINY))
def test_simpool_parameter_names_match_the_reference(arch):
    keys = set(build_backbone(arch, **TINY[arch]).state_dict())
    expected = {"simpool.wq.weight", "simpool.wk.weight", "simpool.norm_patches.weight", "simpool.norm_patches.bias"}
    assert expected <= keys and ("simpool.beta" in keys) == (arch == "vit_tiny")
    official = build_backbone(arch, mode="official", **TINY[arch])
    assert not any(key.startswith("simpool.") for key in official.state_dict())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_attention_map_simpool(arch):
    model = build_backbone(arch, mode="simpool", **TINY[arch]).eval()
    maps = model.attention_map(torch.randn(2, 3, 96, 96))
    assert maps.ndim == 4 and maps.shape[:2] == (2, 1)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 1))


def test_attention_map_official_vit_is_cls_attention_per_head():
    model = build_backbone("vit_tiny", mode="official", **TINY_VIT).eval()
    maps = model.attention_map(torch.randn(2, 3, 96, 96))
    assert maps.shape == (2, 3, 6, 6)
    assert (maps.sum((-2, -1)) < 1).all()  # the [CLS] token's attention to itself is excluded


def test_overrides_reach_timm():
    model = build_backbone("vit_small", depth=2, drop_path_rate=0.1)
    assert len(model.blocks) == 2 and model.embed_dim == 384
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # linear decay rule: last block gets it all
    assert len(build_backbone("resnet50", layers=(1, 1, 1, 1)).layer1) == 1


def test_any_timm_model():
    model = build_backbone("resnet10t", mode="simpool").eval()
    assert model.gamma == 2.0
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.embed_dim)
    official = build_backbone("resnet10t", mode="official").eval()
    assert official(torch.randn(1, 3, 64, 64)).shape == (1, official.embed_dim)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_config_rebuilds_the_same_architecture(arch, mode):
    model = build_backbone(arch, mode=mode, **TINY[arch])
    rebuilt = build_backbone(**model.config())
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert rebuilt.gamma == model.gamma


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError) as err:
        build_backbone("vit_gigantic_typo")
    for name in ARCHS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="mode"):
        build_backbone("vit_tiny", mode="cls")


def _save(tmp_path, state, **extra):
    path = tmp_path / "ckpt.pth"
    atomic_save({"teacher": state, **extra}, path)
    return path


def test_own_format_round_trip_keeps_exact_rule(tmp_path):
    source = build_backbone("vit_tiny", **TINY_VIT).eval()
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["head.last_layer.weight_v"] = torch.zeros(4, 4)  # DINO head entries are ignored on purpose
    path = _save(tmp_path, state, **{FORMAT_KEY: 1})
    target = build_backbone("vit_tiny", **TINY_VIT).eval()
    info = load_pretrained(target, path)
    assert not info.reference_format and target.pos_embed_resampling == "exact"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


def test_mode_mismatch_lists_keys_and_hints(tmp_path):
    official = build_backbone("vit_tiny", mode="official", **TINY_VIT)
    path = _save(tmp_path, {f"backbone.{k}": v for k, v in official.state_dict().items()})
    with pytest.raises(CheckpointError) as err:
        load_pretrained(build_backbone("vit_tiny", mode="simpool", **TINY_VIT), path)
    message = str(err.value)
    assert "unexpected keys: cls_token" in message and "simpool.wq.weight" in message
    assert "use --mode official" in message


def test_missing_key_and_shape_errors(tmp_path):
    model = build_backbone("resnet18", **TINY_RESNET)
    state = model.state_dict()
    del state["simpool.wq.weight"]
    state["bn1.weight"] = torch.ones(3)
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing keys: simpool.wq.weight(.|\n)*wrong shapes: bn1.weight"):
        load_pretrained(build_backbone("resnet18", **TINY_RESNET), path)


def test_missing_checkpoint_key_and_file(tmp_path):
    path = _save(tmp_path, {"a": torch.zeros(1)}, student={"b": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="--checkpoint_key"):
        load_pretrained(build_backbone("resnet18", **TINY_RESNET), path, checkpoint_key="nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(build_backbone("resnet18", **TINY_RESNET), tmp_path / "absent.pth")


def test_gamma_conflict_with_recorded_args_warns(tmp_path):
    model = build_backbone("vit_tiny", gamma=2.0, **TINY_VIT)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    path = _save(tmp_path, state, args=argparse.Namespace(gamma=1.25, arch="vit_tiny"))
    with pytest.warns(UserWarning, match="gamma=1.25"):
        load_pretrained(build_backbone("vit_tiny", gamma=2.0, **TINY_VIT), path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": torch.zeros(1)}, "obj": object.__new__(argparse.ArgumentParser)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pretrained(build_backbone("resnet18", **TINY_RESNET), path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"v": torch.ones(1)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
