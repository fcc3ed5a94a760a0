"""Position-embedding resampling (simpool.models.pos_embed): the written-out bicubic matrices equal PyTorch's kernel,
by hand at scale 1 and against F.interpolate elsewhere, and the traced branch of each rule equals the eager one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simpool.models.pos_embed import bicubic_matrix, resample_patch_pos_embed


def naive_bicubic(values: list[float], out_len: int, step: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution as a loop over outputs (the definition PyTorch's kernel follows)."""
    def weight(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    out = []
    for i in range(out_len):
        source = (i + 0.5) * step - 0.5
        start = int(torch.tensor(source).floor())
        out.append(sum(weight(source - j) * values[min(max(j, 0), len(values) - 1)]
                       for j in range(start - 1, start + 3)))
    return out


def test_step_one_is_the_identity_matrix():
    assert torch.allclose(bicubic_matrix(5, 5, 1.0), torch.eye(5), atol=1e-7)


def test_hand_computed_row():
    # output 0 of 2 from 4 inputs at step 2: source x = 0.5, taps -1..2 clamped to 0, 0, 1, 2,
    # weights far(1.5), near(0.5), near(0.5), far(1.5) with a = -0.75: -0.09375, 0.59375, 0.59375, -0.09375
    row = bicubic_matrix(2, 4, 2.0)[0]
    assert torch.allclose(row, torch.tensor([-0.09375 + 0.59375, 0.59375, -0.09375, 0.0]))
    assert torch.allclose(bicubic_matrix(7, 14, 14 / 7.1).sum(1), torch.ones(7))  # weights sum to one


@pytest.mark.parametrize("in_len, out_len", [(14, 14), (14, 10), (14, 6), (14, 28), (5, 9), (14, 1)])
def test_matrix_equals_pytorch_bicubic_and_the_naive_loop(in_len, out_len):
    values = torch.randn(in_len, dtype=torch.float64)
    scale = (out_len + 0.1) / in_len  # the reference's scale_factor
    expected = F.interpolate(values.view(1, 1, 1, -1), scale_factor=(1.0, scale), mode="bicubic",
                             align_corners=False).view(-1)
    got = bicubic_matrix(out_len, in_len, 1 / scale).double() @ values
    assert got.shape == expected.shape == (out_len,)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got, torch.tensor(naive_bicubic(values.tolist(), out_len, 1 / scale),
                                            dtype=torch.float64), atol=1e-5)


class PosEmbedOnly(torch.nn.Module):
    def __init__(self, rule: str, official: bool) -> None:
        super().__init__()
        self.pe = torch.nn.Parameter(torch.randn(1, 14 * 14, 8))
        self.rule, self.official = rule, official

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resample_patch_pos_embed(self.pe, x.shape[-2], x.shape[-1], self.rule, self.official)


@pytest.mark.parametrize("rule, official", [("reference", False), ("reference", True), ("exact", False)])
def test_traced_rule_follows_the_input_size_and_equals_eager(rule, official):
    module = PosEmbedOnly(rule, official)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(module, torch.zeros(1, 14, 14))  # traced at the embeddings' own grid
    for grid in [(14, 14), (10, 15), (6, 6), (20, 9)]:
        x = torch.zeros(1, *grid)
        with torch.no_grad():
            eager, graph = module(x), traced(x)
        assert graph.shape == eager.shape == (1, grid[0] * grid[1], 8)
        assert torch.allclose(graph, eager, atol=1e-5), grid
    # and the rules differ where they should: the reference moves the samples even at the trained grid
    same = torch.zeros(1, 14, 14)
    assert torch.equal(module(same), module.pe) == (rule == "exact" or official)
