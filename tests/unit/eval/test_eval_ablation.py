"""Ablation sparsity (sae_dist.eval.ablation; Gao et al. 2024 sec. 4.5) and the end-to-end evaluate()
with every new eval.json key, on the tiny random Llama.

References: (L1/L2)^2 in numpy on constructed vectors with known answers; the per-ablation numbers
recomputed by a hand-written loop that splices through its own `register_forward_hook` on the decoder
layer and encodes/decodes with the SAE's weights directly (not the code under test).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers.seeds import torch_seed

from sae_dist.eval.ablation import ablation_sparsity, effective_logit_count

HOOK = "blocks.1.hook_resid_post"
LAYER = 1


def test_effective_count_known_answers():
    seed = torch_seed(2**31)
    rng = np.random.default_rng(seed)
    T, V = 4, 50
    one_hot = torch.zeros(T, V)
    one_hot[rng.integers(T), rng.integers(V)] = rng.normal() + 3.0
    assert effective_logit_count(one_hot) == pytest.approx(1.0, rel=1e-12), seed
    # m entries of equal magnitude (fewer than half of a row, so every row's median stays 0) -> m
    m_eq = torch.zeros(T, V)
    m = 0
    for r in range(T):
        cols = rng.choice(V, size=rng.integers(1, V // 2 - 1), replace=False)
        m_eq[r, cols] = torch.from_numpy(rng.choice([-2.5, 2.5], size=cols.size)).float()
        m += cols.size
    assert effective_logit_count(m_eq) == pytest.approx(m, rel=1e-12), seed
    # a constant shift of each row changes nothing (median subtracted); without it, the count changes
    shifted = m_eq + torch.from_numpy(rng.normal(size=(T, 1))).float()
    assert effective_logit_count(shifted) == pytest.approx(m, rel=1e-6), seed
    assert effective_logit_count(shifted, subtract_median=False) > m
    # random vector against numpy
    x = rng.normal(size=(T, V))
    d = x - np.median(x, axis=1, keepdims=True) if V % 2 else x - np.sort(x, axis=1)[:, V // 2 - 1 : V // 2]
    assert effective_logit_count(torch.from_numpy(x)) == pytest.approx(np.abs(d).sum() ** 2 / (d**2).sum(), rel=1e-12)
    assert 1.0 <= effective_logit_count(torch.from_numpy(x)) <= T * V
    assert math.isnan(effective_logit_count(torch.ones(T, V)))
    with pytest.raises(ValueError, match=r"\[T, V\]"):
        effective_logit_count(torch.ones(V))


def _sequences(tok, n, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (n, t), generator=g)
    ids[:, 0] = tok.bos_token_id
    return ids


def _export_sae(model, out_dir, d_sae, k, seed, ids):
    """A TopK SAE with tied random directions and b_dec = the mean hook activation (so many latents
    fire), exported through the real export."""
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae, load_sae
    from sae_dist.sae.topk import TopKSAE

    d = model.config.hidden_size
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=d_sae, k=k, normalize="none"),
                  generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][:, 1:].reshape(-1, d)
        sae.b_dec.copy_(h.mean(0))
        sae.W_enc.copy_(sae.W_dec.T)
    export_sae(sae, out_dir, hook_name=HOOK, model_name="tiny-llama", normalize="none")
    return load_sae(out_dir)


def _manual_logits(model, ids, sae, ablate=None):
    """Logits with layer LAYER's output at positions >= 1 replaced by the SAE reconstruction computed
    from its weights; `ablate` = (position, latent) zeroed before decoding."""

    def hook(_mod, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        x = h[:, 1:].reshape(-1, h.shape[-1])
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(sae.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        if ablate is not None:
            z[ablate[0] - 1, ablate[1]] = 0.0
        h = h.clone()
        h[:, 1:] = (z @ sae.W_dec + sae.b_dec).reshape(h[:, 1:].shape)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[0].double()
    finally:
        handle.remove()


def test_matches_hand_written_loop(lm, tmp_path):
    model, tok = lm
    seed = torch_seed(2**31)
    ids = _sequences(tok, 6, 24, seed)
    sae = _export_sae(model, tmp_path / "sae", 48, 4, seed, ids)
    T = 5
    out = ablation_sparsity(model, sae, HOOK, ids, n_ablated=5, occurrences=2, positions=T, seed=seed % 1000,
                            batch_size=3, return_details=True)
    details = out["ablation_details"]
    assert len(out["ablation_latents"]) == 5 and len(set(out["ablation_latents"])) == 5
    assert len(details) == 10 and out["ablation_positions"] == T and out["ablation_vocab"] == len(tok)
    for det in details:
        q, p, j = det["seq"], det["pos"], det["latent"]
        assert 1 <= p <= 24 - T
        one = ids[q : q + 1]
        before = _manual_logits(model, one, sae)
        after = _manual_logits(model, one, sae, ablate=(p, j))
        # the latent fires at this token (else the ablation would be a no-op)
        with torch.no_grad():
            v, i = sae.encode_sparse(model(input_ids=one, output_hidden_states=True).hidden_states[LAYER + 1][0, p])
        assert j in i[v > 0].tolist(), (seed, det)
        delta = (after - before)[p : p + T].numpy()
        delta = delta - np.sort(delta, axis=1)[:, (delta.shape[1] - 1) // 2][:, None]  # lower median (torch's)
        ref = np.abs(delta).sum() ** 2 / (delta**2).sum()
        assert det["sparsity"] == pytest.approx(ref, rel=2e-3), (seed, det, ref)
        assert det["fraction"] == pytest.approx(det["sparsity"] / (T * len(tok)), rel=1e-12)
    per = {j: [d["sparsity"] for d in details if d["latent"] == j] for j in out["ablation_latents"]}
    assert out["ablation_sparsity"] == pytest.approx(np.mean([np.mean(v) for v in per.values()]), rel=1e-12)

    # off, too many latents asked, bad options
    assert ablation_sparsity(model, sae, HOOK, ids, n_ablated=0) == {}
    many = ablation_sparsity(model, sae, HOOK, ids, n_ablated=10_000, occurrences=1, positions=T, seed=1)
    from sae_dist.eval.ablation import collect_codes

    rows, lat, _ = collect_codes(model, sae, HOOK, ids).tensors()
    eligible = set(lat[(rows % 23 + 1) <= 24 - T].tolist())
    assert set(many["ablation_latents"]) == eligible
    with pytest.raises(ValueError, match="ablation_positions must be >= 1, got 0"):
        ablation_sparsity(model, sae, HOOK, ids, positions=0)
    with pytest.raises(ValueError, match="ablation_latents must be >= 0, got -1"):
        ablation_sparsity(model, sae, HOOK, ids, n_ablated=-1)


NEW_KEYS = (
    "probe_loss", "probe_baseline", "probe_loss_per_task", "probe_tasks_skipped", "probe_min_count",
    "ablation_sparsity", "ablation_sparsity_fraction", "ablation_latents", "ablation_positions",
    "shrinkage_ratio", "shrinkage_fvu_encoder", "shrinkage_fvu_refined", "shrinkage_fvu_gain", "shrinkage_tokens",
    "density_histogram", "dense_fraction", "dense_threshold",
    "n2g_precision", "n2g_recall", "n2g_f1", "n2g_latents", "n2g_latents_sampled",
)


def test_evaluate_new_keys_end_to_end(lm, tmp_path):
    from helpers.synthetic import tiny_corpus

    from sae_dist.eval.evaluate import CONTRACT_KEYS, evaluate, write_eval_json
    from sae_dist.eval.probes import TASKS

    model, tok = lm
    seed = torch_seed(2**31)
    _export_sae(model, tmp_path / "sae", 64, 4, seed, _sequences(tok, 8, 32, seed))
    docs = tiny_corpus(n_files=6, max_chars=8000)
    res = evaluate(sae_path=tmp_path / "sae", model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=32,
                   eval_tokens=1200, eval_fraction=1.0, batch_size=8, progress=False, ablation_latents=6,
                   ablation_occurrences=2, shrinkage_tokens=500, probe_min_count=10)
    for key in (*CONTRACT_KEYS, *NEW_KEYS):
        assert key in res, key
    n_eval = res["eval_tokens"]
    per_task = res["probe_loss_per_task"]
    assert set(per_task) | set(res["probe_tasks_skipped"]) == set(TASKS)
    assert len(per_task) >= 8, (seed, res["probe_tasks_skipped"])
    for task, v in per_task.items():
        assert 0 <= v["loss"] <= v["baseline"] + 1e-12, (seed, task, v)
        assert 10 <= v["positives"] <= v["n"] - 10 and v["n"] <= n_eval
        assert 0 <= v["best_latent"] < 64
    assert res["probe_loss"] == pytest.approx(np.mean([v["loss"] for v in per_task.values()]), rel=1e-12)
    assert res["probe_loss"] <= res["probe_baseline"]
    n_el = res["ablation_positions"] * res["ablation_vocab"]
    assert res["ablation_positions"] == 16 and res["ablation_vocab"] == len(tok)
    assert 1 <= res["ablation_sparsity"] <= n_el, seed
    assert res["ablation_sparsity_fraction"] == pytest.approx(res["ablation_sparsity"] / n_el, rel=1e-9)
    assert len(res["ablation_latents"]) == 6
    assert res["shrinkage_tokens"] == 500 and res["shrinkage_ratio"] > 0
    assert res["shrinkage_fvu_refined"] <= res["shrinkage_fvu_encoder"] * (1 + 1e-9)
    assert 0 <= res["shrinkage_fvu_gain"] < 1
    hist = res["density_histogram"]
    assert len(hist["log10_density_bin_edges"]) == len(hist["counts"]) + 1
    assert sum(hist["counts"]) + hist["n_dead"] == 64
    assert hist["n_dead"] == round(res["dead_fraction_eval"] * 64)
    assert res["dense_threshold"] == 0.1 and 0 <= res["dense_fraction"] <= 1
    # N2G: a sample of latents that fire, scored on the held-out half of the eval contexts
    assert 1 <= res["n2g_latents"] <= len(res["n2g_latents_sampled"]) <= 64, seed
    assert all(0 <= i < 64 for i in res["n2g_latents_sampled"])
    for key in ("n2g_precision", "n2g_recall", "n2g_f1"):
        assert 0 <= res[key] <= 1, (seed, key, res[key])

    loaded = json.loads(open(write_eval_json(res, tmp_path / "eval.json")).read())
    for key in NEW_KEYS:
        assert loaded[key] == json.loads(json.dumps(res[key])), key

    # everything off: the keys stay, with None values
    off = evaluate(sae_path=tmp_path / "sae", model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=32,
                   eval_tokens=200, eval_fraction=1.0, batch_size=8, progress=False, probes=False,
                   ablation_latents=0, shrinkage_tokens=0, n2g_latents=0)
    assert off["n2g_precision"] is None and off["n2g_latents"] == 0
    assert off["probe_loss"] is None and off["ablation_sparsity"] is None and off["shrinkage_ratio"] is None
    with pytest.raises(ValueError, match="dense_threshold must be in"):
        evaluate(sae_path=tmp_path / "sae", model=model, tokenizer=tok, hook_name=HOOK, docs=docs, ctx_len=32,
                 eval_tokens=200, eval_fraction=1.0, progress=False, dense_threshold=0.0)


def test_fp32_logits_of_a_bfloat16_lm(tiny_lm_dir):
    """Inside `fp32_logits` a bf16 LM's logits are float32 = final hidden state (upcast) @ head weight^T
    in float32, an independent product; outside they are bf16 again (the hook is removed)."""
    from sae_dist.eval.ablation import fp32_logits
    from sae_dist.harvest.lm import load_lm

    model, tok = load_lm(tiny_lm_dir, dtype="bfloat16")
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        ref = hidden.double() @ model.get_output_embeddings().weight.double().t()
        with fp32_logits(model):
            logits = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert logits.dtype == torch.float32 and after.dtype == torch.bfloat16
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(logits, after.float())  # bf16 rounding is what the context removes
