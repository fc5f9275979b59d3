"""SAELens compatibility, both directions, checked against SAELens itself (PyPI `sae-lens`, a test extra).

1. Our exports (topk, relu -> "standard", jumprelu, batchtopk -> "jumprelu", prolu via `to_saelens`)
   load with SAELens' `SAE.load_from_disk` without warnings, and SAELens' encode / decode / forward
   equal our `load_sae` model's on fresh random raw activations.
2. SAEs built and saved by SAELens' own classes (`save_model`) load with our `load_sae`, which then
   reproduces SAELens' encode / decode / forward (standard, topk incl. rescale_acts_by_decoder_norm,
   jumprelu; normalize_activations none / layer_norm / constant_norm_rescale; apply_b_dec_to_input
   both ways; bfloat16 files); "expected_average_only_in" is folded by `import_saelens` as SAELens'
   own `fold_activation_norm_scaling_factor` folds it; "gated" is refused by name.
3. Pre-6.0 SAELens files (hand-written from the documented old layout: hook_point, activation_fn_str,
   boolean normalize_activations, log_threshold, scaling_factor) against a hand-written reference.

Tolerances: where both sides run the same float32 formula the results agree to float rounding
(atol 1e-5 relative to the output scale). Our layer_norm export differs from SAELens' layer_norm by
SAELens' eps (x / (std + 1e-5) vs x / std, a 1e-5/std relative change, module docstring of
sae_dist/sae/export.py), so there the tolerance is 1e-4 relative and a latent selection may flip only
on rows with a near-tie (checked explicitly, at most 2 rows of 256).
"""

import json
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from helpers.seeds import python_seed

