"""BatchTopK SAE (`sae=batchtopk`, Bussmann, Leask, Nanda 2024, arXiv:2412.06410): the batch selection,
the losses and gradients against a dense hand-written reference, the threshold estimate against a
hand-written bias-corrected running average, the JumpReLU export, ground-truth recovery through the
real trainer, exact resume of the threshold buffer, and the Hydra CLI. Fresh random inputs every run
(the seed is in the assert messages)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.sae import perturb_topk_family, sae_train_on_synthetic, train_interrupted_and_resumed
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic

import sae_dist
from sae_dist.eval.synthetic import SyntheticDictionary, mean_max_cosine
from sae_dist.sae.batchtopk import BatchTopKSAE, batch_topk
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae
from sae_dist.store import write_store


def _random_sae(seed: int, d: int = 12, n: int = 48, k: int = 3, **options) -> BatchTopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = BatchTopKSAE(SAEConfig(d_in=d, d_sae=n, k=k, architecture="batchtopk", options=options,
                                 k_aux=8), generator=g)
    perturb_topk_family(sae, g)
    return sae


def _ref_dense_batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: flatten, torch.topk over B*d_sae of ReLU(pre), scatter back."""
    a = torch.relu(pre).flatten()
    v, i = a.topk(k * pre.shape[0])
    return torch.zeros_like(a).scatter(0, i, v).view_as(pre)


