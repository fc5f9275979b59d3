"""Tree-structured SAE (`sae=tree`, sae_dist/sae/tree.py): the tree loss and the whole training step
against dense references, the co-activation builder on index streams with a planted hierarchy (and its
bounded Misra-Gries tables against exact counts), validation of a configured parent map, ground-truth
recovery and hierarchy recovery through the real trainer, exact resume, and the Hydra CLI. Fresh
random inputs every run (the seed is in the assert messages)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.sae import perturb_topk_family, sae_train_on_synthetic
from helpers.seeds import torch_seed
from helpers.synthetic import train_on_synthetic
from safetensors.torch import load_file

from sae_dist.eval.synthetic import SyntheticDictionary, mean_max_cosine
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import load_sae
from sae_dist.sae.tree import (
    TreeSAE,
    build_parents,
    check_parents,
    forest_depths,
    limit_depth,
    load_tree,
    tree_violation_loss,
)
from sae_dist.store import write_store
from sae_dist.train.trainer import TrainerConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _random_forest(n: int, g: torch.Generator, p_edge: float = 0.7) -> torch.Tensor:
    """A random forest over n latents: in a random order, each latent takes an earlier one as parent
    with probability p_edge (so no cycle)."""
    order = torch.randperm(n, generator=g).tolist()
    par = [-1] * n
    for i, c in enumerate(order):
        if i > 0 and float(torch.rand((), generator=g)) < p_edge:
            par[c] = order[int(torch.randint(0, i, (), generator=g))]
    return torch.tensor(par)


def _ancestors(par: list[int], c: int) -> list[int]:
    out = []
    while par[c] >= 0:
        c = par[c]
        out.append(c)
    return out


def _rows_with_paths(par: torch.Tensor, B: int, k: int, g: torch.Generator) -> torch.Tensor:
    """indices [B, k], distinct per row, each row holding a random latent and (most of) its ancestors."""
    n, pl = par.numel(), par.tolist()
    rows = []
    for _ in range(B):
        score = torch.rand(n, generator=g)
        c = int(torch.randint(0, n, (), generator=g))
        score[[c, *_ancestors(pl, c)]] += 1.0
        rows.append(score.topk(k).indices)
    return torch.stack(rows)


def _dense_tree_loss(z: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """sum over (token, latent c with a parent) of z_c * 1[z_c > 0 and z_parent == 0] / sum z."""
    num = z.new_zeros(())
    for c in range(z.shape[1]):
        p = int(par[c])
        if p >= 0:
            num = num + (z[:, c] * ((z[:, c] > 0) & (z[:, p] == 0))).sum()
    return num / z.detach().sum()


def test_tree_loss_matches_a_dense_loop():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    n, B, k = 40, 64, 6
    par = _random_forest(n, g)
    idx = _rows_with_paths(par, B, k, g)
    vals = torch.relu(torch.randn(B, k, generator=g) + 0.7).requires_grad_(True)  # some exact zeros
    loss = tree_violation_loss(vals, idx, par)
    loss.backward()
    zd = torch.zeros(B, n).scatter(1, idx, vals.detach()).requires_grad_(True)
    ref = _dense_tree_loss(zd, par)
    ref.backward()
    msg = f"seed {seed}"
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7, msg=msg)
    torch.testing.assert_close(vals.grad, zd.grad.gather(1, idx), rtol=1e-6, atol=1e-7, msg=msg)
    assert 0.0 < float(ref.detach()) < 1.0, (float(ref.detach()), msg)  # some violations, some satisfied edges
    assert float(tree_violation_loss(vals.detach(), idx, torch.full((n,), -1))) == 0.0  # no tree, no loss
    assert float(tree_violation_loss(torch.zeros(B, k), idx, par)) == 0.0


def _ref_auxk(pre, dead, residual, W_dec, k_aux):
    v, i = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return ((residual - z @ W_dec) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()


def test_training_step_matches_a_dense_reference():
    """Loss terms and every gradient of one step (configured tree, AuxK on) against dense autograd."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k, coef = 12, 40, 4, 0.7
    par = _random_forest(n, g)
    cfg = SAEConfig(d_in=d, d_sae=n, k=k, k_aux=6, architecture="tree",
                    options={"parents": par.tolist(), "tree_coef": coef})
    sae = TreeSAE(cfg, generator=g)
    perturb_topk_family(sae, g)
    x = torch.randn(48, d, generator=g)
    dead = torch.rand(n, generator=g) < 0.4
    res = sae.training_step_losses(x, dead)
    res.loss.backward()

    P = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    v, i = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat = z @ P["W_dec"] + P["b_dec"]
    nmse = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    aux = _ref_auxk(pre, dead, (x - x_hat).detach(), P["W_dec"], 6)
    tree = _dense_tree_loss(z, par)
    loss = nmse + cfg.auxk_coef * aux + coef * tree
    loss.backward()
    msg = f"seed {seed}"
    assert float(tree.detach()) > 0, msg
    torch.testing.assert_close(res.loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.terms["tree"], tree.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    torch.testing.assert_close(res.auxk_loss, aux.detach(), rtol=1e-5, atol=1e-6, msg=msg)
    assert float(res.terms["tree_edges"]) == float((par >= 0).sum()), msg
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-4, atol=1e-6, msg=f"{name} {msg}")
    # a configured tree is never rebuilt and keeps no statistics
    assert int(sae.tree_state) == 1 and sae.fire_count.numel() == 0 and torch.equal(sae.parents, par)


