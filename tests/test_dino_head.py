"""DINOHead (layout, init, weight norm, reference state dicts) and MultiCropWrapper (crop grouping)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simpool.dino.head import DINOHead, MultiCropWrapper

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"
FIXTURE = FIXTURES / "vit_simpool_dino_checkpoint.pth"


class ReferenceLayoutHead(nn.Module):
    """The reference head's module layout, built with torch's hook-based weight_norm (for comparison)."""

    def __init__(self, in_dim, out_dim, use_bn, hidden_dim, bottleneck_dim):
        super().__init__()
        bn = (lambda d: [nn.BatchNorm1d(d)]) if use_bn else (lambda d: [])
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), *bn(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), *bn(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:  # reference order: init the MLP, then create the last layer
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def test_output_shape_and_unit_prototypes():
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 40)
    # Unit-norm input times unit-norm prototype rows: every logit is a cosine.
    assert out.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))


def test_weight_g_is_one_and_frozen_only_with_norm_last_layer():
    frozen = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4)
    free = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    for head in (frozen, free):
        assert head.last_layer.weight_g.shape == (16, 1)
        assert torch.equal(head.last_layer.weight_g, torch.ones(16, 1))
    assert not frozen.last_layer.weight_g.requires_grad
    assert free.last_layer.weight_g.requires_grad

    free(torch.randn(3, 8)).square().sum().backward()
    assert free.last_layer.weight_g.grad is not None and free.last_layer.weight_v.grad is not None
    # With g trainable the prototype norms follow g.
    with torch.no_grad():
        free.last_layer.weight_g.mul_(3.0)
    torch.testing.assert_close(free.last_layer.weight.norm(dim=1), torch.full((16,), 3.0))


def test_init_is_truncated_normal_with_zero_bias():
    torch.manual_seed(0)
    head = DINOHead(256, 8, hidden_dim=256, bottleneck_dim=64)
    w = head.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(head.mlp[0].bias) == 0 and torch.count_nonzero(head.mlp[4].bias) == 0


@pytest.mark.parametrize("use_bn", [False, True])
def test_reference_layout_state_dicts_load_both_ways(use_bn):
    torch.manual_seed(1)
    ref = ReferenceLayoutHead(10, 20, use_bn, hidden_dim=12, bottleneck_dim=6)
    torch.manual_seed(1)
    ours = DINOHead(10, 20, use_bn=use_bn, hidden_dim=12, bottleneck_dim=6)
    assert list(ours.state_dict()) == list(ref.state_dict())
    if use_bn:
        assert "mlp.1.running_mean" in ours.state_dict() and "mlp.6.weight" in ours.state_dict()

    # Perturb the reference so that loading really transfers values, g included.
    with torch.no_grad():
        for t in ref.parameters():
            t.add_(torch.randn_like(t) * 0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), ref(x))

    back = ReferenceLayoutHead(10, 20, use_bn, hidden_dim=12, bottleneck_dim=6).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back(x), ref(x))


def test_same_seed_builds_the_reference_parameters():
    torch.manual_seed(7)
    ref = ReferenceLayoutHead(10, 20, False, hidden_dim=12, bottleneck_dim=6)
    with torch.no_grad():
        ref.last_layer.weight_g.fill_(1.0)
    torch.manual_seed(7)
    ours = DINOHead(10, 20, hidden_dim=12, bottleneck_dim=6)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_single_layer_mlp_keys():
    head = DINOHead(8, 16, nlayers=1, bottleneck_dim=4)
    assert list(head.state_dict()) == ["mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"]
    assert head(torch.randn(2, 8)).shape == (2, 16)


@pytest.mark.skipif(not FIXTURE.exists(), reason="reference fixtures not available")
def test_reference_checkpoint_head_loads_strict():
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load(FIXTURE, weights_only=True, map_location="cpu")
    state = {k[len("head."):]: v for k, v in ckpt["teacher"].items() if k.startswith("head.")}
    head = DINOHead(192, 256, norm_last_layer=ckpt["args"].norm_last_layer, hidden_dim=64, bottleneck_dim=32)
    head.load_state_dict(state, strict=True)
    assert list(head.state_dict()) == list(state)  # same order: reference optimizer states line up
    v = state["last_layer.weight_v"]
    expected_weight = state["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.last_layer.weight, expected_weight)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(8, 0)


class RecordingBackbone(nn.Module):
    """Mean-pools pixels and projects, recording every input shape it sees."""

    def __init__(self, dim=6, as_tuple=False):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.as_tuple = as_tuple
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        out = self.proj(x.mean(dim=(2, 3)) + x.shape[-1])  # depends on resolution, so order mistakes show
        return (out, "extra") if self.as_tuple else out


class RecordingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2


def test_multicrop_runs_backbone_once_per_resolution_group_in_crop_order():
    backbone, head = RecordingBackbone(), RecordingHead()
    model = MultiCropWrapper(backbone, head)
    batch = 3
    crops = [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    crops += [torch.randn(batch, 3, 8, 8) for _ in range(4)]
    out = model(crops)
    assert backbone.seen == [(2 * batch, 3, 16, 16), (4 * batch, 3, 8, 8)]
    assert head.calls == 1
    expected = torch.cat([2 * backbone.proj(c.mean(dim=(2, 3)) + c.shape[-1]) for c in crops])
    assert out.shape == (6 * batch, 6)
    torch.testing.assert_close(out, expected)


def test_multicrop_only_groups_consecutive_crops_and_accepts_tensors_and_tuples():
    backbone = RecordingBackbone(as_tuple=True)
    model = MultiCropWrapper(backbone, RecordingHead())
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)]
    out = model(crops)
    assert backbone.seen == [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 16, 16)]
    assert out.shape == (6, 6)

    backbone.seen.clear()
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 6)
    assert backbone.seen == [(4, 3, 8, 8)]
    # Non-square crops with the same width but different heights must not be concatenated.
    backbone.seen.clear()
    model([torch.randn(1, 3, 8, 16), torch.randn(1, 3, 16, 16)])
    assert backbone.seen == [(1, 3, 8, 16), (1, 3, 16, 16)]
    with pytest.raises(ValueError, match="no crops"):
        model([])


def test_multicrop_with_dino_head_state_dict_keys():
    model = MultiCropWrapper(RecordingBackbone(), DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4))
    keys = set(model.state_dict())
    assert {"backbone.proj.weight", "head.mlp.0.weight", "head.last_layer.weight_g"} <= keys
    out = model([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)])
    assert out.shape == (4, 10)
