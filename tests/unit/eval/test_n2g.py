"""N2G explanations (sae_dist.eval.n2g): synthetic latents with known triggers, and precision / recall
checked against a hand-written count loop over every held-out token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.seeds import numpy_seed

from sae_dist.eval.n2g import WILDCARD, N2GExplanation, fit_n2g, n2g_metrics, score_n2g, summarize_scores


def _bigram_data(rng, A, B, V, C=300, T=32, inserts=30):
    """Random tokens with `inserts` extra (A, B) bigrams; latent 0 fires (value 1 + U) exactly where
    tok[t-1] == A and tok[t] == B; latent 1 fires on random tokens (p = 0.05)."""
    tok = rng.integers(0, V, size=(C, T))
    for _ in range(inserts):
        c, t = rng.integers(0, C), rng.integers(1, T)
        tok[c, t - 1], tok[c, t] = A, B
    acts = np.zeros((C, T, 2), np.float32)
    ab = np.zeros((C, T), bool)
    ab[:, 1:] = (tok[:, :-1] == A) & (tok[:, 1:] == B)
    acts[..., 0] = ab * (1.0 + rng.random((C, T)))
    acts[..., 1] = (rng.random((C, T)) < 0.05) * (0.5 + rng.random((C, T)))
    return tok, acts, ab


def _matches_loop(tok_row, t, gram):
    """Does n-gram `gram` match the tokens ending at position t? (plain Python)"""
    n = len(gram)
    if t - n + 1 < 0:
        return False
    for j in range(n):
        x = int(tok_row[t - n + 1 + j])
        if x < 0:
            return False
        if gram[j] != WILDCARD and gram[j] != x:
            return False
    return True


def _count_loop(tok, acts_l, threshold, ngrams):
    tp = fp = fn = 0
    for c in range(tok.shape[0]):
        for t in range(tok.shape[1]):
            if tok[c, t] < 0:
                continue
            pred = any(_matches_loop(tok[c], t, g) for g in ngrams)
            fire = acts_l[c, t] > threshold
            tp += pred and fire
            fp += pred and not fire
            fn += (not pred) and fire
    return tp, fp, fn


def test_bigram_latent_explained_exactly():
    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    V = 50
    A, B = (int(x) for x in rng.choice(V, 2, replace=False))
    tok, acts, _ = _bigram_data(rng, A, B, V)
    expl = fit_n2g(torch.from_numpy(tok), torch.from_numpy(acts), latent_ids=[7, 9],
                   decode=lambda i: f"t{i}")
    assert [e.latent for e in expl] == [7, 9]
    e = expl[0]
    assert e.ngrams == [(A, B)], f"seed={seed}: bigram latent explained by {e.ngrams}, expected {(A, B)}"
    assert e.ngram_precision == [1.0] and e.text == f"'t{A}' 't{B}'", f"seed={seed}: {e}"
    # fresh held-out sequences from another generator
    tok_h, acts_h, ab_h = _bigram_data(np.random.default_rng(seed + 1), A, B, V)
    sc = score_n2g(expl, tok_h, acts_h)
    assert sc[0].scored and sc[0].precision == 1.0 and sc[0].recall == 1.0 and sc[0].f1 == 1.0, f"seed={seed}: {sc[0]}"
    assert sc[0].tp == int(ab_h.sum()) and sc[0].fp == 0 and sc[0].fn == 0, f"seed={seed}"
    # random-firing latent: predictions independent of firing -> precision near the base rate 0.05
    assert sc[1].precision < 0.3, f"seed={seed}: random latent precision {sc[1].precision} ({expl[1].ngrams})"
    m = summarize_scores(sc)
    assert m["n2g_latents"] == 2
    assert m["n2g_precision"] == pytest.approx((sc[0].precision + sc[1].precision) / 2)


def test_wildcard_trigram():
    """A latent firing on (A, *, B) with ever-different middle tokens needs the wildcard n-gram (B is
    common, so neither (B) nor any (x, B) predicts the latent)."""
    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    V = 1000

    def data(r, C=200, T=32, inserts=40):
        A, B = 0, 1
        # A occurs only in the planted (A, m, B) triples, which never overlap, and every m is different:
        # a bigram (m, B) then fires once among its matches, so it passes min_count=3 only with a
        # precision <= 1/3 < min_precision, and the wildcard trigram is the one exact explanation
        tok = np.where(r.random((C, T)) < 0.2, B, r.integers(2, V, size=(C, T)))
        mids = r.choice(np.arange(2, V), size=inserts, replace=False)
        slots = r.choice(C * (T // 3), size=inserts, replace=False)
        for m, slot in zip(mids, slots, strict=True):
            c, t = divmod(int(slot), T // 3)
            t = 3 * t + 2
            tok[c, t - 2], tok[c, t - 1], tok[c, t] = A, m, B
        hit = np.zeros((C, T), bool)
        hit[:, 2:] = (tok[:, :-2] == A) & (tok[:, 2:] == B)
        return tok, (hit * (1 + r.random((C, T))))[..., None].astype(np.float32), hit

    tok, acts, _ = data(rng)
    e = fit_n2g(tok, acts, wildcards=True)[0]
    assert e.ngrams == [(0, WILDCARD, 1)], f"seed={seed}: {e.ngrams}"
    tok_h, acts_h, hit_h = data(np.random.default_rng(seed + 1))
    s = score_n2g([e], tok_h, acts_h)[0]
    assert (s.precision, s.recall) == (1.0, 1.0) and s.tp == int(hit_h.sum()), f"seed={seed}: {s}"
    # without wildcards no short pattern passes -> empty explanation, precision 0 by definition
    e2 = fit_n2g(tok, acts, wildcards=False)[0]
    assert e2.ngrams == [] and score_n2g([e2], tok_h, acts_h)[0].precision == 0.0, f"seed={seed}: {e2.ngrams}"


def test_scores_match_count_loop_and_fit_precision():
    """score_n2g vs a plain loop on random explanations (with wildcards, padding, thresholds), and the
    fit-set precision / support of fitted n-grams vs a loop."""
    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    V, C, T = 12, 40, 20
    tok = rng.integers(0, V, size=(C, T))
    tok[rng.random((C, T)) < 0.05] = -1  # padding
    acts = np.where(rng.random((C, T, 3)) < 0.3, rng.random((C, T, 3)), 0.0).astype(np.float32)
    # latent 2 prefers token 3 after token 5: a fitted explanation with real n-grams
    acts[:, 1:, 2] += 2.0 * ((tok[:, :-1] == 5) & (tok[:, 1:] == 3))
    expl = [
        N2GExplanation(latent=0, ngrams=[(int(rng.integers(V)),), (1, WILDCARD, 2), (4, 4)], threshold=0.0),
        N2GExplanation(latent=1, ngrams=[(int(rng.integers(V)), int(rng.integers(V)))], threshold=0.5),
    ]
    fitted = fit_n2g(tok, acts[..., 2:], latent_ids=[2], fire_frac=0.0, min_precision=0.4, min_count=2)[0]
    assert fitted.ngrams, f"seed={seed}: nothing fitted"
    expl.append(fitted)
    sc = score_n2g(expl, tok, acts)
    for j, (e, s) in enumerate(zip(expl, sc, strict=True)):
        tp, fp, fn = _count_loop(tok, acts[..., j], e.threshold, e.ngrams)
        assert (s.tp, s.fp, s.fn) == (tp, fp, fn), (
            f"seed={seed} latent {j}: {(s.tp, s.fp, s.fn)} vs loop {(tp, fp, fn)}")
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        assert s.precision == pytest.approx(p) and s.recall == pytest.approx(r), f"seed={seed}"
        assert s.f1 == pytest.approx(2 * p * r / (p + r) if p + r else 0.0), f"seed={seed}"
    # fitted n-grams: fit precision and support recounted by hand
    for g, prec, sup in zip(fitted.ngrams, fitted.ngram_precision, fitted.ngram_support, strict=True):
        n_match = n_fire = 0
        for c in range(C):
            for t in range(T):
                if tok[c, t] >= 0 and _matches_loop(tok[c], t, g):
                    n_match += 1
                    n_fire += acts[c, t, 2] > fitted.threshold
        assert (sup, prec) == (n_match, pytest.approx(n_fire / n_match)), f"seed={seed}: {g}"
        assert prec >= 0.4 and sup >= 2


def test_n2g_metrics_split_and_options():
    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    A, B = 3, 4
    tok, acts, _ = _bigram_data(rng, A, B, 40, C=200)
    m = n2g_metrics(torch.from_numpy(tok), torch.from_numpy(acts[..., :1]), heldout_fraction=0.5)
    assert m["n2g_latents"] == 1 and m["n2g_precision"] == 1.0 and m["n2g_recall"] == 1.0 and m["n2g_f1"] == 1.0, \
        f"seed={seed}: {m}"
    dead = np.zeros((10, 8, 1), np.float32)
    e = fit_n2g(rng.integers(0, 5, (10, 8)), dead)[0]
    assert e.ngrams == [] and e.max_act == 0.0
    assert summarize_scores(score_n2g([e], rng.integers(0, 5, (10, 8)), dead))["n2g_latents"] == 0
    for kw, name in ((dict(max_n=0), "max_n"), (dict(fire_frac=1.0), "fire_frac"),
                     (dict(min_precision=0.0), "min_precision"), (dict(min_count=0), "min_count")):
        with pytest.raises(ValueError, match=name):
            fit_n2g(tok, acts, **kw)
    with pytest.raises(ValueError, match="heldout_fraction"):
        n2g_metrics(tok, acts, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="N_ctx, T"):
        fit_n2g(tok[0], acts)


def test_metrics_from_codes_samples_firing_latents_and_matches_dense_path():
    """n2g_metrics_from_codes (the eval.json path: sparse codes of the eval tokens) == n2g_metrics on the
    dense activations of the same sampled latents; the sample is drawn among latents firing in the fit
    half, and a latent planted on a token is explained with held-out precision = recall = 1."""
    from sae_dist.eval.metrics import LatentCodes
    from sae_dist.eval.n2g import n2g_metrics_from_codes

    seed = numpy_seed()
    rng = np.random.default_rng(seed)
    V, C, T, L = 50, 60, 16, 30
    tok = rng.integers(2, V, size=(C, T))
    z = np.where(rng.random((C, T, L)) < 0.1, rng.random((C, T, L)) + 0.1, 0.0).astype(np.float32)
    z[: C // 2, :, 5] = 0.0  # latent 5 never fires in the fit half: never sampled
    z[..., 7] = 0.0
    tok[:, 1] = 1  # token 1 at position 1 of every context, nowhere else
    z[:, 1, 7] = 1.0 + rng.random(C)
    codes = LatentCodes(L)
    codes.add_dense(torch.from_numpy(z.reshape(C * T, L)))
    res = n2g_metrics_from_codes(tok, codes, n_sampled=L, seed=seed, heldout_fraction=0.5)
    sampled = res["n2g_latents_sampled"]
    assert 5 not in sampled and 7 in sampled and len(sampled) == L - 1, f"seed={seed}"
    ref = n2g_metrics(tok, z[..., sampled], heldout_fraction=0.5, latent_ids=sampled)
    for key in ("n2g_precision", "n2g_recall", "n2g_f1", "n2g_latents"):
        assert res[key] == pytest.approx(ref[key], rel=1e-12), f"seed={seed} {key}"
    e = fit_n2g(tok[: C // 2], z[: C // 2, :, 7])[0]
    assert e.ngrams == [(1,)], f"seed={seed}: {e.ngrams}"  # token 1 occurs only where latent 7 fires
    s7 = score_n2g([e], tok[C // 2:], z[C // 2:, :, 7])[0]
    assert (s7.precision, s7.recall, s7.tp) == (1.0, 1.0, C - C // 2), f"seed={seed}: {s7}"
    # a smaller sample is a seeded subset of the firing latents
    small = n2g_metrics_from_codes(tok, codes, n_sampled=4, seed=seed)["n2g_latents_sampled"]
    assert len(small) == 4 and set(small) <= set(sampled), f"seed={seed}"
    with pytest.raises(ValueError, match="codes hold"):
        n2g_metrics_from_codes(tok[:-1], codes)
