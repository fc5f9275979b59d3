"""Matryoshka SAE (`sae=matryoshka`, Bussmann et al. 2025 arXiv:2503.17547; Nabeshima 2024): the nested
loss and its gradients against a loop over prefixes with dense masking, option validation,
ground-truth recovery through the real trainer, the defining property (the first prefix alone
reconstructs data dominated by frequent features far better than the same-size prefix of a plain TopK
SAE), and the Hydra CLI. Fresh random inputs every run (the seed is in the assert messages)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.sae import perturb_topk_family, sae_train_on_synthetic
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic

import sae_dist
from sae_dist.eval.synthetic import SyntheticDictionary, mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.matryoshka import MatryoshkaSAE, default_prefixes
from sae_dist.store import write_store
from sae_dist.train.trainer import TrainerConfig, train


def _ref_nmse(x, r):
    return ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def _ref_select(pre: torch.Tensor, k: int, base: str) -> torch.Tensor:
    """Dense kept latents: TopK per row of ReLU(pre), or the top k*B of the flattened batch."""
    a = torch.relu(pre)
    if base == "topk":
        v, i = a.topk(k, dim=-1)
        return torch.zeros_like(a).scatter(-1, i, v)
    v, i = a.flatten().topk(k * pre.shape[0])
    return torch.zeros_like(a.flatten()).scatter(0, i, v).view_as(pre)


def _ref_auxk(pre, dead, residual, W_dec, k_aux):
    v, i = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return _ref_nmse(residual, z @ W_dec)


@pytest.mark.parametrize("base", ["topk", "batchtopk"])
def test_nested_loss_and_gradients_match_a_loop_over_prefixes(base):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 12, 40, 3
    prefixes, weights = [3, 10, 25, 40], [1.0, 2.0, 0.5, 3.5]
    sae = MatryoshkaSAE(SAEConfig(d_in=d, d_sae=n, k=k, k_aux=6, architecture="matryoshka",
                                  options={"base": base, "prefixes": prefixes, "level_weights": weights}),
                        generator=g)
    perturb_topk_family(sae, g)
    x = torch.randn(48, d, generator=g)
    dead = torch.rand(n, generator=g) < 0.4
    res = sae.training_step_losses(x, dead)
    res.loss.backward()

    P = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    z = _ref_select(pre, k, base)
    nmses = []
    for m in prefixes:  # dense masking: keep the selected latents below m
        z_m = z * (torch.arange(n) < m)
        nmses.append(_ref_nmse(x, z_m @ P["W_dec"] + P["b_dec"]))
    x_hat = z @ P["W_dec"] + P["b_dec"]
    aux = _ref_auxk(pre, dead, (x - x_hat).detach(), P["W_dec"], 6)
    loss = sum(w / sum(weights) * v for w, v in zip(weights, nmses, strict=True)) + sae.cfg.auxk_coef * aux
    loss.backward()
    msg = f"base {base} seed {seed}"
    torch.testing.assert_close(res.loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.fvu, nmses[-1].detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.auxk_loss, aux.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    for i in range(len(prefixes) - 1):
        torch.testing.assert_close(res.terms[f"nmse_level{i}"], nmses[i].detach(), rtol=1e-5, atol=1e-6, msg=msg)
    assert abs(float(nmses[0].detach()) - float(nmses[-1].detach())) > 1e-3, msg  # the levels differ
    torch.testing.assert_close(res.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5, msg=msg)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-4, atol=1e-6, msg=f"{name} {msg}")
    assert float(res.l0_sum) == float((z > 0).sum()), msg
    assert torch.equal(res.fired, (z > 0).any(0)), msg
    assert ("threshold" in res.terms) == (base == "batchtopk")


def test_prefix_and_option_validation():
    def make(n=64, **options):
        return MatryoshkaSAE(SAEConfig(d_in=8, d_sae=n, k=2, architecture="matryoshka", options=options))

    assert make().prefixes == [4, 8, 16, 32, 64] == default_prefixes(64)
    assert default_prefixes(8) == [1, 2, 4, 8] and default_prefixes(1) == [1]
    assert make().level_weights == [0.2] * 5
    assert make(prefixes=[16, 64], level_weights=[1, 3]).level_weights == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"prefixes=\[8, 8, 64\] must be strictly increasing"):
        make(prefixes=[8, 8, 64])
    with pytest.raises(ValueError, match=r"prefixes=\[32, 16, 64\] must be strictly increasing"):
        make(prefixes=[32, 16, 64])
    with pytest.raises(ValueError, match=r"last prefix must equal d_sae=64 \(got 32\)"):
        make(prefixes=[8, 32])
    with pytest.raises(ValueError, match=r"last prefix must equal d_sae=64 \(got 128\)"):
        make(prefixes=[8, 128])
    with pytest.raises(ValueError, match=r"entries must be >= 1"):
        make(prefixes=[0, 64])
    with pytest.raises(ValueError, match=r"entry 8\.5 is not an int"):
        make(prefixes=[8.5, 64])
    with pytest.raises(ValueError, match=r"must not be empty"):
        make(prefixes=[])
    with pytest.raises(ValueError, match=r"must be a list of ints"):
        make(prefixes=64)
    with pytest.raises(ValueError, match=r"level_weights=\[1, 1\] has 2 entries; it needs one per prefix \(3\)"):
        make(prefixes=[8, 16, 64], level_weights=[1, 1])
    with pytest.raises(ValueError, match=r"entry -1 must be a finite number >= 0"):
        make(prefixes=[8, 64], level_weights=[-1, 2])
    with pytest.raises(ValueError, match=r"positive sum"):
        make(prefixes=[8, 64], level_weights=[0, 0])
    with pytest.raises(ValueError, match=r"base='relu'; valid: topk, batchtopk"):
        make(base="relu")
    with pytest.raises(ValueError, match=r"unknown option.*'prefix'"):
        make(prefix=[8, 64])
    assert MatryoshkaSAE.shardable is False


@pytest.mark.slow  # trains through the real trainer (or loads the embedded LM): over 10 s
def test_base_topk_recovers_the_dictionary(tmp_path):
    seed = torch_seed()
    k = 4
    cfg = SAEConfig(d_in=32, d_sae=128, k=k, normalize="none", dead_tokens=16384, architecture="matryoshka",
                    options={"base": "topk"})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, tokens=600_000, batch_tokens=1024, seed=seed)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))
    after = mean_max_cosine(sd.features, loaded.W_dec)
    print(f"matryoshka(topk): MMCS {after:.3f} (random {before:.3f}), train L0 {res['metrics']['train/l0']:.3f}")
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    assert 0.9 * k <= res["metrics"]["train/l0"] <= k, (res["metrics"], seed)
    cfg_json = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "topk" and cfg_json["k"] == k
    assert cfg_json["matryoshka_prefixes"] == [8, 16, 32, 64, 128] and cfg_json["matryoshka_base"] == "topk"
    x, _ = sd.sample(2048)
    with torch.no_grad():
        assert int((loaded.encode(x) > 0).sum(1).max()) <= k


def _skewed_data(sd: SyntheticDictionary, n: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x = sum_i c_i f_i + noise with feature i on with probability p[i] (coefficients U[0.5, 2])."""
    on = torch.rand(n, len(p), generator=g) < p
    coef = on * (0.5 + 1.5 * torch.rand(n, len(p), generator=g))
    return coef @ sd.features + 0.01 * torch.randn(n, sd.d, generator=g)