def _planted_stream(n: int, n_tokens: int, g: torch.Generator):
    """(values [T, K], indices [T, K], planted parents [n], on [T, n]) from a planted forest over the first
    n - 2 latents (at most 3 ancestors; a child fires only with its parent, with probability 0.5; roots
    with probability 0.2)
    plus a loosely coupled pair (a, b) = (n - 2, n - 1): a fires with probability 0.3, b with a with
    probability 0.4 and on its own with probability 0.05. Silent padding entries (value 0) fill each row
    to a fixed width K."""
    m = n - 2
    planted = torch.cat([limit_depth(_random_forest(m, g, p_edge=0.75), 3), torch.tensor([-1, -1])])
    pl = planted.tolist()
    depth = forest_depths(planted)
    on = torch.zeros(n_tokens, n, dtype=torch.bool)
    for lvl in range(int(depth.max()) + 1):  # parents before children
        for c in (depth == lvl).nonzero().flatten().tolist():
            if c >= m:
                continue
            r = torch.rand(n_tokens, generator=g)
            on[:, c] = (r < 0.2) if pl[c] < 0 else (on[:, pl[c]] & (r < 0.5))
    on[:, m] = torch.rand(n_tokens, generator=g) < 0.3
    on[:, m + 1] = (on[:, m] & (torch.rand(n_tokens, generator=g) < 0.4)) | (torch.rand(n_tokens, generator=g) < 0.05)
    K = int(on.sum(1).max())
    score = on.float() + 0.5 * torch.rand(n_tokens, n, generator=g)  # fired latents first, then padding
    idx = score.topk(K, dim=1).indices
    vals = on.gather(1, idx) * (0.5 + torch.rand(n_tokens, K, generator=g))
    return vals, idx, planted, on


def _dense_rule(on: torch.Tensor, min_cooc: float, min_fires: int) -> list[int]:
    """The builder's rule by brute force from the dense firing matrix: for every latent c, the most
    frequent co-firer p among latents firing strictly more often (ties: fewer fires, then lower index),
    kept when count(c, p) / f(c) >= min_cooc and f(c) >= min_fires."""
    f = on.sum(0).tolist()
    C = (on.T.float() @ on.float()).long().tolist()
    n = len(f)
    out = []
    for c in range(n):
        best = None
        for p in range(n):
            if p == c or f[p] <= f[c] or C[c][p] == 0 or f[c] < min_fires:
                continue
            key = (-C[c][p], f[p], p)
            best = key if best is None or key < best else best
        out.append(best[2] if best is not None and -best[0] / f[c] >= min_cooc else -1)
    return out


