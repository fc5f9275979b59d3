"""Progressive recovery (sae_dist.eval.progressive; Gao et al. 2024 sec. 5.3): TopK(k') and one-threshold
JumpReLU curves of an exported TopK SAE, checked against a float64 dense reference written from the
export's definition (tests/unit/sae/test_export.py's formulas), the threshold calibration, the JumpReLU export
round trip through load_sae, and the eval.json hook."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sae_dist.eval.metrics import ReconstructionStats
from sae_dist.eval.progressive import (
    TruncatedCodesError,
    _covering_codes,
    calibrate_threshold,
    check_topk_sae,
    evaluate_threshold,
    evaluate_topk,
    export_fixed_threshold,
    k_values_from_factors,
    progressive_curve,
    threshold_for_l0,
    topk_codes,
)
from sae_dist.sae import SAEConfig, TopKSAE, export_sae, load_sae

D, N_LAT, K = 32, 128, 6
HOOK = "blocks.1.hook_resid_post"


def _export(tmp_path, mode, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=N_LAT, k=K, normalize=mode), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(N_LAT, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g))
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=g))
    out = tmp_path / f"sae_{mode}"
    export_sae(sae, out, hook_name=HOOK, model_name="m", normalize=mode)
    return out


def _acts(n, seed=1, d=D):
    g = torch.Generator().manual_seed(seed)
    # LM-like: a shared offset, heterogeneous per-token norms
    return torch.randn(n, d, generator=g) * (0.5 + 4 * torch.rand(n, 1, generator=g)) + 2 * torch.randn(d, generator=g)


def _reference(sae_dir, x, *, k=None, theta=None):
    """(x_hat, l0 per token) in float64 from the files: the export's definition (sec. 2.1 layer norm
    folded as x_n = (x - mean) / std_unbiased), TopK(k) + ReLU or pre * 1[pre > theta], dense."""
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    t = {n: v.double() for n, v in load_file(str(sae_dir / "sae_weights.safetensors")).items()}
    x = x.double()
    ln = cfg["normalize_activations"] == "layer_norm"
    if ln:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).norm(dim=-1, keepdim=True) / math.sqrt(x.shape[1] - 1)
        x_n = (x - mu) / std
    else:
        x_n = x
    pre = (x_n - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if k is not None:
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    else:
        z = pre * (pre > theta)
    y = z @ t["W_dec"] + t["b_dec"]
    return (y * std + mu if ln else y), (z != 0).sum(1).double()


def _fvu(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())


def _fvu_normalized(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    mu = x.mean(-1, keepdim=True)
    s = math.sqrt(x.shape[1]) / (x - mu).norm(dim=-1, keepdim=True)
    return _fvu((x - mu) * s, (x_hat - mu) * s)


def test_topk_at_training_k_is_the_sae_itself(tmp_path):
    sae = load_sae(_export(tmp_path, "layer_norm", seed=3))
    x = _acts(257, seed=4)
    stats = ReconstructionStats(D)
    with torch.no_grad():
        values, _ = sae.encode_sparse(x)
        stats.update(x, sae(x), l0=(values != 0).sum(1))
    own = stats.result()
    for point in (evaluate_topk(sae, x, K), progressive_curve(sae, x, [2, K, 20])["topk"][1]):
        assert point["k"] == K
        assert point["l0"] == own["l0"]
        assert point["fvu"] == pytest.approx(own["fvu"], rel=1e-6)
        assert point["mse"] == pytest.approx(own["mse"], rel=1e-6)


@pytest.mark.parametrize("mode", ["layer_norm", "none"])
def test_curve_matches_dense_reference(tmp_path, mode):
    sae_dir = _export(tmp_path, mode, seed=5)
    sae = load_sae(sae_dir)
    x = _acts(300, seed=6)
    ks = [1, 2, 3, K, 9, 12, 24]
    curve = progressive_curve(sae, x, ks)
    assert curve["k_train"] == K and curve["tokens"] == 300 and curve["calibration"] == "same tokens"
    assert [p["k"] for p in curve["topk"]] == ks and len(curve["threshold"]) == len(ks)
    fvu_n = _fvu_normalized if mode == "layer_norm" else _fvu
    for p in curve["topk"]:
        x_hat, l0 = _reference(sae_dir, x, k=p["k"])
        assert p["l0"] == pytest.approx(float(l0.mean()), abs=1e-9), p
        assert p["fvu"] == pytest.approx(_fvu(x, x_hat), rel=1e-4), p
        assert p["fvu_normalized_inputs"] == pytest.approx(fvu_n(x, x_hat), rel=1e-4), p
    for p, q in zip(curve["threshold"], curve["topk"], strict=True):
        assert p["target_l0"] == q["l0"] and p["theta"] > 0
        x_hat, l0 = _reference(sae_dir, x, theta=p["theta"])
        assert p["l0"] == pytest.approx(float(l0.mean()), abs=1e-9), p
        assert p["l0"] == pytest.approx(p["target_l0"], abs=0.5 / 300 + 1e-9), p
        assert p["fvu"] == pytest.approx(_fvu(x, x_hat), rel=1e-4), p
        assert p["fvu_normalized_inputs"] == pytest.approx(fvu_n(x, x_hat), rel=1e-4), p
    # theta calibrated on other tokens: L0 measured on x, no longer exactly the target
    other = progressive_curve(sae, x, ks, calib_x=_acts(400, seed=7))
    assert other["calibration"] == "calib_x (400 tokens)"
    for p in other["threshold"]:
        _, l0 = _reference(sae_dir, x, theta=p["theta"])
        assert p["l0"] == pytest.approx(float(l0.mean()), abs=1e-9)


def test_calibrated_threshold_hits_target_l0(tmp_path):
    sae_dir = _export(tmp_path, "layer_norm", seed=8)
    sae = load_sae(sae_dir)
    x = _acts(500, seed=9)
    for target in (0.5, 3.0, 6.25, 20.0, 40.0):
        theta = threshold_for_l0(sae, x, target)
        res = evaluate_threshold(sae, x, theta)
        _, l0 = _reference(sae_dir, x, theta=theta)
        assert res["l0"] == pytest.approx(float(l0.mean()), abs=1e-9)
        assert res["l0"] == pytest.approx(target, abs=0.5 / 500 + 1e-9), (target, res)
    # too few pre-activations kept per token for the threshold: the truncation is detected
    values, _ = topk_codes(sae, x, 2)
    with pytest.raises(TruncatedCodesError, match="larger m"):
        calibrate_threshold(values, 1.9, sae.d_sae)
    # ... and the curve's helper retries with m doubled until it is not: the theta of the complete codes
    full = calibrate_threshold(topk_codes(sae, x, N_LAT)[0], 1.9, sae.d_sae)
    values, _, thetas = _covering_codes(sae, x, 2, [1.9])
    assert values.shape[1] > 2 and thetas == [full]


def test_bad_inputs_raise(tmp_path):
    sae = load_sae(_export(tmp_path, "none", seed=10))
    x = _acts(64, seed=11)
    values, _ = topk_codes(sae, x, N_LAT)
    reach = float((values > 0).sum()) / 64
    with pytest.raises(ValueError, match="not reachable"):
        calibrate_threshold(values, reach + 1.0, N_LAT)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="target_l0"):
            calibrate_threshold(values, bad, N_LAT)
    for bad in (0.0, -0.5, float("inf")):
        with pytest.raises(ValueError, match="theta"):
            evaluate_threshold(sae, x, bad)
    with pytest.raises(ValueError, match="factor"):
        k_values_from_factors(K, [1, -2], N_LAT)
    with pytest.raises(ValueError, match="empty"):
        k_values_from_factors(K, [], N_LAT)
    assert k_values_from_factors(32, [0.25, 0.375, 1, 4, 100], 8192) == [8, 12, 32, 128, 3200]
    with pytest.raises(ValueError, match="d_sae"):
        progressive_curve(sae, x, [1, N_LAT + 1])
    with pytest.raises(ValueError, match="width"):
        evaluate_topk(sae, _acts(8, d=D + 1), K)


def test_fixed_threshold_export_round_trips(tmp_path):
    src = _export(tmp_path, "layer_norm", seed=12)
    sae = load_sae(src)
    x = _acts(300, seed=13)
    theta = threshold_for_l0(sae, x, 8.0)
    dst = export_fixed_threshold(src, tmp_path / "jumprelu", theta)
    cfg = json.loads((dst / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["fixed_threshold"], cfg["trained_k"]) == ("jumprelu", theta, K)
    assert "k" not in cfg and cfg["normalize_activations"] == "layer_norm"
    jr = load_sae(dst)
    assert jr.architecture == "jumprelu" and torch.all(jr.threshold == torch.tensor(theta, dtype=torch.float32))
    with torch.no_grad():
        z = jr.encode(x)
        x_hat = jr(x)
    ref_hat, ref_l0 = _reference(src, x, theta=theta)
    assert torch.equal((z != 0).sum(1).double(), ref_l0)
    torch.testing.assert_close(x_hat.double(), ref_hat, rtol=1e-4, atol=1e-4)
    stats = ReconstructionStats(D)
    stats.update(x, x_hat, l0=z)
    res = evaluate_threshold(sae, x, theta)
    assert res["l0"] == stats.result()["l0"] == pytest.approx(8.0, abs=0.5 / 300 + 1e-9)
    assert res["fvu"] == pytest.approx(stats.result()["fvu"], rel=1e-6)
    with pytest.raises(ValueError, match="progressive recovery needs a TopK SAE"):
        check_topk_sae(jr)
    with pytest.raises(ValueError, match="architecture 'jumprelu'"):
        export_fixed_threshold(dst, tmp_path / "again", theta)
    with pytest.raises(ValueError, match="theta"):
        export_fixed_threshold(src, tmp_path / "neg", -1.0)


def test_evaluate_writes_progressive_entry(lm, tmp_path):
    from helpers.synthetic import tiny_corpus

    from sae_dist.eval.evaluate import evaluate, write_eval_json

    model, tok = lm
    sae_dir = _export(tmp_path, "layer_norm", seed=14, d=model.config.hidden_size)
    kw = dict(model=model, tokenizer=tok, hook_name=HOOK, docs=tiny_corpus(n_files=4, max_chars=4000), ctx_len=16,
              eval_tokens=150, eval_fraction=1.0, batch_size=4, progress=False, probes=False,
              ablation_latents=0, shrinkage_tokens=0, n2g_latents=0)
    res = evaluate(sae_path=sae_dir, progressive_k_factors=[0.5, 1, 2], **kw)
    prog = res["progressive"]
    assert [p["k"] for p in prog["topk"]] == [3, K, 12] and prog["tokens"] == res["eval_tokens"]
    own = prog["topk"][1]
    assert own["l0"] == res["l0"] and own["fvu"] == pytest.approx(res["fvu"], rel=1e-6)
    assert own["fvu_normalized_inputs"] == pytest.approx(res["fvu_normalized_inputs"], rel=1e-6)
    assert "progressive" in res["metric_seconds"]
    saved = json.loads(open(write_eval_json(res, tmp_path / "eval.json")).read())
    assert saved["progressive"]["threshold"][0]["theta"] == pytest.approx(prog["threshold"][0]["theta"])
    assert evaluate(sae_path=sae_dir, **kw)["progressive"] is None
    jr = export_fixed_threshold(sae_dir, tmp_path / "jr", prog["threshold"][0]["theta"])
    with pytest.raises(ValueError, match="progressive recovery needs a TopK SAE"):
        evaluate(sae_path=jr, progressive_k_factors=[1], **kw)
    with pytest.raises(ValueError, match="factor 0"):
        evaluate(sae_path=sae_dir, progressive_k_factors=[1, 0], **kw)


def test_sae_eval_options():
    from omegaconf import OmegaConf

    from sae_dist.cli import _progressive_k_factors
    from sae_dist.config import EvalConfig
    from sae_dist.eval.progressive import DEFAULT_K_FACTORS

    default = OmegaConf.structured(EvalConfig)  # the eval group's defaults (conf/eval/default.yaml adds none)
    assert default.progressive is False and _progressive_k_factors(OmegaConf.create({"eval": default})) is None
    default.progressive = True
    factors = _progressive_k_factors(OmegaConf.create({"eval": default}))
    assert factors == list(DEFAULT_K_FACTORS)
    assert k_values_from_factors(32, factors, 8192) == [8, 12, 16, 24, 32, 48, 64, 96, 128]
