"""SimPool: shapes, attention, batch independence, numerics, errors, reference defects fixed."""

from __future__ import annotations

import pytest
import torch

from simpool import SimPool


def naive_simpool(pool: SimPool, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula for one sample, written with loops over heads (float64)."""
    tokens = x.flatten(1).T if x.ndim == 3 else x  # (N, d) for one sample
    tokens = tokens.double()
    d = tokens.shape[-1]
    h = pool.num_heads
    dh = d // h
    ln = torch.nn.functional.layer_norm(
        tokens, (d,), pool.norm_patches.weight.double(), pool.norm_patches.bias.double(), 1e-6
    )
    q = tokens.mean(0) @ pool.wq.weight.double().T
    k = ln @ pool.wk.weight.double().T
    out = []
    vmin = ln.min()
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        a = torch.softmax(k[:, sl] @ q[sl] * dh**-0.5, dim=0)
        v = ln[:, sl]
        if pool.gamma is None:
            out.append(a @ v)
        else:
            out.append((a @ (v - vmin + 1e-6) ** pool.gamma) ** (1 / pool.gamma))
    result = torch.cat(out)
    if pool.beta is not None:
        result = result + pool.beta.double()
    return result


@pytest.mark.parametrize("gamma", [None, 1.25, 2.0])
@pytest.mark.parametrize("heads", [1, 4])
def test_matches_formula_tokens_and_maps(gamma, heads):
    pool = SimPool(16, num_heads=heads, gamma=gamma, use_beta=gamma is not None)
    with torch.no_grad():
        pool.norm_patches.weight.normal_()
        pool.norm_patches.bias.normal_()
        if pool.beta is not None:
            pool.beta.fill_(0.3)
    tokens = torch.randn(3, 10, 16)
    out = pool(tokens)
    assert out.shape == (3, 16)
    for i in range(3):
        torch.testing.assert_close(out[i].double(), naive_simpool(pool, tokens[i]), rtol=1e-5, atol=1e-5)
    fmap = tokens.transpose(1, 2).reshape(3, 16, 2, 5)  # the same tokens as a (B, d, H, W) map
    torch.testing.assert_close(pool(fmap), out)


def test_batch_of_one_keeps_batch_dim():
    pool = SimPool(8, gamma=2.0)
    assert pool(torch.randn(1, 5, 8)).shape == (1, 8)
    assert SimPool(8)(torch.randn(1, 8, 3, 3)).shape == (1, 8)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_shape_and_sums_to_one(heads):
    pool = SimPool(8, num_heads=heads, gamma=1.25)
    pooled, attn = pool(torch.randn(4, 8, 3, 5), return_attention=True)
    assert pooled.shape == (4, 8)
    assert attn.shape == (4, heads, 15)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, heads))
    assert (attn >= 0).all()


@pytest.mark.parametrize("gamma", [1.25, 2.0, None])
def test_output_independent_of_other_samples(gamma):
    """Reference defect 1: the batch-global min let an outlier in one image move every other image."""
    pool = SimPool(32, gamma=gamma)
    x = torch.randn(4, 20, 32)
    alone = pool(x[:1])
    x_outlier = x.clone()
    x_outlier[3, 7] = 500.0
    torch.testing.assert_close(pool(x_outlier)[:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool(x)[:1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.25, 2.0, 3.0])
def test_gamma_finite_on_large_inputs_with_grad(gamma):
    pool = SimPool(24, num_heads=2, gamma=gamma, use_beta=True)
    with torch.no_grad():
        pool.norm_patches.weight.mul_(50.0)  # values far from LayerNorm's unit scale
    x = (torch.rand(3, 16, 24) * 2 - 1) * 1e3
    x.requires_grad_(True)
    out = pool(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gamma_branch_runs_in_float32_under_autocast(dtype):
    pool = SimPool(16, gamma=3.0)
    x = torch.randn(2, 9, 16) * 100
    reference = pool(x)
    with torch.autocast("cpu", dtype=dtype):
        mixed = pool(x)
    assert mixed.dtype == torch.float32
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, reference, rtol=5e-2, atol=5e-2)


def test_no_hard_coded_device_and_moves_with_to():
    pool = SimPool(8, gamma=1.25, use_beta=True).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in pool.parameters())
    assert pool(torch.randn(2, 4, 8, dtype=torch.float64)).dtype == torch.float64
    names = {n for n, _ in pool.named_parameters()}
    assert names == {"wq.weight", "wk.weight", "norm_patches.weight", "norm_patches.bias", "beta"}


def test_beta_only_with_gamma():
    assert SimPool(8, gamma=None, use_beta=True).beta is None
    assert SimPool(8, gamma=2.0, use_beta=False).beta is None


def test_bad_shapes_raise_value_error_naming_shapes():
    pool = SimPool(8)
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        pool(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(B, N, 8\).*\(2, 5, 6\)"):
        pool(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\).*\(2, 6, 3, 3\)"):
        pool(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="divisible"):
        SimPool(10, num_heads=3)