@pytest.mark.slow  # trains through the real trainer (or loads the embedded LM): over 10 s
def test_first_prefix_carries_the_frequent_features(tmp_path):
    """Data where 8 of 64 features are 12x more frequent than the rest: the Matryoshka SAE's first
    prefix (8 latents) alone reconstructs them; a TopK SAE trained identically, truncated to its first
    8 latents, has no reason to put them there."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    sd = SyntheticDictionary(32, 64, seed=seed)
    p = torch.cat([torch.full((8,), 0.25), torch.full((56,), 0.02)])
    x = _skewed_data(sd, 32768, p, g)
    store = write_store(tmp_path / "s.zarr", x, attrs={"hook_name": "synthetic", "model": "synthetic"})
    fresh = _skewed_data(sd, 8192, p, g)
    m1, k = 8, 4
    nmse = {}
    for arch in ("matryoshka", "topk"):
        cfg = SAEConfig(d_in=32, d_sae=128, k=k, normalize="none", dead_tokens=16384, architecture=arch,
                        options={"base": "topk"} if arch == "matryoshka" else {})
        train(store_path=store, out_dir=tmp_path / arch, sae_cfg=cfg, seed=seed,
              trainer_cfg=TrainerConfig(tokens=600_000, batch_tokens=1024, keep_checkpoints=0, log_every_steps=50),
              progress=False, wandb_cfg={"enabled": False})
        sae = sae_dist.load_sae(tmp_path / arch / "sae")
        with torch.no_grad():
            z = sae.encode(fresh)
            full = z @ sae.W_dec + sae.b_dec
            pref = (z * (torch.arange(128) < m1)) @ sae.W_dec + sae.b_dec  # keep only latents < m_1
        nmse[arch] = (float(_ref_nmse(fresh.double(), pref.double())), float(_ref_nmse(fresh.double(), full.double())))
    print(f"prefix-{m1} NMSE: matryoshka {nmse['matryoshka'][0]:.3f} vs truncated TopK {nmse['topk'][0]:.3f}; "
          f"full NMSE: matryoshka {nmse['matryoshka'][1]:.3f} vs TopK {nmse['topk'][1]:.3f}")
    assert nmse["matryoshka"][0] < 0.6 * nmse["topk"][0], (nmse, seed)
    assert nmse["matryoshka"][0] < 0.6, (nmse, seed)
    assert nmse["matryoshka"][1] < 0.3, (nmse, seed)  # and the whole SAE still reconstructs


def test_sae_train_cli_matryoshka(tmp_path, console_script):
    seed = torch_seed()
    _, _, proc, run = sae_train_on_synthetic(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, seed, "sae=matryoshka", "sae.d_sae=64", "sae.k=4", "sae.prefixes=[8,32,64]")
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["k"] == 4 and cfg["d_sae"] == 64, cfg  # default base
    assert cfg["matryoshka_prefixes"] == [8, 32, 64] and cfg["matryoshka_base"] == "batchtopk", cfg
    sae = sae_dist.load_sae(run / "sae")
    assert float(sae.threshold.detach().min()) > 0
    log = [json.loads(s) for s in (run / "train_log.jsonl").read_text().splitlines()]
    assert {"train/nmse_level0", "train/nmse_level1", "train/threshold"} <= set(log[-1]), log[-1]
