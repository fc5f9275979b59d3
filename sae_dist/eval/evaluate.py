"""End-to-end SAE evaluation on held-out text -> eval.json (its keys: docs/evaluation.md).

`evaluate` loads an exported SAE, packs held-out documents into sequences exactly as harvest does
(`packed_sequences(..., split="eval")`), and measures

* reconstruction (Gao et al. 2024 sec. 2.1; `sae_dist.eval.metrics`): fvu, normalized_mse,
  explained_variance, mse, l0, on the hook activations at positions >= 1 (position 0 = BOS, the
  attention sink, is never stored nor trained on);
* downstream loss (Gao et al. 2024 sec. 4.1; `sae_dist.eval.downstream`): CE clean / SAE-spliced /
  zero-ablated, CE loss score, KL(clean || spliced);
* dead latents: read from `training_state.json` beside the exported SAE (written by the trainer:
  `tokens_trained`, `dead_fraction`, `dead_fraction_window`), else measured over the eval tokens;
* probe loss (Gao et al. 2024 sec. 4.3; `sae_dist.eval.probes`): best single-latent logistic probe per
  binary token task derived from the eval text, against the constant-predictor baseline;
* ablation sparsity (Gao et al. 2024 sec. 4.5; `sae_dist.eval.ablation`): (L1/L2)^2 of the logit change
  when one latent is ablated at one token;
* N2G explainability (Gao et al. 2024 sec. 4.4; `sae_dist.eval.n2g`): n-gram explanations of a sample
  of latents fitted on the first half of the eval contexts, precision / recall on the other half;
* shrinkage (Gao et al. 2024 sec. 5.1; `sae_dist.eval.shrinkage`): growth of the activations when they
  are refined against the frozen decoder on their support;
* feature density: log10-density histogram and the fraction of dense latents.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from sae_dist.eval.ablation import ablation_sparsity
from sae_dist.eval.downstream import downstream_loss, eval_mode, module_device
from sae_dist.eval.metrics import LatentCodes, LatentFiringCounter, ReconstructionStats
from sae_dist.eval.n2g import n2g_metrics_from_codes
from sae_dist.eval.probes import probe_loss, token_task_labels
from sae_dist.eval.progressive import check_topk_sae, k_values_from_factors, progressive_curve
from sae_dist.eval.shrinkage import sae_shrinkage
from sae_dist.store.reader import normalize

__all__ = ["evaluate", "write_eval_json", "heldout_sequences", "CONTRACT_KEYS"]

#: The stable eval.json keys (docs/evaluation.md#evaljson-keys): later metrics add keys, never rename these.
CONTRACT_KEYS = (
    "fvu",
    "normalized_mse",
    "explained_variance",
    "l0",
    "dead_fraction",
    "ce_loss_clean",
    "ce_loss_sae",
    "ce_loss_zero_ablation",
    "ce_loss_score",
    "kl_div",
    "tokens_trained",
    "d_sae",
    "k",
    "d_in",
    "hook_name",
    "model",
    "eval_tokens",
)


def _sae_field(sae: nn.Module, cfg_json: dict, *names: str):
    """First of `names` found as an attribute of `sae`, of `sae.cfg` (object or dict), or in cfg.json."""
    cfg = getattr(sae, "cfg", None)
    for name in names:
        v = getattr(sae, name, None)
        if v is None and cfg is not None:
            v = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if v is None:
            v = cfg_json.get(name)
        if v is not None:
            return v
    return None


def heldout_sequences(docs, tokenizer, ctx_len: int, eval_tokens: int, eval_fraction: float) -> torch.Tensor:
    """The held-out contexts of sae-eval: int64 [N, ctx_len] token ids (BOS first), the first
    N = ceil(eval_tokens / (ctx_len - 1)) sequences of the eval split of `docs` packed as harvest packs them
    (`packed_sequences(..., split="eval")`: documents with `is_eval_document(text, eval_fraction)`), in corpus
    order, so the same every time. Fewer, with a warning, when the eval split is smaller.

    Raises ValueError (naming eval_fraction and ctx_len) when the eval split gives no sequence.
    """
    from sae_dist.harvest.text import packed_sequences

    per_seq = ctx_len - 1
    n_seq = math.ceil(eval_tokens / per_seq)
    seqs: list[list[int]] = []
    for s in packed_sequences(docs, tokenizer, ctx_len, eval_fraction=eval_fraction, split="eval"):
        seqs.append(s)
        if len(seqs) >= n_seq:
            break
    if not seqs:
        raise ValueError(
            f"no held-out sequences: no document of the corpus is in the eval split (eval_fraction="
            f"{eval_fraction}) with at least ctx_len-1={per_seq} tokens; raise eval_fraction, lower "
            "ctx_len, or use a larger corpus"
        )
    if len(seqs) < n_seq:
        warnings.warn(
            f"the eval split holds only {len(seqs)} sequences ({len(seqs) * per_seq} tokens) of the "
            f"{eval_tokens} eval_tokens asked for; evaluating on those",
            stacklevel=3,
        )
    return torch.tensor(seqs, dtype=torch.long)


def _read_training_state(sae_path: Path) -> dict | None:
    p = sae_path / "training_state.json"
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f)


@torch.no_grad()
def evaluate(
    *, sae_path: str | os.PathLike, model: nn.Module, tokenizer, hook_name: str | None = None, docs: Iterable[str],
    ctx_len: int = 64, eval_tokens: int = 16_384, eval_fraction: float = 0.05, batch_size: int = 32,
    device: str | torch.device = "cpu", model_name: str | None = None, progress: bool = True,
    probes: bool = True, probe_min_count: int = 20, ablation_latents: int = 16, ablation_occurrences: int = 4,
    ablation_positions: int = 16, ablation_seed: int = 0, shrinkage_tokens: int = 2048,
    shrinkage_support: str = "active", dense_threshold: float = 0.1, density_bins: int = 32,
    n2g_latents: int = 64, n2g_max_n: int = 4, n2g_min_precision: float = 0.5,
    lm_family: Iterable[dict] | None = None, model_compute: float | None = None,
    progressive_k_factors: Iterable[float] | None = None,
) -> dict[str, Any]:
    """Evaluate the exported SAE at `sae_path` on held-out text; returns the eval.json dict.

    Args: the fields of `_EvalOptions`, documented there, with the defaults above.
    Phases: `_load_target` -> `_reconstruction_pass` -> `downstream_loss` -> `_metrics` (one function
    per metric) -> `_eval_json`.

    Returns:
        dict with every CONTRACT key (`CONTRACT_KEYS`) plus `dead_fraction_window`, `dead_fraction_eval`,
        `mse`, `mse_per_token`, `variance_per_token`, `ce_loss_delta`, `kl_div_zero_ablation`,
        `ce_tokens`, `ctx_len`, `eval_sequences`, `eval_fraction`, `sae_path`, `architecture`,
        `normalized_mse_definition`, and the keys of the metrics above: `probe_loss`, `probe_baseline`,
        `probe_loss_per_task`, `probe_tasks_skipped`, `probe_min_count`; `ablation_sparsity`,
        `ablation_sparsity_fraction`, `ablation_latents`, `ablation_positions`, `ablation_vocab`,
        `ablation_count`, `ablation_zero_effect`, `ablation_per_latent`, `ablation_definition`;
        `shrinkage_ratio`, `shrinkage_fvu_encoder`, `shrinkage_fvu_refined`, `shrinkage_fvu_gain`,
        `shrinkage_tokens`, `shrinkage_support`; `n2g_precision`, `n2g_recall`, `n2g_f1`, `n2g_latents`
        (scored latents), `n2g_latents_sampled`, `n2g_heldout_contexts`; `equivalent_compute`,
        `equivalent_compute_fraction`, `equivalent_compute_note`, `lm_family_fit`, `lm_family_ce`;
        `progressive` (`sae_dist.eval.progressive.progressive_curve`'s dict, or None);
        `density_histogram` ({"log10_density_bin_edges", "counts", "n_dead"}), `dense_fraction`,
        `dense_threshold`; `metric_seconds` (wall time of each of these metrics). A metric that is turned
        off has None values. Floats are Python floats; `eval_tokens` is the number of tokens actually
        evaluated (reconstruction); `ce_tokens` the number of predictions in the CE averages.
        `tokens_trained` is None when neither training_state.json nor cfg.json records it.

    Raises:
        ValueError: hook width != SAE d_in (names both), non-finite activations (names the sequence
            range), empty eval split, ctx_len < 3, an option of the metrics above out of range.
        FileNotFoundError: no exported SAE at `sae_path` (from `load_sae`).
    """
    o = _EvalOptions(**locals())  # every keyword argument above, by name
    _check_eval_options(o)
    target = _load_target(o)
    if target.sae_hook is not None and target.sae_hook != target.spec.name:
        warnings.warn(f"evaluating at hook {target.spec.name!r}, but the SAE was trained at {target.sae_hook!r}",
                      stacklevel=2)
    sequences = heldout_sequences(docs, tokenizer, int(ctx_len), int(eval_tokens), float(eval_fraction))
    acc = _reconstruction_pass(o, target, sequences)
    down = downstream_loss(model, target.sae, target.spec.name, sequences, batch_size=batch_size, device=target.device,
                           skip_positions=1, progress=progress)
    extra = _metrics(o, target, sequences, acc, down)
    return _eval_json(o, target, sequences, acc, down, extra)


@dataclass(frozen=True)
class _EvalOptions:
    """The keyword arguments of `evaluate`, by name; their defaults are in its signature.

    Fields:
        sae_path: directory with `cfg.json` + `sae_weights.safetensors` (and optionally the trainer's
            `training_state.json`).
        model: the HF causal LM the SAE was trained on (already loaded, e.g. by `load_lm`).
        tokenizer: its tokenizer.
        hook_name: hook name; None -> the SAE's `hook_name` from cfg.json. A hook different from the SAE's
            `hook_name` gives a warning.
        docs: iterable of document strings (the same corpus and order as harvest; only documents with
            `is_eval_document(text, eval_fraction)` are used).
        ctx_len: sequence length incl. BOS (as in harvest); each sequence gives ctx_len - 1 eval tokens.
        eval_tokens: eval tokens wanted; ceil(eval_tokens / (ctx_len - 1)) sequences are used (fewer,
            with a warning, if the eval split is smaller).
        eval_fraction: held-out fraction of documents (must match harvest's `data.eval_fraction`).
        batch_size: sequences per LM forward.
        device: device of the LM inputs and of the loaded SAE ("cpu", "cuda", ...).
        model_name: recorded as `model`; None -> cfg.json `model_name`, else the LM's `name_or_path`.
        progress: tqdm progress bars.
        probes: compute the probe loss (Gao et al. 2024 sec. 4.3; `sae_dist.eval.probes`).
        probe_min_count: a probe task needs at least this many positive and negative eval tokens.
        ablation_latents: latents ablated for the ablation sparsity (sec. 4.5; `sae_dist.eval.ablation`);
            0 turns it off.
        ablation_occurrences: firing tokens ablated per latent.
        ablation_positions: T, logit positions per ablation (the paper's 16).
        ablation_seed: seed of the latent / occurrence draws and of the shrinkage token sample.
        shrinkage_tokens: eval tokens sampled for the shrinkage refinement (sec. 5.1;
            `sae_dist.eval.shrinkage`); 0 turns it off.
        shrinkage_support: "active" (refine on each token's active latents) or "all".
        dense_threshold: a latent firing on more than this fraction of eval tokens is dense.
        density_bins: bins of the log10-density histogram over [-8, 0].
        n2g_latents: latents explained by N2G (sec. 4.4; `sae_dist.eval.n2g`), drawn with
            `ablation_seed` among those firing on the fit half of the eval contexts; 0 turns it off.
        n2g_max_n: longest n-gram of an explanation. n2g_min_precision: fit precision an n-gram needs.
        lm_family: for the "equivalent compute" framing of the downstream loss (sec. 4.1;
            `sae_dist.eval.equivalent_compute`): >= 2 dicts {"name", "model" (a loaded causal LM with
            the evaluated model's tokenizer, on any device: each is moved to `device` for its clean CE on the
            eval sequences and back, one at a time), "compute" (pretraining FLOPs) or "params" +
            "train_tokens" (6ND)}. None / empty: off.
        model_compute: pretraining FLOPs of the evaluated model (for `equivalent_compute_fraction`);
            None: the family member whose name equals `model_name`, else the fraction is None.
        progressive_k_factors: progressive recovery (sec. 5.3; `sae_dist.eval.progressive`), TopK SAEs
            only: the curve at k' = round(f * k) for each factor f, and the one-threshold JumpReLU at the
            same L0s, on the eval tokens. None / empty: off (`progressive` is None).
    """

    sae_path: str | os.PathLike
    model: nn.Module
    tokenizer: Any
    hook_name: str | None
    docs: Iterable[str]
    ctx_len: int
    eval_tokens: int
    eval_fraction: float
    batch_size: int
    device: str | torch.device
    model_name: str | None
    progress: bool
    probes: bool
    probe_min_count: int
    ablation_latents: int
    ablation_occurrences: int
    ablation_positions: int
    ablation_seed: int
    shrinkage_tokens: int
    shrinkage_support: str
    dense_threshold: float
    density_bins: int
    n2g_latents: int
    n2g_max_n: int
    n2g_min_precision: float
    lm_family: Iterable[dict] | None
    model_compute: float | None
    progressive_k_factors: Iterable[float] | None


@dataclass(frozen=True)
class _Target:
    """The SAE under evaluation and where it reads: the loaded `sae` (eval mode) from `sae_dir`, its
    canonical `cfg_json`, d_in, d_sae and k (None for a non-TopK SAE), the hook it was trained at
    (`sae_hook`, None when cfg.json has none), the resolved hook `spec`, the recorded `model_name`,
    the LM input `device` and the SAE's own `sae_device`."""

    sae: nn.Module
    sae_dir: Path
    cfg_json: dict
    d_in: int
    d_sae: int
    k: int | None
    sae_hook: str | None
    spec: Any  # sae_dist.harvest.hooks.HookSpec
    model_name: str | None
    device: torch.device
    sae_device: torch.device


@dataclass
class _Accumulated:
    """What the reconstruction pass gathers over the eval tokens (positions >= 1): reconstruction
    stats (raw and, for layer_norm SAEs, in the normalised space: `stats_norm` is `stats` otherwise),
    latent firing counts, the latent codes (None when no metric needs them), the fp32 [rows, d_in]
    activations sampled for shrinkage, and the progressive k' values with their activations (None: off)."""

    stats: ReconstructionStats
    stats_norm: ReconstructionStats
    per_token_norm: bool
    firing: LatentFiringCounter
    codes: LatentCodes | None
    shrink_rows: torch.Tensor  # bool [n_seq * (ctx_len - 1)]: the rows sampled for shrinkage
    shrink_x: list[torch.Tensor]
    prog_k: list[int] | None
    prog_x: list[torch.Tensor] | None


def _check_eval_options(o: _EvalOptions) -> None:
    """ValueError naming the first option of `evaluate` out of range (ctx_len >= 3, eval_tokens >= 1,
    batch_size >= 1, the metric options, the n2g options), before anything is loaded."""
    if int(o.ctx_len) < 3:
        raise ValueError(f"ctx_len must be >= 3 for the downstream loss (BOS + 2 tokens), got {o.ctx_len}")
    if int(o.eval_tokens) < 1:
        raise ValueError(f"eval_tokens must be >= 1, got {o.eval_tokens}")
    if int(o.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {o.batch_size}")
    _check_metric_options(o.probe_min_count, o.ablation_latents, o.ablation_occurrences, o.ablation_positions,
                          o.shrinkage_tokens, o.shrinkage_support, o.dense_threshold, o.density_bins)
    if int(o.n2g_latents) < 0 or int(o.n2g_max_n) < 1 or not (0.0 < float(o.n2g_min_precision) <= 1.0):
        raise ValueError(f"n2g options out of range: n2g_latents={o.n2g_latents} (>= 0), n2g_max_n={o.n2g_max_n} "
                         f"(>= 1), n2g_min_precision={o.n2g_min_precision} (in (0, 1])")


def _load_target(o: _EvalOptions) -> _Target:
    """Load the SAE at o.sae_path and resolve its hook on o.model (o.hook_name, else cfg.json's hook_name).
    Raises FileNotFoundError without an export, ValueError when it records no d_in / d_sae or no hook
    is known."""
    from sae_dist.harvest.hooks import resolve_hook
    from sae_dist.sae.export import load_sae

    sae_dir = Path(o.sae_path)
    device = torch.device(o.device)
    sae = load_sae(str(sae_dir), device=device)
    sae.eval()
    # the canonical cfg: SAELens saves nest hook_name / model_name under "metadata"
    cfg_json: dict = dict(getattr(sae, "cfg", None) or {})
    if not cfg_json and (sae_dir / "cfg.json").is_file():
        from sae_dist.sae.formats import read_sae_cfg

        cfg_json = read_sae_cfg(sae_dir)
    d_in = _sae_field(sae, cfg_json, "d_in")
    d_sae = _sae_field(sae, cfg_json, "d_sae")
    if d_in is None or d_sae is None:
        raise ValueError(
            f"the SAE at {str(sae_dir)!r} records no d_in/d_sae (got d_in={d_in}, d_sae={d_sae}); "
            "re-export it with sae_dist.sae.export.export_sae"
        )
    k = _sae_field(sae, cfg_json, "k")
    sae_hook = cfg_json.get("hook_name")
    hook = o.hook_name
    if hook is None:
        if sae_hook is None:
            raise ValueError(f"no hook given and {sae_dir / 'cfg.json'} has no hook_name; pass hook_name=")
        hook = sae_hook
    spec = resolve_hook(o.model, hook)
    model_name = o.model_name
    if model_name is None:
        model_name = cfg_json.get("model_name") or getattr(getattr(o.model, "config", None), "_name_or_path", None)
    return _Target(sae=sae, sae_dir=sae_dir, cfg_json=cfg_json, d_in=int(d_in), d_sae=int(d_sae),
                   k=int(k) if k is not None else None, sae_hook=sae_hook, spec=spec, model_name=model_name,
                   device=device, sae_device=module_device(sae, torch.device(device)))


def _accumulators(o: _EvalOptions, target: _Target, n_rows: int) -> _Accumulated:
    """Empty accumulators of the reconstruction pass over n_rows eval tokens; the shrinkage rows drawn
    with ablation_seed; progressive recovery checked (a TopK SAE, valid factors: ValueError) before
    the LM passes."""
    d_in, d_sae, dev = target.d_in, target.d_sae, target.sae_device
    stats = ReconstructionStats(d_in, device=dev)
    # the same fvu in the space the SAE was trained in (the paper reports MSE on normalised inputs);
    # only per-token layer_norm changes it: a scalar scale cancels in the fvu ratio
    per_token_norm = target.cfg_json.get("normalize_activations") == "layer_norm"
    shrink_rows = torch.zeros(n_rows, dtype=torch.bool)
    if int(o.shrinkage_tokens) > 0:
        gen = torch.Generator().manual_seed(int(o.ablation_seed))
        shrink_rows[torch.randperm(n_rows, generator=gen)[: int(o.shrinkage_tokens)]] = True
    prog_k = k_values_from_factors(check_topk_sae(target.sae), list(o.progressive_k_factors), d_sae) \
        if o.progressive_k_factors else None
    return _Accumulated(
        stats=stats, stats_norm=ReconstructionStats(d_in, device=dev) if per_token_norm else stats,
        per_token_norm=per_token_norm, firing=LatentFiringCounter(d_sae, device=dev),
        codes=LatentCodes(d_sae) if (o.probes or int(o.ablation_latents) > 0 or int(o.n2g_latents) > 0) else None,
        shrink_rows=shrink_rows, shrink_x=[], prog_k=prog_k, prog_x=None if prog_k is None else [],
    )


def _reconstruction_pass(o: _EvalOptions, target: _Target, sequences: torch.Tensor) -> _Accumulated:
    """One LM + SAE pass over the eval sequences (batch_size at a time, the model in eval mode and
    restored after): the hook activations at positions >= 1, fp32 on the SAE's device, fed to
    `_accumulate`. ValueError for a hook width != d_in or non-finite activations."""
    from sae_dist.harvest.hooks import run_to_hook

    n_seq, t = sequences.shape
    acc = _accumulators(o, target, n_seq * (t - 1))
    batch_size, model = o.batch_size, o.model
    starts = range(0, n_seq, batch_size)
    if o.progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval: reconstruction", unit="batch")
    with eval_mode(model):
        for i in starts:
            ids = sequences[i : i + batch_size].to(target.device)
            acts = run_to_hook(model, target.spec, ids)
            _check_activations(target, acts, i, batch_size, ids.shape[0])
            x32 = acts[:, 1:, :].reshape(-1, target.d_in).to(device=target.sae_device, dtype=torch.float32)
            _accumulate(target.sae, acc, x32, row0=i * (t - 1))
    return acc


def _check_activations(target: _Target, acts: torch.Tensor, i: int, batch_size: int, n: int) -> None:
    """ValueError when the hook activations [n, t, width] of sequences [i, i + n) have a width other
    than d_in (names the hook, model and SAE) or are not finite at positions >= 1 (names a sequence)."""
    if acts.shape[-1] != target.d_in:
        raise ValueError(
            f"hook {target.spec.name!r} of model {target.model_name!r} has width {acts.shape[-1]}, but the SAE at "
            f"{str(target.sae_dir)!r} has d_in={target.d_in}; evaluate the SAE on the model and hook it was trained "
            f"on (its cfg.json: hook_name={target.sae_hook!r}, model_name={target.cfg_json.get('model_name')!r})"
        )
    finite = torch.isfinite(acts[:, 1:, :])
    if not finite.all():
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"non-finite (NaN/Inf) activations at hook {target.spec.name!r} in batch {i // batch_size} "
            f"(sequences [{i}, {i + n})), e.g. sequence {i + bad[0]}; the LM overflows "
            "in its dtype on these inputs (try dtype=float32)"
        )


def _accumulate(sae: nn.Module, acc: _Accumulated, x32: torch.Tensor, row0: int) -> None:
    """Add one batch of fp32 activations [rows, d_in] (eval rows row0..) to the accumulators: the
    reconstruction stats, firing counts and codes, the shrinkage sample and the progressive inputs."""
    take = acc.shrink_rows[row0 : row0 + x32.shape[0]].to(x32.device)
    if bool(take.any()):
        acc.shrink_x.append(x32[take])
    if acc.prog_x is not None:
        acc.prog_x.append(x32)
    if hasattr(sae, "encode_sparse") and hasattr(sae, "decode_sparse"):
        # TopK family: one encoder pass; decode_sparse(encode_sparse(x)) == forward(x)
        values, indices = sae.encode_sparse(x32)
        x_hat = sae.decode_sparse(values, indices)
        acc.stats.update(x32, x_hat, l0=(values != 0).sum(1))
        acc.firing.update_sparse(values, indices)
        if acc.codes is not None:
            acc.codes.add_sparse(values, indices)
    else:
        z = sae.encode(x32)
        x_hat = sae(x32)
        acc.stats.update(x32, x_hat, l0=z)
        acc.firing.update_dense(z)
        if acc.codes is not None:
            acc.codes.add_dense(z)
    if acc.per_token_norm:
        acc.stats_norm.update(*_layer_norm_pair(x32, x_hat))


def _metrics(o: _EvalOptions, target: _Target, sequences: torch.Tensor, acc: _Accumulated,
             down: dict[str, Any]) -> dict[str, Any]:
    """The eval.json keys of the metrics after reconstruction and downstream loss, in this order:
    probes, ablation, shrinkage, n2g, progressive, equivalent compute (each timed in
    metric_seconds), then the density histogram and dense fraction."""
    extra: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, keys) -> None:
        clock = time.perf_counter()
        extra.update(keys())
        seconds[name] = time.perf_counter() - clock

    timed("probes", lambda: _probe_keys(o, sequences, acc.codes))
    timed("ablation", lambda: _ablation_keys(o, target, sequences, acc.codes))
    timed("shrinkage", lambda: _shrinkage_keys(o, target.sae, acc.shrink_x))
    timed("n2g", lambda: _n2g_keys(o, sequences, acc.codes))
    timed("progressive", lambda: {"progressive": None if acc.prog_x is None
                                  else progressive_curve(target.sae, torch.cat(acc.prog_x), acc.prog_k)})
    timed("equivalent_compute", lambda: _equivalent_compute(
        o.lm_family, o.model_compute, target.model_name, down["ce_loss_sae"], sequences,
        batch_size=o.batch_size, device=target.device))
    hist, edges, n_dead = acc.firing.log10_density_histogram(bins=int(o.density_bins), range_=(-8.0, 0.0))
    extra["density_histogram"] = {"log10_density_bin_edges": edges.tolist(), "counts": hist.tolist(),
                                  "n_dead": int(n_dead)}
    extra["dense_fraction"] = float((acc.firing.density() > float(o.dense_threshold)).mean())
    extra["dense_threshold"] = float(o.dense_threshold)
    extra["metric_seconds"] = seconds
    return extra


def _probe_keys(o: _EvalOptions, sequences: torch.Tensor, codes: LatentCodes | None) -> dict[str, Any]:
    """Probe loss (sec. 4.3) on the binary token tasks of the eval text; None values when off."""
    if not o.probes:
        return {"probe_loss": None, "probe_baseline": None, "probe_loss_per_task": {},
                "probe_tasks_skipped": {}, "probe_min_count": int(o.probe_min_count)}
    labels, valid = token_task_labels(sequences, o.tokenizer, skip_positions=1)
    return probe_loss(codes, labels, valid, min_count=int(o.probe_min_count))


def _ablation_keys(o: _EvalOptions, target: _Target, sequences: torch.Tensor,
                   codes: LatentCodes | None) -> dict[str, Any]:
    """Ablation sparsity (sec. 4.5) and its definition; None values when ablation_latents is 0."""
    if int(o.ablation_latents) > 0:
        keys = ablation_sparsity(
            o.model, target.sae, target.spec.name, sequences, codes=codes, n_ablated=int(o.ablation_latents),
            occurrences=int(o.ablation_occurrences), positions=int(o.ablation_positions),
            seed=int(o.ablation_seed), batch_size=min(int(o.batch_size), 8), device=target.device,
            skip_positions=1,
        )
    else:
        keys = {"ablation_sparsity": None, "ablation_sparsity_fraction": None, "ablation_latents": []}
    keys["ablation_definition"] = (
        "Gao et al. 2024 sec. 4.5: one latent set to 0 at one token of the SAE-spliced forward; logit change at "
        "that token and the next ablation_positions-1, minus each position's median; ablation_sparsity = "
        "(L1/L2)^2 of the concatenated changes (effective number of logits affected), "
        "ablation_sparsity_fraction = that / (vocab * positions); mean over a latent's ablations, then over latents"
    )
    return keys


def _shrinkage_keys(o: _EvalOptions, sae: nn.Module, shrink_x: list[torch.Tensor]) -> dict[str, Any]:
    """Shrinkage (sec. 5.1) on the sampled eval tokens; None values when none were sampled."""
    if shrink_x:
        return sae_shrinkage(sae, torch.cat(shrink_x), support=o.shrinkage_support)
    return {"shrinkage_ratio": None, "shrinkage_fvu_encoder": None, "shrinkage_fvu_refined": None,
            "shrinkage_fvu_gain": None, "shrinkage_tokens": 0, "shrinkage_support": o.shrinkage_support}


def _n2g_keys(o: _EvalOptions, sequences: torch.Tensor, codes: LatentCodes | None) -> dict[str, Any]:
    """N2G explainability (sec. 4.4) and its definition; None values when n2g_latents is 0."""
    if int(o.n2g_latents) > 0:
        # contexts = the eval sequences without the BOS position, exactly the rows `codes` holds
        keys = n2g_metrics_from_codes(
            sequences[:, 1:], codes, n_sampled=int(o.n2g_latents), seed=int(o.ablation_seed), heldout_fraction=0.5,
            max_n=int(o.n2g_max_n), min_precision=float(o.n2g_min_precision))
    else:
        keys = {"n2g_precision": None, "n2g_recall": None, "n2g_f1": None, "n2g_latents": 0,
                "n2g_latents_sampled": [], "n2g_heldout_contexts": 0}
    keys["n2g_definition"] = (
        "Gao et al. 2024 sec. 4.4 (N2G, Foote et al. 2023): n-gram explanations (<= n2g_max_n tokens, one "
        "interior wildcard) fitted on the first half of the eval contexts; a latent is predicted to fire where "
        "one of its n-grams ends; precision / recall / F1 on the second half, averaged over sampled latents that "
        "fire there"
    )
    return keys


def _dead_fraction(target: _Target, firing: LatentFiringCounter, n_eval: int) -> tuple[float, str, Any, float]:
    """(dead_fraction, dead_fraction_window, tokens_trained, dead_fraction_eval): the trainer's
    training_state.json beside the SAE when it records them, else measured on the n_eval eval tokens
    (tokens_trained: training_state.json, else cfg.json, else None)."""
    state = _read_training_state(target.sae_dir)
    dead_eval = firing.dead_fraction()
    if state is not None and state.get("dead_fraction") is not None:
        dead_fraction = float(state["dead_fraction"])
        window = state.get("dead_fraction_window", "training (window not recorded)")
    else:
        dead_fraction = dead_eval
        window = (
            f"no fire on the {n_eval} eval tokens (training_state.json not found beside the SAE, so the "
            "training-time window is unknown)"
        )
    return dead_fraction, window, (state or {}).get("tokens_trained", target.cfg_json.get("tokens_trained")), dead_eval


def _eval_json(o: _EvalOptions, target: _Target, sequences: torch.Tensor, acc: _Accumulated,
               down: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The eval.json dict (keys: `evaluate`): CONTRACT_KEYS first, then the extras."""
    recon = acc.stats.result()
    n_eval = recon["n_tokens"]
    dead_fraction, window, tokens_trained, dead_eval = _dead_fraction(target, acc.firing, n_eval)
    n_seq, t = sequences.shape
    return {
        "fvu": recon["fvu"],
        "normalized_mse": recon["normalized_mse"],
        "explained_variance": recon["explained_variance"],
        "l0": recon["l0"],
        "dead_fraction": dead_fraction,
        **{key: down[key] for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablation", "ce_loss_score",
                                      "kl_div")},
        "tokens_trained": None if tokens_trained is None else int(tokens_trained),
        "d_sae": target.d_sae,
        "k": target.k,
        "d_in": target.d_in,
        "hook_name": target.spec.name,
        "model": target.model_name,
        # the names of earlier releases, written for one more release (docs/evaluation.md)
        "n_latents": target.d_sae,
        "hook": target.spec.name,
        "eval_tokens": int(n_eval),
        # extras
        "fvu_normalized_inputs": acc.stats_norm.result()["fvu"],
        "dead_fraction_window": window,
        "dead_fraction_eval": dead_eval,
        **{key: recon[key] for key in ("mse", "mse_per_token", "variance_per_token")},
        **{key: down[key] for key in ("ce_loss_delta", "kl_div_zero_ablation", "ce_tokens")},
        "ctx_len": int(t),
        "eval_sequences": int(n_seq),
        "eval_fraction": float(o.eval_fraction),
        "architecture": target.cfg_json.get("architecture"),
        "sae_path": str(target.sae_dir),
        "normalized_mse_definition": (
            "MSE / MSE of predicting the eval-set mean activation (Gao et al. 2024 sec. 2.1); equals fvu"
        ),
        **extra,
    }


def _equivalent_compute(lm_family, model_compute, model_name, ce_sae, sequences, *, batch_size, device) -> dict:
    """eval.json keys of the equivalent-compute framing (Gao et al. 2024 sec. 4.1) for `evaluate`."""
    from sae_dist.eval.equivalent_compute import clean_cross_entropy, equivalent_compute, member_compute

    family = list(lm_family or [])
    if not family:
        return {"equivalent_compute": None, "equivalent_compute_fraction": None, "lm_family_fit": None,
                "lm_family_ce": {}, "equivalent_compute_note": "no LM family given (eval.lm_family)"}
    if len(family) < 2:
        raise ValueError(f"eval.lm_family needs >= 2 members of one LM family, got {len(family)}: "
                         f"{[m.get('name') for m in family]}")
    computes = [member_compute(m) for m in family]
    ce = {}
    for m in family:  # one member on the evaluation's device at a time, then back where it was
        model = m["model"]
        home = next(model.parameters()).device
        ce[str(m["name"])] = clean_cross_entropy(model.to(device), sequences, batch_size=batch_size, device=device)
        model.to(home)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if model_compute is None:
        own = [c for m, c in zip(family, computes, strict=True) if str(m["name"]) == str(model_name)]
        model_compute = own[0] if own else None
    out = equivalent_compute(ce_sae, computes, list(ce.values()), model_compute if model_compute else 1.0)
    if model_compute is None:
        out["equivalent_compute_fraction"] = None
    out["lm_family_ce"] = ce
    out["lm_family_compute"] = {str(m["name"]): c for m, c in zip(family, computes, strict=True)}
    out["model_compute"] = model_compute
    return out


def _check_metric_options(probe_min_count, ablation_latents, ablation_occurrences, ablation_positions,
                          shrinkage_tokens, shrinkage_support, dense_threshold, density_bins) -> None:
    """ValueError naming the option, its value and the valid range for a bad metric option."""
    for name, v, lo in (("probe_min_count", probe_min_count, 1), ("ablation_latents", ablation_latents, 0),
                        ("ablation_occurrences", ablation_occurrences, 1),
                        ("ablation_positions", ablation_positions, 1), ("shrinkage_tokens", shrinkage_tokens, 0),
                        ("density_bins", density_bins, 1)):
        if int(v) < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v}")
    if shrinkage_support not in ("active", "all"):
        raise ValueError(f"shrinkage_support must be 'active' or 'all', got {shrinkage_support!r}")
    if not (0.0 < float(dense_threshold) <= 1.0):
        raise ValueError(f"dense_threshold must be in (0, 1], got {dense_threshold}")


def _layer_norm_pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_n, x_hat_n): x and its reconstruction mapped with x's own per-token layer norm
    (`sae_dist.store.reader.normalize`, mode "layer_norm"), i.e. into the space the SAE was trained in."""
    x_n, ctx = normalize(x, "layer_norm")
    return x_n, (x_hat - ctx["mean"]) * (math.sqrt(x.shape[-1]) / ctx["norm"])


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()  # numpy scalars
        except (TypeError, ValueError):
            pass
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def write_eval_json(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Write `result` to `path` as JSON (indent 2) with plain floats/ints; NaN/Inf become null
    (strict JSON has no NaN). Creates parent directories; writes atomically (temp file + rename).

    Returns the path written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_plain(result), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, p)
    return str(p)
