"""Input normalisation (Gao et al. 2024 sec. 2.1): layer_norm / scalar / none, and exact inverses."""

import math

import numpy as np
import pytest
import torch

from sae_dist.store import denormalize, normalize, scalar_scale


def _layer_norm_ref(x: np.ndarray) -> np.ndarray:
    """Naive float64 reference: per row, subtract the mean, divide by the L2 norm, times sqrt(d)."""
    out = np.empty_like(x, dtype=np.float64)
    d = x.shape[1]
    for i, row in enumerate(x.astype(np.float64)):
        c = row - row.sum() / d
        out[i] = c / math.sqrt((c * c).sum()) * math.sqrt(d)
    return out


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_layer_norm_matches_reference_and_inverts(kind):
    rng = np.random.default_rng(np.random.randint(2**31))
    x = (rng.standard_normal((64, 48)) * rng.uniform(0.1, 50, (64, 1)) + rng.normal(0, 5, (64, 1))).astype(np.float32)
    inp = torch.from_numpy(x) if kind == "torch" else x
    xn, ctx = normalize(inp, "layer_norm")
    assert type(xn) is type(inp) and xn.dtype == inp.dtype and tuple(xn.shape) == x.shape
    xn_np = xn.numpy() if kind == "torch" else xn
    np.testing.assert_allclose(xn_np, _layer_norm_ref(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(xn_np, axis=1), math.sqrt(48), rtol=1e-5)
    back = denormalize(xn, "layer_norm", ctx)
    back = back.numpy() if kind == "torch" else back
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-4 * np.abs(x).max())


def test_layer_norm_zero_and_constant_rows_are_finite():
    x = torch.zeros(3, 16)
    x[1] = 7.0  # constant row: zero after mean subtraction
    x[2] = torch.randn(16)
    xn, ctx = normalize(x, "layer_norm")
    assert torch.isfinite(xn).all()
    assert torch.equal(xn[:2], torch.zeros(2, 16))
    torch.testing.assert_close(denormalize(xn, "layer_norm", ctx), x)


def test_layer_norm_half_precision_input():
    x = torch.randn(8, 32).to(torch.bfloat16)
    xn, ctx = normalize(x, "layer_norm")
    assert xn.dtype == torch.bfloat16
    ref = torch.from_numpy(_layer_norm_ref(x.float().numpy())).to(torch.bfloat16)
    torch.testing.assert_close(xn, ref, rtol=1e-2, atol=1e-2)


def test_scalar_mode():
    rng = np.random.default_rng(np.random.randint(2**31))
    data = rng.standard_normal((1000, 20)) * 4
    norms = np.linalg.norm(data, axis=1)
    stats = {"mean_norm": float(norms.mean()), "mean_sq_norm": float((norms ** 2).mean()), "n": 1000}
    s = scalar_scale(stats, 20)
    assert s == pytest.approx(math.sqrt(20) / norms.mean(), rel=1e-12)
    x = torch.from_numpy(data).float()
    xn, ctx = normalize(x, "scalar", s)
    torch.testing.assert_close(xn, x * s)
    assert float(xn.norm(dim=1).double().mean()) == pytest.approx(math.sqrt(20), rel=1e-5)
    torch.testing.assert_close(denormalize(xn, "scalar", ctx), x)
    with pytest.raises(ValueError, match="scale"):
        normalize(x, "scalar")
    with pytest.raises(ValueError, match="mean_norm"):
        scalar_scale({"n": 3}, 20)
    with pytest.raises(ValueError, match="> 0"):
        scalar_scale({"mean_norm": 0.0}, 20)


def test_none_and_unknown_mode():
    x = torch.randn(4, 8)
    xn, ctx = normalize(x, "none")
    assert xn is x and denormalize(xn, "none", ctx) is x
    with pytest.raises(ValueError) as e:
        normalize(x, "layernorm")
    for m in ("layer_norm", "scalar", "none"):
        assert m in str(e.value)
    with pytest.raises(ValueError, match="layer_norm"):
        denormalize(x, "rms", {})
