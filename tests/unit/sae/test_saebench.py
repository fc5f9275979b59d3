"""`sae_dist.sae.saebench.to_saebench`: SAEBench's own core evaluation (`sae_bench.evals.core.main.run_evals`:
reconstruction, sparsity, shrinkage, CE / KL, per-latent density) run offline on the adapter of exports of each
architecture, over a tiny random TransformerLens model and an in-memory dataset of tokens read through SAELens'
ActivationsStore, against our own metrics (`sae_dist.eval.metrics.ReconstructionStats`) and a TransformerLens
forward computed here on the same activations. sae-bench is installed without its dependencies (`make install`;
docs/formats.md#saebench): the module is skipped only where it is missing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.export import saelens_topk_forward
from safetensors.torch import load_file

from sae_dist.eval.metrics import ReconstructionStats
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.export import export_sae, load_sae
from sae_dist.sae.registry import build_sae
from sae_dist.sae.saebench import SAEBENCH_INSTALL, to_saebench

HOOK, D, N_SEQ, CTX, VOCAB, BOS = "blocks.0.hook_resid_post", 16, 8, 16, 61, 0


@pytest.fixture(scope="module", autouse=True)
def core():
    """SAEBench's core evaluation module, imported in the process that runs these tests (not at collection, which
    every pytest-xdist worker does); the tests are skipped only where SAEBench is not installed."""
    return pytest.importorskip("sae_bench.evals.core.main", reason=f"SAEBench is not installed: {SAEBENCH_INSTALL}")


@pytest.fixture(scope="module")
def lm_and_tokens():
    """A random 2-layer HookedTransformer (no download) and N_SEQ sequences of CTX tokens: BOS at position 0, as
    our harvest packs them, then random ids that are never BOS."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=CTX, d_head=4, n_heads=4, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (N_SEQ, CTX), generator=g)
    tokens[:, 0] = BOS
    return model, tokens


def _export(tmp_path, name: str, normalize: str):
    """Export a random SAE of architecture `name` (d_in D, 64 latents, k 4 where it has one) with non-trivial
    biases and thresholds, trained on `normalize`d inputs (scale 0.7 for "scalar")."""
    k = 4 if name in ("topk", "batchtopk") else None
    sae = build_sae(SAEConfig(d_in=D, d_sae=64, k=k, architecture=name, normalize=normalize))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.3)
        for p_name, p in sae.named_parameters():
            if p_name not in ("W_enc", "b_enc", "W_dec", "b_dec"):
                p.copy_(0.05 * torch.rand_like(p))
    return export_sae(sae.eval(), tmp_path / name, hook_name=HOOK, model_name="tiny-random", normalize=normalize,
                      scale=0.7 if normalize == "scalar" else None,
                      extra_cfg={"context_size": CTX, "dataset_path": "in-memory-tokens"})


def _run_core(core, adapter, model, tokens, ce: bool):
    """SAEBench's core evaluation as its `multiple_evals` runs it (minus the downloads): the SAE through
    `load_and_format_sae`, the tokens through SAELens' `ActivationsStore.from_sae`, BOS ignored."""
    from datasets import Dataset
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens.training.activations_store import ActivationsStore

    _, sae, _ = load_and_format_sae("sae-dist", adapter, "cpu")
    store = ActivationsStore.from_sae(model, sae, dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
                                      streaming=False, store_batch_size_prompts=N_SEQ, total_tokens=N_SEQ)
    flags = dict(compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
                 compute_featurewise_density_statistics=True, compute_featurewise_weight_based_metrics=True)
    cfg = CoreEvalConfig(batch_size_prompts=N_SEQ, n_eval_reconstruction_batches=1, n_eval_sparsity_variance_batches=1,
                         compute_kl=ce, compute_ce_loss=ce, **flags)
    return core.run_evals(sae, store, model, cfg, ignore_tokens={BOS})


@pytest.mark.parametrize(("name", "normalize"), [("topk", "layer_norm"), ("relu", "none"), ("jumprelu", "scalar"),
                                                 ("prolu", "none"), ("batchtopk", "layer_norm")])