def _ref_nmse(x, r):
    return ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def _ref_auxk(pre, dead, residual, W_dec, k_aux):
    """Hand-written AuxK (Gao et al. 2024 A.2): top-k_aux dead pre-activations (ReLU) reconstruct e."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros(())
    v, i = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return _ref_nmse(residual, z @ W_dec)


def test_batch_selection_equals_flat_topk_reference():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    B, n, k = 64, 96, 5
    pre = torch.randn(B, n, generator=g)  # continuous values: no ties
    rows, cols, vals = batch_topk(pre, k)
    z = torch.zeros(B, n).index_put_((rows, cols), vals)
    ref = _ref_dense_batch_topk(pre, k)
    assert torch.equal(z, ref), seed
    per_token = (z > 0).sum(1)
    assert int(per_token.sum()) == k * B, seed  # mean L0 exactly k
    assert len(set(per_token.tolist())) > 1, seed  # a batch budget, not k per token


def test_training_losses_and_gradients_match_a_dense_reference():
    seed = torch_seed()
    sae = _random_sae(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(40, sae.d_in, generator=g)
    dead = torch.rand(sae.d_sae, generator=g) < 0.4
    res = sae.training_step_losses(x, dead)
    res.loss.backward()

    P = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    z = _ref_dense_batch_topk(pre, sae.cfg.k)
    x_hat = z @ P["W_dec"] + P["b_dec"]
    nmse = _ref_nmse(x, x_hat)
    aux = _ref_auxk(pre, dead, (x - x_hat).detach(), P["W_dec"], sae.cfg.k_aux)
    loss = nmse + sae.cfg.auxk_coef * aux
    loss.backward()
    msg = f"seed {seed}"
    torch.testing.assert_close(res.loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.fvu, nmse.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.auxk_loss, aux.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    assert float(res.auxk_loss) > 0, msg
    torch.testing.assert_close(res.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-4, atol=1e-6, msg=f"{name} {msg}")
    assert float(res.l0_sum) == float((z > 0).sum()), msg
    assert torch.equal(res.fired, (z > 0).any(0)), msg


@pytest.mark.parametrize("beta", [None, 1.0])
def test_threshold_is_a_bias_corrected_average_of_batch_minima(beta):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    beta = float(0.5 + 0.45 * torch.rand((), generator=g)) if beta is None else beta
    start = 3
    sae = _random_sae(seed, threshold_beta=beta, threshold_start_step=start)
    n_steps = 40  # start = min(3, 40 // 2) = 3
    ema, t, minima = 0.0, 0, []
    with torch.no_grad():
        for step in range(8):
            x = torch.randn(32, sae.d_in, generator=g)
            sae.set_progress(step, n_steps)
            sae.training_step_losses(x, None)
            if step < start:
                assert float(sae.threshold) == 0.0 and int(sae.threshold_batches) == 0, seed
                continue
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            z = _ref_dense_batch_topk(pre, sae.cfg.k)
            m = float(z[z > 0].min())
            minima.append(m)
            t += 1
            ema = beta * ema + (1 - beta) * m
            expect = sum(minima) / t if beta == 1.0 else ema / (1 - beta**t)
            assert abs(float(sae.threshold) - expect) <= 1e-5 * abs(expect), (seed, beta, step)
    assert int(sae.threshold_batches) == 5, seed
    # a short run starts its estimate at n_steps // 2
    short = _random_sae(seed, threshold_start_step=1000)
    short.set_progress(9, 20)
    assert not short.estimates_threshold()
    short.set_progress(10, 20)
    assert short.estimates_threshold()
    # inference: a JumpReLU with the global threshold
    pre = torch.randn(16, sae.d_sae, generator=g)
    theta = float(sae.threshold)
    assert theta > 0, seed
    torch.testing.assert_close(sae.activation(pre), torch.where(pre > theta, pre, torch.zeros_like(pre)))


def test_export_is_a_jumprelu_with_the_normalisation_folded(tmp_path):
    seed = torch_seed()
    sae = _random_sae(seed)
    with torch.no_grad():
        sae.threshold.fill_(0.4)
        sae.threshold_batches.fill_(7)
    s = 2.5  # store scale: the training space is s * raw
    export_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post", model_name="m",
               normalize="scalar", scale=s)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["k"] == 3 and cfg["threshold_batches"] == 7
    loaded = sae_dist.load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded.threshold.detach(), torch.full((sae.d_sae,), 0.4 / s))
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(seed)) / s
    with torch.no_grad():
        z_train = sae.encode(s * x)
        assert int((z_train > 0).sum()) > 0 and int((z_train == 0).sum()) > 0, seed
        torch.testing.assert_close(loaded.encode(x), z_train / s, rtol=1e-5, atol=1e-6, msg=str(seed))
        torch.testing.assert_close(loaded(x), sae(s * x) / s, rtol=1e-5, atol=1e-5, msg=str(seed))
        # sparse form of the inference latents decodes to the same reconstruction
        torch.testing.assert_close(sae.decode_sparse(*sae.encode_sparse(s * x)), sae(s * x), rtol=1e-5, atol=1e-5)


def test_options_are_validated():
    base = dict(d_in=8, d_sae=16, k=2, architecture="batchtopk")
    with pytest.raises(ValueError, match=r"threshold_beta=1\.5.*\[0, 1\]"):
        BatchTopKSAE(SAEConfig(**base, options={"threshold_beta": 1.5}))
    with pytest.raises(ValueError, match=r"threshold_start_step=-1"):
        BatchTopKSAE(SAEConfig(**base, options={"threshold_start_step": -1}))
    with pytest.raises(ValueError, match=r"unknown option.*'prefixes'"):
        BatchTopKSAE(SAEConfig(**base, options={"prefixes": [4, 16]}))
    with pytest.raises(ValueError, match=r"multi_topk"):
        BatchTopKSAE(SAEConfig(**base, multi_topk=True, multi_topk_factor=2))
    assert BatchTopKSAE.shardable is False and BatchTopKSAE.uses_k


def test_recovers_the_dictionary_and_the_jumprelu_export_matches(tmp_path):
    seed = torch_seed()
    k = 4
    cfg = SAEConfig(d_in=32, d_sae=128, k=k, normalize="none", dead_tokens=16384, architecture="batchtopk")
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, tokens=600_000, batch_tokens=1024, seed=seed)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))
    after = mean_max_cosine(sd.features, loaded.W_dec)
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    assert res["metrics"]["train/l0"] == k, (res["metrics"], seed)  # exact: k*B kept entries, all > 0
    cfg_json = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["k"] == k
    assert cfg_json["threshold_batches"] == res["steps"]  # default start 0: every batch estimated
    # fresh samples: the JumpReLU rule vs the training-time batch selection on the same weights
    x, _ = sd.sample(8192)
    with torch.no_grad():
        z = loaded.encode(x)
        l0 = float((z > 0).sum(1).float().mean())
        nmse_jump = float(_ref_nmse(x.double(), loaded(x).double()))
        pre = (x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc
        x_hat_batch = torch.cat([_ref_dense_batch_topk(p, k) for p in pre.split(1024)]) @ loaded.W_dec + loaded.b_dec
        nmse_batch = float(_ref_nmse(x.double(), x_hat_batch.double()))
    print(f"batchtopk: MMCS {after:.3f} (random {before:.3f}), exported JumpReLU L0 {l0:.2f} (k={k}), "
          f"NMSE JumpReLU {nmse_jump:.4f} vs batch selection {nmse_batch:.4f}")
    assert 0.7 * k <= l0 <= 1.3 * k, (l0, seed)
    assert nmse_jump <= 1.15 * nmse_batch, (nmse_jump, nmse_batch, seed)


def test_threshold_buffer_survives_a_checkpoint_resume(tmp_path):
    seed = torch_seed()
    sd = SyntheticDictionary(16, 48, p_active=0.06, seed=seed)
    x, _ = sd.sample(4096)
    store = write_store(tmp_path / "s.zarr", x, attrs={"hook_name": "synthetic", "model": "synthetic"})
    cfg = SAEConfig(d_in=16, d_sae=64, k=3, normalize="none", dead_tokens=512, architecture="batchtopk",
                    options={"threshold_beta": 0.8, "threshold_start_step": 4})
    wa, wb = train_interrupted_and_resumed(tmp_path, store, cfg, seed)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(wa[name], wb[name]), (name, seed)
    assert float(wa["threshold"][0]) > 0, seed
    ca = json.loads((tmp_path / "a" / "sae" / "cfg.json").read_text())
    cb = json.loads((tmp_path / "b" / "sae" / "cfg.json").read_text())
    assert ca["threshold_batches"] == cb["threshold_batches"] == 30 - 4, seed
    la = [json.loads(s) for s in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["train/threshold"] for r in la] == [r["train/threshold"] for r in lb], seed


def test_sae_train_cli_batchtopk(tmp_path, console_script):
    seed = torch_seed()
    _, x, proc, run = sae_train_on_synthetic(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, seed, "sae=batchtopk", "sae.d_sae=64", "sae.k=4", "sae.threshold_beta=0.9")
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["k"] == 4 and cfg["d_sae"] == 64, cfg
    assert cfg["threshold_beta"] == 0.9 and cfg["threshold_batches"] == 32, cfg
    sae = sae_dist.load_sae(run / "sae")
    assert float(sae.threshold.detach().min()) == float(sae.threshold.detach().max()) > 0
    with torch.no_grad():
        assert sae(x[:256]).shape == (256, 24)
