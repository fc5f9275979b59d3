"""ReconstructionStats / LatentFiringCounter against direct numpy float64 computations."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from sae_dist.eval.metrics import LatentFiringCounter, ReconstructionStats


def _numpy_reference(x: np.ndarray, x_hat: np.ndarray, l0: np.ndarray) -> dict:
    x = x.astype(np.float64)
    x_hat = x_hat.astype(np.float64)
    err = ((x - x_hat) ** 2).sum()
    var = ((x - x.mean(axis=0, keepdims=True)) ** 2).sum()
    return {
        "fvu": err / var,
        "explained_variance": 1 - err / var,
        "mse": ((x - x_hat) ** 2).mean(),
        "normalized_mse": ((x - x_hat) ** 2).mean() / ((x - x.mean(axis=0)) ** 2).mean(),
        "l0": l0.astype(np.float64).mean(),
    }


def _data(rng, n=1000, d=24, offset=40.0):
    # a large common offset (like the residual stream's) to exercise the stable variance update
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + offset
    x_hat = x + rng.normal(scale=0.7, size=(n, d))
    l0 = rng.integers(0, 33, size=n)
    return x.astype(np.float32), x_hat.astype(np.float32), l0


def test_matches_numpy_on_uneven_batches():
    rng = np.random.default_rng(np.random.randint(2**31))
    x, x_hat, l0 = _data(rng)
    cuts = [0, 1, 8, 311, 313, 700, 1000]  # uneven batches, including a batch of one token
    stats = ReconstructionStats()
    for a, b in pairwise(cuts):
        stats.update(torch.from_numpy(x[a:b]), torch.from_numpy(x_hat[a:b]), l0=torch.from_numpy(l0[a:b]))
    got = stats.result()
    ref = _numpy_reference(x, x_hat, l0)
    for key in ("fvu", "explained_variance", "mse", "normalized_mse", "l0"):
        assert got[key] == pytest.approx(ref[key], rel=1e-10), key
    assert got["normalized_mse"] == pytest.approx(got["fvu"], rel=1e-12)
    assert got["n_tokens"] == 1000 and got["d_in"] == 24
    assert 0 < got["fvu"] < 1


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(np.random.randint(2**31))
    x, x_hat, l0 = _data(rng, n=517, d=9)
    t = [torch.from_numpy(a) for a in (x, x_hat)]
    one = ReconstructionStats()
    one.update(t[0], t[1], l0=torch.from_numpy(l0))
    a, b = ReconstructionStats(), ReconstructionStats()
    a.update(t[0][:100], t[1][:100], l0=torch.from_numpy(l0[:100]))
    b.update(t[0][100:300], t[1][100:300], l0=torch.from_numpy(l0[100:300]))
    b.update(t[0][300:], t[1][300:], l0=torch.from_numpy(l0[300:]))
    a.merge(b)
    ra, r1 = a.result(), one.result()
    for key in ("fvu", "mse", "l0", "variance_per_token"):
        assert ra[key] == pytest.approx(r1[key], rel=1e-12), key
    assert ra["n_tokens"] == r1["n_tokens"] == 517
    # the state-dict round trip (the distributed path) keeps everything
    c = ReconstructionStats.from_state_dict(a.state_dict())
    assert c.result()["fvu"] == pytest.approx(ra["fvu"], rel=1e-15)


def test_closed_forms_mean_and_identity():
    rng = np.random.default_rng(np.random.randint(2**31))
    x = torch.from_numpy(rng.normal(loc=3.0, size=(300, 16)))
    mean = x.mean(0, keepdim=True).expand_as(x)
    s_mean, s_id = ReconstructionStats(), ReconstructionStats()
    for sl in (slice(0, 17), slice(17, 300)):
        s_mean.update(x[sl], mean[sl])
        s_id.update(x[sl], x[sl])
    assert s_mean.result()["fvu"] == pytest.approx(1.0, abs=1e-12)
    assert s_mean.result()["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert s_id.result()["fvu"] == 0.0
    assert s_id.result()["l0"] is None  # no latents given


def test_l0_from_dense_latents_and_firing_counts():
    rng = np.random.default_rng(np.random.randint(2**31))
    n, d_sae, k = 200, 50, 5
    idx = np.stack([rng.choice(d_sae, size=k, replace=False) for _ in range(n)])
    vals = rng.uniform(0.1, 2.0, size=(n, k))
    vals[rng.random((n, k)) < 0.2] = 0.0  # some kept values are ReLU-zeroed: they do not fire
    z = np.zeros((n, d_sae))
    np.put_along_axis(z, idx, vals, axis=1)
    z[:, :3] = 0.0  # three latents never fire
    keep = np.take_along_axis(z, idx, axis=1)  # values consistent with z after zeroing latents 0..2

    stats = ReconstructionStats()
    x = torch.from_numpy(rng.normal(size=(n, 4)))
    stats.update(x[:77], x[:77] * 0.5, l0=torch.from_numpy(z[:77]))
    stats.update(x[77:], x[77:] * 0.5, l0=torch.from_numpy(z[77:]))
    assert stats.result()["l0"] == pytest.approx((z != 0).sum(1).mean(), rel=1e-12)

    ref_counts = (z != 0).sum(0)
    dense, sparse_a, sparse_b = LatentFiringCounter(d_sae), LatentFiringCounter(d_sae), LatentFiringCounter(d_sae)
    dense.update_dense(torch.from_numpy(z))
    sparse_a.update_sparse(torch.from_numpy(keep[:120]), torch.from_numpy(idx[:120]))
    sparse_b.update_sparse(torch.from_numpy(keep[120:]), torch.from_numpy(idx[120:]))
    sparse_a.merge(sparse_b)
    np.testing.assert_array_equal(dense.counts.numpy(), ref_counts)
    np.testing.assert_array_equal(sparse_a.counts.numpy(), ref_counts)
    assert sparse_a.n_tokens == n
    assert sparse_a.dead_fraction() == pytest.approx((ref_counts == 0).mean())
    np.testing.assert_allclose(sparse_a.density(), ref_counts / n)
    hist, edges, n_dead = sparse_a.log10_density_histogram(bins=10)
    assert n_dead == (ref_counts == 0).sum() and hist.sum() == (ref_counts > 0).sum()


def test_bad_inputs_raise():
    s = ReconstructionStats()
    with pytest.raises(ValueError, match="x_hat has shape"):
        s.update(torch.zeros(4, 3), torch.zeros(4, 2))
    s.update(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="d_in=3"):
        s.update(torch.zeros(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionStats().result()
    with pytest.raises(ValueError, match="out of range"):
        LatentFiringCounter(4).update_sparse(torch.ones(1, 2), torch.tensor([[0, 7]]))