def test_saebench_core_eval_on_the_adapter_matches_our_metrics(core, tmp_path, lm_and_tokens, name, normalize):
    model, tokens = lm_and_tokens
    out = _export(tmp_path, name, normalize)
    ref = load_sae(out)
    adapter = to_saebench(out)
    expected = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "prolu": "prolu", "batchtopk": "jumprelu"}
    assert adapter.cfg.architecture == ref.architecture == expected[name]
    metrics, per_latent = _run_core(core, adapter, model, tokens, ce=name == "topk")

    # our metrics on the same activations: positions 1.. of each sequence (BOS excluded, as in our harvest)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, D)
    with torch.no_grad():
        z = ref.encode(x)
        x_hat = ref.decode(z)
    ours = ReconstructionStats()
    ours.update(x, x_hat, l0=z)
    r = ours.result()
    n = r["n_tokens"]
    msg = f"{name}/{normalize}: SAEBench {metrics}, ours {r}"
    assert n == N_SEQ * (CTX - 1) and metrics["token_stats"]["total_tokens_eval_sparsity_variance"] == N_SEQ * CTX
    assert metrics["sparsity"]["l0"] == pytest.approx(r["l0"], rel=1e-6), msg
    assert metrics["sparsity"]["l1"] == pytest.approx(float(z.sum(-1).mean()), rel=1e-5), msg
    # SAEBench's "mse" of one batch is each token's squared error divided by the batch's token count, averaged
    assert metrics["reconstruction_quality"]["mse"] * n == pytest.approx(r["mse_per_token"], rel=1e-5), msg
    assert 0 < r["l0"] < 64 and r["mse_per_token"] > 0, msg  # latents fire, not all of them
    # SAEBench 0.6.0's explained_variance divides by E||x||^2 - (E||x||^2 / d_in)^2 (its per-dimension "mean" is
    # of x^2: SAELens issue #659), not by the variance around the mean that our fvu uses: the numerators agree
    sq = float(x.double().square().sum(-1).mean())
    ev = 1 - r["mse_per_token"] / (sq - (sq / D) ** 2)
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(ev, rel=1e-4, abs=1e-5), msg
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    assert metrics["reconstruction_quality"]["cossim"] == pytest.approx(float(cos), rel=1e-5), msg
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()),
                                                             rel=1e-5), msg
    torch.testing.assert_close(torch.tensor(per_latent["feature_density"]), (z > 0).float().mean(0))
    torch.testing.assert_close(torch.tensor(per_latent["encoder_bias"]), ref.b_enc.detach())
    if name == "topk":
        _check_ce(metrics, model, tokens, ref)


def _check_ce(metrics, model, tokens, ref):
    """SAEBench's CE losses (BOS-position losses left out) vs TransformerLens with the hook's activations replaced by
    `ref`'s reconstruction (`ref.forward`, one call per batch) or zeroed, computed here."""
    def loss(hook_fn=None):
        hooks = [(HOOK, hook_fn)] if hook_fn else []
        with torch.no_grad():
            per_token = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True, fwd_hooks=hooks)
        return float(per_token[:, 1:].mean())

    got = metrics["model_performance_preservation"]
    assert got["ce_loss_without_sae"] == pytest.approx(loss(), rel=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(loss(lambda act, hook: ref(act)), rel=1e-5)
    assert got["ce_loss_with_ablation"] == pytest.approx(loss(lambda act, hook: torch.zeros_like(act)), rel=1e-5)


def test_adapter_interface_and_cfg(tmp_path):
    out = _export(tmp_path, "topk", "layer_norm")
    ref = load_sae(out)
    adapter = to_saebench(ref, model_name="tl-name", dtype="float32")
    from sae_bench.custom_saes.base_sae import BaseSAE

    assert isinstance(adapter, BaseSAE) and adapter.check_decoder_norms()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the loaded model's own tensors, not copies
        assert getattr(adapter, name) is getattr(ref, name)
    c = adapter.cfg
    assert (c.model_name, c.hook_name, c.hook_layer, c.d_in, c.d_sae) == ("tl-name", HOOK, 0, D, 64)
    assert (c.context_size, c.dataset_path, c.prepend_bos, c.seqpos_slice) == (CTX, "in-memory-tokens", True, (1, None))
    assert c.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert (c.activation_fn_str, c.activation_fn_kwargs, c.normalize_activations) == ("topk", {"k": 4}, "layer_norm")
    assert c.dtype == "float32" and adapter.device == torch.device("cpu")
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    # SAELens' TopK forward written from its definition on the exported files (layer_norm: up to its eps)
    files, cfg_json = load_file(str(out / "sae_weights.safetensors")), json.loads((out / "cfg.json").read_text())
    y = saelens_topk_forward(files, cfg_json, x).float()
    tol = dict(atol=1e-3 * float(x.abs().max()), rtol=1e-3)
    torch.testing.assert_close(adapter(x), y, **tol)
    torch.testing.assert_close(adapter.decode(adapter.encode(x)), y, **tol)  # dense path
    assert adapter.encode(x).shape == (3, 5, 64) and int((adapter.encode(x) > 0).sum(-1).max()) <= 4
    half = to_saebench(out, dtype=torch.bfloat16)
    assert half.W_enc.dtype == half.sae.W_enc.dtype == torch.bfloat16 and half.cfg.dtype == "bfloat16"
    assert half.cfg.model_name == "tiny-random"


def test_adapter_errors(tmp_path):
    with pytest.raises(TypeError, match="export a training module"):
        to_saebench(torch.nn.Linear(2, 2))
    sae = build_sae(SAEConfig(d_in=D, d_sae=32, k=2))
    for hook, model, match in [("hook_embed", "m", r"hook_name='hook_embed' is not of the form 'blocks.<L>"),
                               (HOOK, None, r"names no model_name: pass to_saebench\(..., model_name=")]:
        out = export_sae(sae, tmp_path / str(hook), hook_name=hook, model_name=model, normalize="none")
        with pytest.raises(ValueError, match=match):
            to_saebench(out)
    with pytest.raises(ValueError, match="dtype='int8' is not a torch floating dtype"):
        to_saebench(out, model_name="m", dtype="int8")