def test_coactivation_builder_recovers_a_planted_forest():
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    n, T = 30, 6000
    vals, idx, planted, on = _planted_stream(n, T, g)
    msg = f"seed {seed}"
    sae = TreeSAE(SAEConfig(d_in=8, d_sae=n, k=4, architecture="tree",
                            options={"build_tokens": T, "min_cooccurrence": 0.5, "min_fires": 5, "partners": n}))
    for s in range(0, T, 1000):  # the training path: counted in batches, built once T tokens are in
        assert int(sae.tree_state) == 0, msg
        sae.update_statistics_(vals[s:s + 1000], idx[s:s + 1000])
    assert int(sae.tree_state) == 2 and int(sae.stat_tokens) == T, msg
    assert torch.equal(sae.fire_count, on.sum(0)), msg
    assert int(sae.count_deficit.sum()) == 0, msg  # partners >= n - 1: exact counts
    built = sae.parents
    check_parents(built, n)  # a forest (raises on a cycle)
    assert (forest_depths(built) >= 0).all(), msg
    m = n - 2
    assert torch.equal(built[:m], planted[:m]), (built.tolist(), planted.tolist(), msg)
    assert built.tolist() == _dense_rule(on, 0.5, 5), msg
    # min_cooccurrence is a hard threshold: b -> a exactly when P(a | b) >= min_cooccurrence
    a, b = m, m + 1
    p_ab = float((on[:, a] & on[:, b]).sum()) / float(on[:, b].sum())
    assert 0.5 < p_ab < 1.0 and int(built[b]) == a, (p_ab, msg)
    for thr, want in ((p_ab - 1e-9, a), (p_ab + 1e-9, -1)):
        par, prob = build_parents(sae.fire_count, sae.partner_idx, sae.partner_count, min_cooccurrence=thr,
                                  min_fires=5)
        assert int(par[b]) == want, (thr, p_ab, msg)
        assert par.tolist() == _dense_rule(on, thr, 5), (thr, msg)
        ok = par >= 0
        assert torch.allclose(prob[ok], on[:, par[ok]].logical_and(on[:, ok]).sum(0).double() / on[:, ok].sum(0))
    # min_fires: a child firing fewer times stays a root
    f = on.sum(0)
    child = int(((planted >= 0) & (f > 0)).nonzero()[0])
    par, _ = build_parents(sae.fire_count, sae.partner_idx, sae.partner_count, min_cooccurrence=0.5,
                           min_fires=int(f[child]) + 1)
    assert int(par[child]) == -1 and par.tolist() == _dense_rule(on, 0.5, int(f[child]) + 1), msg
    # max_depth: no latent keeps more ancestors than allowed
    par, _ = build_parents(sae.fire_count, sae.partner_idx, sae.partner_count, min_cooccurrence=0.5,
                           min_fires=5, max_depth=1)
    assert int(forest_depths(par).max()) <= 1, msg
    assert torch.equal(par, limit_depth(built, 1)), msg