# sae-lens is a test extra (pyproject `test`): CI installs it, and a missing package fails here, no skip
from sae_lens import (  # noqa: E402
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from safetensors.torch import save_file

from sae_dist.sae import SAEConfig, export_sae, load_sae  # noqa: E402
from sae_dist.sae.formats import import_saelens, read_sae_cfg, to_saelens  # noqa: E402
from sae_dist.sae.registry import build_sae  # noqa: E402

HOOK = "blocks.3.hook_resid_post"


def _prefixed(prefix: str, report: str) -> str:
    """assert_close `msg` callable (bound with partial): `prefix` on a line before torch's mismatch report."""
    return f"{prefix}\n{report}"


def _raw_acts(g, b, d, offset_scale=2.0):
    """LM-like raw activations [b, d]: a shared offset, heterogeneous per-token norms."""
    return (torch.randn(b, d, generator=g) * (0.5 + 4 * torch.rand(b, 1, generator=g))
            + offset_scale * torch.randn(d, generator=g))


def _randomize_ours(sae, g):
    """Random, non-degenerate weights for one of our training modules (all architectures)."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.add_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[0]))
            elif name in ("b_enc", "b_dec"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name == "log_threshold":
                p.copy_(math.log(0.1) + 0.5 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "threshold") and not isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.fill_(0.05 + 0.1 * float(torch.rand((), generator=g)))


def _support_gap(pre, arch, k, threshold, b_enc):
    """Per-row distance of the pre-activations [B, n] to the nearest decision boundary."""
    if arch == "prolu":  # m = pre - b_enc fires when m > max(0, -b_enc)
        m = pre - b_enc
        return (m - torch.relu(-b_enc)).abs().min(-1).values
    if arch == "topk":
        top = pre.topk(k + 1, dim=-1).values
        return (top[:, k - 1] - top[:, k]).abs()
    if arch == "jumprelu":
        bound = torch.maximum(threshold, torch.zeros_like(threshold))
        return (pre - bound).abs().min(-1).values
    return pre.abs().min(-1).values  # standard: ReLU's boundary at 0


def _compare(sl, ours, x, seed, *, rtol, allow_flips=0, flip_tol=1e-3):
    """SAELens model `sl` vs our model `ours` on raw x [B, d]: encode, decode(encode), forward."""
    with torch.no_grad():
        z_sl = sl.encode(x)
        y_sl = sl.decode(z_sl)
        f_sl = sl(x)
        z = ours.encode(x)
        pre = ours._pre(ours._flat(x))
        y = ours.decode(z)
        f = ours(x)
    scale_z = float(z.abs().max()) + 1e-6
    scale_x = float(x.abs().max())
    same = ((z_sl > 0) == (z > 0)).all(-1)
    flipped = (~same).nonzero().flatten()
    assert len(flipped) <= allow_flips, f"seed {seed}: {len(flipped)} rows select other latents"
    if len(flipped):
        gap = _support_gap(pre[flipped], ours.architecture, ours.k, getattr(ours, "threshold", None), ours.b_enc)
        assert bool((gap < flip_tol * scale_z).all()), (
            f"seed {seed}: rows {flipped.tolist()} differ in their latents without a near-tie (gap {gap})")
    torch.testing.assert_close(z[same], z_sl[same].float(), atol=rtol * scale_z, rtol=rtol,
                               msg=lambda m: f"seed {seed}: encode differs\n{m}")
    torch.testing.assert_close(y[same], y_sl[same].float(), atol=rtol * scale_x, rtol=rtol,
                               msg=lambda m: f"seed {seed}: decode differs\n{m}")
    torch.testing.assert_close(f[same], f_sl[same].float(), atol=rtol * scale_x, rtol=rtol,
                               msg=lambda m: f"seed {seed}: forward differs\n{m}")
    assert same.float().mean() > 0.95
    return z


def _load_in_saelens(path):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sl = SAE.load_from_disk(str(path))
    ours_warn = [str(w.message) for w in rec if "sae_lens" in (w.filename or "")]
    # the one expected notice: load the LM with from_pretrained_no_processing(**model_from_pretrained_kwargs),
    # which is right for our SAEs (trained on the unprocessed model's activations)
    ours_warn = [m for m in ours_warn if "from_pretrained_no_processing" not in m]
    assert not ours_warn, f"SAELens warned while loading {path}: {ours_warn}"
    return sl.eval()


# ------------------------------------------------------------------ 1. our exports in SAELens
@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk", "prolu"])
@pytest.mark.parametrize("mode", ["scalar", "layer_norm"])
def test_our_export_loads_in_saelens(tmp_path, arch, mode):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 24, 96, 5
    uses_k = arch in ("topk", "batchtopk")
    sae = build_sae(SAEConfig(d_in=d, d_sae=n, k=k if uses_k else None, architecture=arch, normalize=mode),
                    generator=torch.Generator().manual_seed(seed))
    _randomize_ours(sae, g)
    x = _raw_acts(g, 256, d)
    scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if mode == "scalar" else None
    out = export_sae(sae, tmp_path / "sae", hook_name=HOOK, model_name="tiny-lm", normalize=mode, scale=scale)
    ours = load_sae(out)
    sl_dir = to_saelens(out, tmp_path / "sl") if arch == "prolu" else out
    sl = _load_in_saelens(sl_dir)
    want = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
            "prolu": "jumprelu"}[arch]
    assert sl.cfg.architecture() == want, f"seed {seed}"
    assert sl.cfg.metadata.hook_name == HOOK and sl.cfg.metadata.model_name == "tiny-lm"
    # SAELens hands this to TransformerLens' from_pretrained: no centring of the residual stream
    assert sl.cfg.metadata.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert sl.cfg.normalize_activations == ("layer_norm" if mode == "layer_norm" else "none")
    if uses_k and want == "topk":
        assert sl.cfg.k == k
    if mode == "layer_norm":  # SAELens' eps: near-ties may flip
        z = _compare(sl, ours, x, seed, rtol=1e-4, allow_flips=2)
    else:
        z = _compare(sl, ours, x, seed, rtol=1e-5)
    assert (z > 0).any(-1).float().mean() > 0.5, f"seed {seed}: the test SAE barely fires"
    if arch == "prolu":  # the converted directory still loads in ours, same outputs
        torch.testing.assert_close(load_sae(sl_dir)(x), ours(x), atol=1e-5 * float(x.abs().max()), rtol=1e-5)


def test_export_without_hook_or_model_loads_in_saelens(tmp_path):
    """hook_name / model_name None (export_sae allows it): SAELens still loads the file."""
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=8, d_sae=32, k=3, architecture="topk", normalize="none"),
                    generator=torch.Generator().manual_seed(seed))
    _randomize_ours(sae, g)
    out = export_sae(sae, tmp_path / "sae", hook_name=None, model_name=None, normalize="none")
    sl = _load_in_saelens(out)
    assert sl.cfg.metadata.hook_name is None and sl.cfg.k == 3
    _compare(sl, load_sae(out), _raw_acts(g, 64, 8), seed, rtol=1e-5)


# ------------------------------------------------------------------ 2. SAELens' own saves in ours
def _saelens_sae(arch, d, n, k, g, **cfg_kw):
    meta = SAEMetadata(hook_name=HOOK, model_name="gpt2-tiny", context_size=128)
    if arch == "standard":
        sl = StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, metadata=meta, **cfg_kw))
    elif arch == "topk":
        sl = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, metadata=meta, **cfg_kw))
    elif arch == "jumprelu":
        sl = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=n, metadata=meta, **cfg_kw))
    else:
        sl = GatedSAE(GatedSAEConfig(d_in=d, d_sae=n, metadata=meta, **cfg_kw))
    with torch.no_grad():
        for name, p in sl.named_parameters():
            if name == "W_enc":
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(d))
            elif name == "W_dec":  # rows of random norm (SAELens does not force unit rows)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(d) * (0.5 + torch.rand(n, 1, generator=g)))
            elif name == "threshold":
                p.copy_(0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sl.eval()


CASES = [
    ("standard", {}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}),
    ("topk", {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False}),
    ("topk", {"normalize_activations": "constant_norm_rescale"}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"normalize_activations": "layer_norm"}),
    ("jumprelu", {"dtype": "bfloat16"}),
]


@pytest.mark.parametrize("arch,cfg_kw", CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in c.items())}"
                                                    for a, c in CASES])
def test_saelens_saved_loads_in_ours(tmp_path, arch, cfg_kw):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 20, 80, 6
    sl = _saelens_sae(arch, d, n, k, g, **cfg_kw)
    sl.save_model(tmp_path / "sl")
    raw_cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert "hook_name" not in raw_cfg and raw_cfg["metadata"]["hook_name"] == HOOK  # 6.x nests it
    ours = load_sae(tmp_path / "sl")
    assert ours.architecture == arch and ours.d_in == d and ours.d_sae == n
    assert ours.cfg["hook_name"] == HOOK and ours.cfg["model_name"] == "gpt2-tiny"
    assert read_sae_cfg(tmp_path / "sl")["hook_name"] == HOOK and read_sae_cfg(tmp_path / "sl")["hook_layer"] == 3
    x = _raw_acts(g, 256, d)
    x[::4] *= 10 ** (-3 * torch.rand(64, 1, generator=g))  # small-norm rows: SAELens' eps matters there
    if cfg_kw.get("dtype") == "bfloat16":  # the file holds bf16 weights: compare with SAELens in fp32
        sl = SAE.load_from_disk(str(tmp_path / "sl"), dtype="float32").eval()
    rtol = 1e-5
    if cfg_kw.get("rescale_acts_by_decoder_norm"):  # folded into the weights: float rounding only
        rtol = 1e-4
    z = _compare(sl, ours, x, seed, rtol=rtol, allow_flips=1 if rtol > 1e-5 else 0, flip_tol=1e-4)
    assert (z > 0).any(-1).float().mean() > 0.5, f"seed {seed}: the test SAE barely fires"
    if arch == "topk":
        with torch.no_grad():
            vals, idx = ours.encode_sparse(x)
            dense = torch.zeros(x.shape[0], n).scatter_(-1, idx, vals)
            torch.testing.assert_close(dense, z)
            torch.testing.assert_close(ours.decode_sparse(vals, idx), ours(x), atol=1e-5 * float(x.abs().max()),
                                       rtol=1e-5)


def test_expected_average_only_in_folds_like_saelens(tmp_path):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 16, 64, 4
    sl = _saelens_sae("topk", d, n, k, g, normalize_activations="expected_average_only_in")
    sl.save_model(tmp_path / "sl")
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        load_sae(tmp_path / "sl")
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        import_saelens(tmp_path / "sl", tmp_path / "ours")
    x = _raw_acts(g, 200, d)
    s = math.sqrt(d) / float(x.norm(dim=-1).mean())
    import_saelens(tmp_path / "sl", tmp_path / "ours", norm_scaling_factor=s)
    ours = load_sae(tmp_path / "ours")
    assert ours.normalize_activations == "none"
    # independent reference: the SAE as trained, run on s * x, reconstruction mapped back by 1/s
    with torch.no_grad():
        y_ref = sl(x * s) / s
        z_ref = sl.encode(x * s)
        sl.fold_activation_norm_scaling_factor(s)  # SAELens' own folding: same model on raw x
        torch.testing.assert_close(ours(x), sl(x), atol=1e-4 * float(x.abs().max()), rtol=1e-4,
                                   msg=lambda m: f"seed {seed}: vs SAELens' fold\n{m}")
        torch.testing.assert_close(ours(x), y_ref, atol=1e-4 * float(x.abs().max()), rtol=1e-4,
                                   msg=lambda m: f"seed {seed}: vs the unfolded SAE on s*x\n{m}")
        torch.testing.assert_close(ours.encode(x), z_ref, atol=1e-4 * float(z_ref.abs().max()), rtol=1e-4)
    with pytest.raises(ValueError, match="only to 'expected_average_only_in'"):
        import_saelens(tmp_path / "ours", tmp_path / "again", norm_scaling_factor=s)


def test_unsupported_saelens_architecture_is_named(tmp_path):
    g = torch.Generator().manual_seed(python_seed())
    _saelens_sae("gated", 8, 16, None, g).save_model(tmp_path / "gated")
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "gated")


# ------------------------------------------------------------------ 3. pre-6.0 SAELens files
def test_pre6_saelens_layout(tmp_path):
    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    d, n, k = 12, 48, 3
    W_enc, W_dec = torch.randn(d, n, generator=g) / math.sqrt(d), torch.randn(n, d, generator=g) / math.sqrt(d)
    b_enc, b_dec = 0.3 * torch.randn(n, generator=g), 0.3 * torch.randn(d, generator=g)
    sf = 0.5 + torch.rand(n, generator=g)
    base = {"d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
            "hook_point": "blocks.5.hook_resid_pre", "hook_point_layer": 5, "context_size": 128,
            "normalize_activations": False, "finetuning_scaling_factor": True}
    # TopK written as a pre-6.0 "standard" SAE with activation_fn_str "topk" and a scaling factor
    (tmp_path / "topk").mkdir()
    (tmp_path / "topk" / "cfg.json").write_text(json.dumps(
        {**base, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}}))
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "scaling_factor": sf},
              str(tmp_path / "topk" / "sae_weights.safetensors"))
    # JumpReLU with log_threshold and an all-ones scaling factor (dropped)
    log_thr = torch.log(0.1 + 0.2 * torch.rand(n, generator=g))
    (tmp_path / "jr").mkdir()
    (tmp_path / "jr" / "cfg.json").write_text(json.dumps({**base, "architecture": "jumprelu",
                                                          "finetuning_scaling_factor": False}))
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "log_threshold": log_thr,
               "scaling_factor": torch.ones(n)}, str(tmp_path / "jr" / "sae_weights.safetensors"))
    x = _raw_acts(g, 128, d)
    xd = x.double()
    pre = (xd - b_dec.double()) @ W_enc.double() + b_enc.double()
    # hand-written references (float64)
    top = pre.topk(k, dim=-1)
    z_topk = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    y_topk = (z_topk * sf.double()) @ W_dec.double() + b_dec.double()
    thr = log_thr.double().exp()
    z_jr = pre.relu() * (pre > thr)
    y_jr = z_jr @ W_dec.double() + b_dec.double()
    for name, z_ref, y_ref in (("topk", z_topk, y_topk), ("jr", z_jr, y_jr)):
        m = load_sae(tmp_path / name)
        assert m.cfg["hook_name"] == "blocks.5.hook_resid_pre" and m.normalize_activations == "none"
        with torch.no_grad():
            z, y = m.encode(x), m(x)
        torch.testing.assert_close(z.double(), z_ref, atol=1e-5 * float(z_ref.abs().max()), rtol=1e-5,
                                   msg=partial(_prefixed, f"seed {seed} {name}: latents"))
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5 * float(x.abs().max()), rtol=1e-5,
                                   msg=partial(_prefixed, f"seed {seed} {name}: reconstruction"))
    assert load_sae(tmp_path / "topk").architecture == "topk" and load_sae(tmp_path / "topk").k == k


# ------------------------------------------------------------------ 4. SAELens saves through sae-eval / sae-browse
def test_saelens_save_through_eval_and_browse(tmp_path, tiny_lm_dir):
    """A TopK SAE written by SAELens' own `save_model` (hook_name nested under metadata) is evaluated by
    `evaluate` (sae-eval) and browsed by `run_browse` (sae-browse) without naming the hook: eval.json's
    fvu equals the fvu of SAELens' own forward on the same held-out activations, and the browser's
    latent densities equal SAELens' encode on the store."""
    from helpers.synthetic import tiny_corpus
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_dist.browse.cli import run_browse
    from sae_dist.eval.evaluate import evaluate, heldout_sequences
    from sae_dist.harvest.hooks import resolve_hook, run_to_hook
    from sae_dist.store import write_store

    seed = python_seed()
    g = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    hook, d, n, k, ctx = "blocks.1.hook_resid_post", lm.config.hidden_size, 96, 4, 32
    meta = SAEMetadata(hook_name=hook, model_name=tiny_lm_dir)
    sl = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, metadata=meta))
    with torch.no_grad():
        sl.W_dec.copy_(torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1))
        sl.W_enc.copy_(sl.W_dec.T)
        sl.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sl.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    sl.eval().save_model(tmp_path / "sl")
    docs = tiny_corpus(n_files=6, max_chars=8000)

    res = evaluate(sae_path=tmp_path / "sl", model=lm, tokenizer=tok, hook_name=None, docs=docs, ctx_len=ctx,
                   eval_tokens=600, eval_fraction=1.0, batch_size=8, progress=False, ablation_latents=2,
                   ablation_occurrences=1, shrinkage_tokens=100, n2g_latents=8, probe_min_count=5)
    assert res["hook_name"] == hook and res["k"] == k and res["d_sae"] == n and res["d_in"] == d
    seqs = heldout_sequences(docs, tok, ctx, 600, 1.0)
    with torch.no_grad():
        x = run_to_hook(lm, resolve_hook(lm, hook), seqs)[:, 1:].reshape(-1, d).double()
        err = (x - sl(x.float()).double()).pow(2).sum()
    fvu_ref = float(err / (x - x.mean(0)).pow(2).sum())
    assert res["fvu"] == pytest.approx(fvu_ref, rel=1e-4), f"seed {seed}"
    assert res["l0"] == pytest.approx(k), f"seed {seed}"

    # sae-browse over a store of the same model's activations
    acts = x.float().numpy()
    ids = seqs[:, 1:].reshape(-1).numpy()
    store = write_store(tmp_path / "acts.zarr", acts, token_ids=ids,
                        seq_index=np.repeat(np.arange(seqs.shape[0]), ctx - 1),
                        position=np.tile(np.arange(1, ctx), seqs.shape[0]),
                        attrs={"model": tiny_lm_dir, "hook_name": hook}, chunk_tokens=256, shard_tokens=512)
    from hydra import compose, initialize_config_dir

    from sae_dist.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={tmp_path / 'run'}", f"sae_path={tmp_path / 'sl'}", f"store.path={store}", "model=hf",
            f"model.name={tiny_lm_dir}", "model.dtype=float32", "device=cpu", "browse.latents_top=5",
            "browse.latents_random=0", "browse.tokens=100000"])
    summary = run_browse(cfg, lm=(lm, tok), progress=False)
    with torch.no_grad():
        density = (sl.encode(x.float()) > 0).double().mean(0).numpy()
    recs = json.loads((tmp_path / "run" / "browser" / "browser.json").read_text())["latents"]
    top5 = sorted(np.flatnonzero(density > 0), key=lambda i: (-density[i], i))[:5]
    assert sorted(r["latent"] for r in recs) == sorted(int(i) for i in top5), f"seed {seed}"
    for r in recs:
        assert r["density"] == pytest.approx(density[r["latent"]], rel=1e-6), f"seed {seed}"
    assert summary["tokens_scanned"] == len(ids)