def test_bounded_partner_tables_are_lower_bounds_within_the_deficit():
    """With few partners per latent (Misra-Gries pruning) the kept counts are lower bounds of the exact
    co-firing counts, short by at most the row's deficit, absent partners fired together at most
    deficit times, and every edge made has a TRUE P(parent | child) >= min_cooccurrence."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    n, T = 30, 4000
    vals, idx, _, on = _planted_stream(n, T, g)
    sae = TreeSAE(SAEConfig(d_in=8, d_sae=n, k=4, architecture="tree",
                            options={"build_tokens": 10**9, "partners": 3, "min_fires": 1}))
    for s in range(0, T, 500):
        sae.update_statistics_(vals[s:s + 500], idx[s:s + 500])
    C = (on.T.float() @ on.float()).long()
    C.fill_diagonal_(0)
    est = torch.zeros_like(C)
    has = sae.partner_idx >= 0
    rows = torch.arange(n).unsqueeze(1).expand_as(sae.partner_idx)
    est[rows[has], sae.partner_idx[has]] = sae.partner_count[has]
    deficit = sae.count_deficit.unsqueeze(1)
    msg = f"seed {seed}"
    assert int(sae.count_deficit.sum()) > 0, msg  # the pruning did act
    assert (est <= C).all() and (C - est <= deficit).all(), msg
    assert int((~has).sum()) < 3 * n, msg
    par, _ = build_parents(sae.fire_count, sae.partner_idx, sae.partner_count, min_cooccurrence=0.5)
    check_parents(par, n)
    ok = (par >= 0).nonzero().flatten()
    true_p = C[ok, par[ok]].double() / on[:, ok].sum(0).double()
    assert (true_p >= 0.5).all() and ok.numel() > 0, (true_p, msg)


def test_configured_parents_are_validated():
    def make(parents, n=6, **opt):
        return TreeSAE(SAEConfig(d_in=4, d_sae=n, k=2, architecture="tree", options={"parents": parents, **opt}))

    assert make([-1, 0, 0, 1, -1, 4]).parents.tolist() == [-1, 0, 0, 1, -1, 4]
    with pytest.raises(ValueError, match=r"parents has 5 entries; valid: one per latent \(d_sae=6\)"):
        make([-1, 0, 0, 1, -1])
    with pytest.raises(ValueError, match=r"parents\[3\]=6 is out of range; valid: \[-1, 6\)"):
        make([-1, 0, 0, 6, -1, 4])
    with pytest.raises(ValueError, match=r"parents\[0\]=-2 is out of range"):
        make([-2, 0, 0, 1, -1, 4])
    with pytest.raises(ValueError, match=r"parents\[1\]=0.5 is not an int"):
        make([-1, 0.5, 0, 1, -1, 4])
    with pytest.raises(ValueError, match=r"parents\[1\]=True is not an int"):
        make([-1, True, 0, 1, -1, 4])
    with pytest.raises(ValueError, match=r"parents\[2\]=2: latent 2 cannot be its own parent"):
        make([-1, 0, 2, 1, -1, 4])
    with pytest.raises(ValueError, match=r"not a forest: it has a cycle 1 -> 3 -> 5 -> 1"):
        make([-1, 3, 0, 5, -1, 1])
    with pytest.raises(ValueError, match=r"latent 3 has 2 ancestors > max_depth=1"):
        make([-1, 0, 0, 1, -1, 4], max_depth=1)
    with pytest.raises(ValueError, match=r"parents='0,1'; valid: null or a list"):
        make("0,1")
    for opt, val, pat in (("tree_coef", -1.0, r"tree_coef=-1.0; valid: a number in \[0, inf\)"),
                          ("build_start_frac", 1.0, r"build_start_frac=1.0; valid: a number in \[0, 1\)"),
                          ("min_cooccurrence", 0.0, r"min_cooccurrence=0.0; valid: a number in \(0, 1\]"),
                          ("build_tokens", 0, r"build_tokens=0; valid: an int >= 1"),
                          ("partners", 2.5, r"partners=2.5; valid: an int >= 1"),
                          ("max_depth", 0, r"max_depth=0; valid: null or an int >= 1")):
        with pytest.raises(ValueError, match=pat):
            make(None, **{opt: val})
    with pytest.raises(ValueError, match=r"unknown option.*'parent'"):
        TreeSAE(SAEConfig(d_in=4, d_sae=6, k=2, architecture="tree", options={"parent": [0]}))
    with pytest.raises(ValueError, match=r"need \d+ MiB .* > max_stats_mb=1.*lower sae.partners"):
        TreeSAE(SAEConfig(d_in=4, d_sae=65536, k=2, architecture="tree", options={"max_stats_mb": 1}))
    # the depth limiter and the depth count against a hand-made forest
    par = torch.tensor([-1, 0, 1, 2, 3, -1, 5])
    assert forest_depths(par).tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert limit_depth(par, 1).tolist() == [-1, 0, -1, 2, -1, -1, 5]
    assert TreeSAE.shardable is False


def test_configured_tree_is_used_in_training_and_exported(tmp_path):
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    par = _random_forest(64, g)
    cfg = SAEConfig(d_in=16, d_sae=64, k=4, normalize="none", architecture="tree",
                    options={"parents": par.tolist(), "tree_coef": 0.5})
    _, res, _ = train_on_synthetic(tmp_path, cfg, tokens=40_960, batch_tokens=2048, seed=seed, lr=5e-3)
    tree = load_tree(tmp_path / "run" / "sae")
    assert torch.equal(tree["parents"], par) and tree["source"] == "config", seed
    cfg_json = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg_json["tree_file"] == "tree.json" and cfg_json["tree_source"] == "config"
    log = [json.loads(s) for s in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["train/tree_edges"] == float((par >= 0).sum()) and log[0]["train/tree"] > 0, (log[0], seed)


def test_recovers_the_dictionary_and_writes_the_tree(tmp_path):
    seed = torch_seed()
    k = 4
    cfg = SAEConfig(d_in=32, d_sae=128, k=k, normalize="none", dead_tokens=16384, architecture="tree",
                    options={"build_start_frac": 0.3, "build_tokens": 40_960})
    sd, res, loaded = train_on_synthetic(tmp_path, cfg, tokens=300_000, batch_tokens=2048, seed=seed, lr=5e-3)
    before = mean_max_cosine(sd.features, torch.randn(128, 32))
    after = mean_max_cosine(sd.features, loaded.W_dec)
    tree = load_tree(tmp_path / "run" / "sae")
    print(f"tree: MMCS {after:.3f} (random {before:.3f}), train L0 {res['metrics']['train/l0']:.3f}, "
          f"{tree['n_edges']} edges on independent features")
    assert before < 0.7, before
    assert after >= 0.9, (after, seed)
    assert 0.9 * k <= res["metrics"]["train/l0"] <= k, (res["metrics"], seed)
    cfg_json = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "topk" and cfg_json["k"] == k and cfg_json["tree_file"] == "tree.json"
    assert tree["source"] == "co-activation" and tree["d_sae"] == 128 and tree["tokens_counted"] == 40_960
    assert tree["built_at_step"] == int(0.3 * (300_000 // 2048)) + 40_960 // 2048 - 1, tree["built_at_step"]
    assert len(tree["parent_probability"]) == 128
    probs = [p for p in tree["parent_probability"] if p is not None]
    assert len(probs) == tree["n_edges"] and all(p >= 0.5 for p in probs)


def _hier_sample(F: torch.Tensor, n_par: int, n_ch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """x = sum of active features * U[0.5, 2] + noise: parent i fires with probability 0.12, each of its
    n_ch children (feature n_par + i * n_ch + j) only when it fires, with probability 0.35."""
    on_p = torch.rand(n, n_par, generator=g) < 0.12
    on_c = (torch.rand(n, n_par, n_ch, generator=g) < 0.35) & on_p.unsqueeze(2)
    on = torch.cat([on_p, on_c.reshape(n, -1)], 1)
    return (on * (0.5 + 1.5 * torch.rand(on.shape, generator=g))) @ F + 0.01 * torch.randn(n, F.shape[1], generator=g)


def test_built_tree_links_child_features_to_their_parents(tmp_path):
    """Data with 12 parent features and 2 child features each (a child only ever appears with its
    parent). After training with the built tree, the latent best matching a child feature has as its
    parent the latent best matching the child's parent far more often than chance (1 / (n - 1) per
    child for a random parent). Feature absorption (Chanin et al. 2024) pulls the parent direction into
    child latents, so P(parent latent | child latent) is often near 0.5, not 1: the tree is built with
    min_cooccurrence 0.3 here (about half of the 24 links are found on typical runs)."""
    seed = torch_seed()
    g = torch.Generator().manual_seed(seed)
    d, n_par, n_ch, n = 32, 12, 2, 64
    F = torch.nn.functional.normalize(torch.randn(n_par * (1 + n_ch), d, generator=g), dim=-1)
    write_store(tmp_path / "s.zarr", _hier_sample(F, n_par, n_ch, 32768, g), attrs={"hook_name": "h", "model": "m"})
    cfg = SAEConfig(d_in=d, d_sae=n, k=4, normalize="none", dead_tokens=16384, architecture="tree",
                    options={"build_start_frac": 0.5, "build_tokens": 65536, "min_cooccurrence": 0.3})
    train(store_path=tmp_path / "s.zarr", out_dir=tmp_path / "run", sae_cfg=cfg, seed=seed,
          trainer_cfg=TrainerConfig(tokens=400_000, batch_tokens=2048, lr=5e-3, keep_checkpoints=0),
          progress=False, wandb_cfg={"enabled": False})
    sae = load_sae(tmp_path / "run" / "sae")
    par = load_tree(tmp_path / "run" / "sae")["parents"]
    best = (F @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1).T).argmax(1)
    hits = sum(int(par[best[n_par + i * n_ch + j]] == best[i]) for i in range(n_par) for j in range(n_ch))
    chance = n_par * n_ch / (n - 1)
    print(f"tree hierarchy: {hits}/{n_par * n_ch} child latents under their parent's latent (chance {chance:.2f})")
    # P(X >= 5) for X ~ Binomial(24, 1/63) is about 6e-5
    assert hits >= 5, (hits, chance, seed)


def _resume_run(store, out, seed, max_steps=None):
    cfg = SAEConfig(d_in=16, d_sae=64, k=4, normalize="none", dead_tokens=4096, architecture="tree",
                    options={"build_start_frac": 0.2, "build_tokens": 8 * 2048, "min_cooccurrence": 0.2})
    tcfg = TrainerConfig(tokens=30 * 2048, batch_tokens=2048, lr=5e-3, checkpoint_every_steps=5, keep_checkpoints=2,
                         log_every_steps=1, max_steps=max_steps)
    return train(store_path=store, out_dir=out, sae_cfg=cfg, trainer_cfg=tcfg, seed=seed, progress=False,
                 wandb_cfg={"enabled": False})


def test_resume_mid_count_equals_an_uninterrupted_run(tmp_path):
    """Counting runs over steps 6..13 (build_start_frac 0.2 of 30 steps, 8 batches); the run stops at
    step 10, resumes from the checkpoint of step 10: same weights, same tree, same logs."""
    seed = torch_seed()
    sd = SyntheticDictionary(16, 48, p_active=0.08, seed=seed)
    store = write_store(tmp_path / "s.zarr", sd.sample(8192)[0], attrs={"hook_name": "h", "model": "m"})
    a, b = tmp_path / "a", tmp_path / "b"
    _resume_run(store, a, seed)
    r1 = _resume_run(store, b, seed, max_steps=10)
    assert r1["stopped_early"] and r1["steps"] == 10
    r2 = _resume_run(store, b, seed)
    assert not r2["stopped_early"] and r2["steps"] == 30
    wa, wb = (load_file(str(p / "sae" / "sae_weights.safetensors")) for p in (a, b))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(wa[name], wb[name]), (name, seed)
    ta, tb = (json.loads((p / "sae" / "tree.json").read_text()) for p in (a, b))
    assert ta == tb, seed
    assert ta["built_at_step"] == 13 and ta["tokens_counted"] == 8 * 2048 and ta["n_edges"] > 0, (ta, seed)

    def strip(p):
        rows = [json.loads(s) for s in (p / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    la, lb = strip(a), strip(b)
    assert la == lb, seed
    assert all(r["train/tree"] == 0 for r in la[:13]) and any(r["train/tree"] > 0 for r in la[13:]), seed


def test_sae_train_cli_tree(tmp_path, console_script):
    seed = torch_seed()
    sd, _, proc, run = sae_train_on_synthetic(  # sae-train, in this process (conftest.py)
        console_script, tmp_path, seed, "sae=tree", "sae.d_sae=64", "sae.k=4", "sae.build_start_frac=0.25",
        "sae.build_tokens=4096", "sae.min_cooccurrence=0.2", batch_tokens=2048)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 64, cfg
    assert cfg["tree_file"] == "tree.json" and cfg["tree_source"] == "co-activation", cfg
    tree = load_tree(run / "sae")
    assert tree["parents"].shape == (64,) and tree["tokens_counted"] == 4096 and tree["min_cooccurrence"] == 0.2
    assert tree["built_at_step"] == 2 + 4096 // 2048 - 1, tree["built_at_step"]  # counting from step 8 * 0.25
    log = [json.loads(s) for s in (run / "train_log.jsonl").read_text().splitlines()]
    assert {"train/tree", "train/tree_edges"} <= set(log[-1]), log[-1]
    assert log[-1]["train/tree_edges"] == tree["n_edges"]
    with torch.no_grad():
        assert int((load_sae(run / "sae").encode(sd.sample(256)[0]) > 0).sum(1).max()) <= 4
