"""Sparsity of ablation effects (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 4.5).

The paper's definition (sec. 4.5, "Sparsity of ablation effects"): at a token index, take the SAE
latents of the residual stream and ablate the latents one at a time; compare the LM's logits before
and after the ablation. That gives V logit differences (V = vocabulary size) per ablation and affected
token. Since adding a constant to all logits of a position does not change its softmax, the median
logit difference of each position is subtracted. The differences at T positions (the ablated index and
the following ones; the paper uses T = 16) are concatenated into one vector of V*T numbers, whose
sparsity is measured by (L1/L2)^2 - an "effective number of logits affected" - and normalised by V*T
to a fraction in (0, 1]; smaller = sparser downstream effects. The paper reports it averaged.

What this module does (choices the paper leaves open are marked *ours*):

* "before" is the SAE-spliced forward pass (*ours*, as `sae_dist.eval.downstream`): the hook's
  activation at every position >= skip_positions is replaced by the SAE reconstruction x^; "after"
  is the same pass with latent j's activation set to 0 at the ablated index only, i.e. that position's
  reconstruction decoded from the ablated code (for a "none"-normalised SAE, x^ - z_j W_dec[j]).
  Position 0 (BOS, the attention sink) is never spliced nor ablated.
* latents and token indices (*ours*): `n_ablated` latents are drawn (seeded, without replacement) from
  those that fire on at least one eligible eval token; for each, up to `occurrences` of its firing
  tokens are drawn. A token index i is eligible if all T positions i .. i+T-1 exist in its sequence
  (T = min(positions, ctx_len - skip_positions)).
* per ablation: delta [T, V] = logits_after - logits_before at positions i .. i+T-1 (float32 logits
  whatever the LM's dtype: `fp32_logits` computes the output projection in float32, since a bf16 logit's
  rounding step at logits of 4-32, 0.03-0.125, is as large as a single latent's effect; float64
  arithmetic), minus each row's median (torch's lower median for even V), then
  S = (||delta||_1 / ||delta||_2)^2 in [1, V*T] and S / (V*T). An ablation that changes no logit
  (delta == 0 after the median) has no defined S; it is counted (`ablation_zero_effect`) and left out.
* averaging (*ours*): mean over a latent's ablations, then mean over latents (each latent weighs the
  same).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sae_dist.eval.downstream import eval_mode, module_device, replace_after
from sae_dist.eval.metrics import LatentCodes

__all__ = ["effective_logit_count", "ablation_sparsity", "collect_codes", "fp32_logits"]


@contextmanager
def fp32_logits(model: nn.Module) -> Iterator[None]:
    """Within the context the LM's logits [B, T, V] are float32 computed from the final hidden states:
    `model.get_output_embeddings()` (a Linear) is recomputed in float32 by a forward hook, and what the
    model applies after it (e.g. Gemma 2's logit soft-capping) then runs in float32 too. A no-op for a
    float32 head or a model without `get_output_embeddings`. Memory: one float32 copy of the head's
    weight for the context (V x d_model x 4 bytes, e.g. 2 GiB for a 128k x 4096 head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight.dtype == torch.float32:
        yield
        return
    w = head.weight.float()
    b = None if getattr(head, "bias", None) is None else head.bias.float()
    handle = head.register_forward_hook(lambda module, args, out: F.linear(args[0].float(), w, b))
    try:
        yield
    finally:
        handle.remove()


def effective_logit_count(delta: torch.Tensor, subtract_median: bool = True) -> float:
    """(L1/L2)^2 of the logit-difference vector of one ablation (Gao et al. 2024 sec. 4.5).

    Args:
        delta: logit differences [T, V] (any float dtype; computed in float64). One row per affected
            position, one column per vocabulary entry.
        subtract_median: subtract each row's median first (a constant shift of a row does not change
            its softmax).

    Returns:
        (sum |delta| / sqrt(sum delta^2))^2, a float in [1, T*V]; NaN when delta is all zero.

    Raises:
        ValueError: delta not 2-D.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be [T, V], got shape {tuple(delta.shape)}")
    d = delta.to(torch.float64)
    if subtract_median:
        d = d - d.median(dim=1, keepdim=True).values
    l2sq = float(d.square().sum())
    if l2sq == 0.0:
        return math.nan
    return float(d.abs().sum()) ** 2 / l2sq


@torch.no_grad()
def collect_codes(model: nn.Module, sae: nn.Module, hook_name: str, sequences: torch.Tensor, *, batch_size: int = 8,
                  device: str | torch.device = "cpu", skip_positions: int = 1) -> LatentCodes:
    """The SAE's codes on the hook activations of `sequences` [N, T] at positions >= skip_positions,
    in row-major (sequence, position) order: token row = n * (T - skip_positions) + (pos - skip_positions)."""
    from sae_dist.harvest.hooks import resolve_hook, run_to_hook

    spec = resolve_hook(model, hook_name)
    sae_device = module_device(sae, torch.device(device))
    codes = LatentCodes(int(sae.d_sae))
    for i in range(0, sequences.shape[0], batch_size):
        acts = run_to_hook(model, spec, sequences[i : i + batch_size].to(device))
        x = acts[:, skip_positions:, :].reshape(-1, acts.shape[-1]).to(sae_device, torch.float32)
        if hasattr(sae, "encode_sparse"):
            codes.add_sparse(*sae.encode_sparse(x))
        else:
            codes.add_dense(sae.encode(x))
    return codes


def _ablation_splice(sae: nn.Module, sae_device: torch.device, skip: int, ablate: list[tuple[int, int, int]] | None):
    """Hook fn: a [B, L, d] -> a with positions >= skip replaced by the SAE reconstruction; `ablate`
    lists (batch row, position, latent) whose activation is set to 0 before decoding."""

    def fn(a: torch.Tensor) -> torch.Tensor:
        m = a.shape[1] - skip

        def rows(x: torch.Tensor) -> torch.Tensor:
            if hasattr(sae, "encode_sparse") and hasattr(sae, "decode_sparse"):
                vals, idx = sae.encode_sparse(x)
                x_hat = sae.decode_sparse(vals, idx)
                if ablate:
                    vals = vals.clone()
                    for r, pos, j in ablate:
                        row = r * m + pos - skip
                        vals[row] = torch.where(idx[row] == j, torch.zeros_like(vals[row]), vals[row])
                    x_abl = sae.decode_sparse(vals, idx)
            else:
                z = sae.encode(x)
                x_hat = sae.decode(z)
                if ablate:
                    z = z.clone()
                    for r, pos, j in ablate:
                        z[r * m + pos - skip, j] = 0
                    x_abl = sae.decode(z)
            if ablate:
                sel = torch.tensor([r * m + pos - skip for r, pos, _ in ablate], device=x_hat.device)
                x_hat = x_hat.clone()
                x_hat[sel] = x_abl[sel]  # every other row stays bit-identical to the "before" pass
            return x_hat

        return replace_after(a, skip, sae_device, rows)

    return fn


@torch.no_grad()
def ablation_sparsity(
    model: nn.Module, sae: nn.Module, hook_name: str, sequences: torch.Tensor, *, codes: LatentCodes | None = None,
    n_ablated: int = 16, occurrences: int = 4, positions: int = 16, seed: int = 0, batch_size: int = 8,
    device: str | torch.device = "cpu", skip_positions: int = 1, subtract_median: bool = True,
    return_details: bool = False,
) -> dict[str, Any]:
    """Sparsity of the downstream effect of ablating single latents (Gao et al. 2024 sec. 4.5;
    definition and our choices in the module docstring).

    Args:
        model: HF causal LM (returns `.logits` [B, L, V]).
        sae: exported SAE (`sae_dist.load_sae`): encode/decode, or encode_sparse/decode_sparse (TopK);
            it has `d_sae`.
        hook_name: hook name (`sae_dist.harvest.hooks` scheme).
        sequences: int64 [N, T] token ids (position 0 = BOS).
        codes: the SAE's codes on `sequences` (`collect_codes` order); None -> computed here.
        n_ablated: latents to ablate (0 -> off: returns {}); fewer if fewer latents fire.
        occurrences: firing tokens ablated per latent (at most).
        positions: T, logit positions per ablation (the ablated one and the following T-1).
        seed: seed of the latent / occurrence draws.
        batch_size: ablations per forward (each costs two forwards of at most T' = i + T tokens).
        device: device of the token ids.
        skip_positions: leading positions left clean (BOS).
        subtract_median: subtract each position's median logit difference (the paper does).
        return_details: also return `ablation_details`, one dict per ablation (latent, seq, pos,
            sparsity, fraction).

    Returns:
        {"ablation_sparsity": mean (L1/L2)^2 (effective number of the V*T logits affected),
         "ablation_sparsity_fraction": mean of (L1/L2)^2 / (V*T) in (0, 1],
         "ablation_latents": sorted latent ids ablated, "ablation_positions": T used,
         "ablation_vocab": V, "ablation_count": ablations with an effect, "ablation_zero_effect":
         ablations that changed no logit, "ablation_per_latent": {latent: {"sparsity", "fraction",
         "occurrences"}}}; the means are None when no ablation had an effect.

    Raises:
        ValueError: a negative n_ablated, occurrences/positions/batch_size < 1, bad `sequences`, or
            codes whose token count does not match `sequences`.
    """
    from sae_dist.harvest.hooks import resolve_hook

    _check_ablation_options(n_ablated, occurrences, positions, batch_size)
    if int(n_ablated) == 0:
        return {}
    n_seq, t, s = _token_grid(sequences, skip_positions)
    device = torch.device(device)
    spec = resolve_hook(model, hook_name)
    if codes is None:
        codes = collect_codes(model, sae, spec.name, sequences, batch_size=batch_size, device=device, skip_positions=s)
    if codes.n_tokens != n_seq * (t - s):
        raise ValueError(f"codes hold {codes.n_tokens} tokens but sequences {tuple(sequences.shape)} give "
                         f"{n_seq * (t - s)} with skip_positions={s}")
    T = min(int(positions), t - s)
    chosen, jobs = _ablation_jobs(codes, t, s, T, int(n_ablated), int(occurrences), int(seed))
    details, vocab = _run_ablations(model, sae, spec, sequences, jobs, T, s, batch_size, device, subtract_median)
    out = _ablation_summary(chosen, details, T, vocab)
    if return_details:
        out["ablation_details"] = details
    return out


def _check_ablation_options(n_ablated: int, occurrences: int, positions: int, batch_size: int) -> None:
    """ValueError naming the option: n_ablated < 0, or occurrences / positions / batch_size < 1."""
    for name, v, lo in (("ablation_latents", n_ablated, 0), ("ablation_occurrences", occurrences, 1),
                        ("ablation_positions", positions, 1), ("batch_size", batch_size, 1)):
        if int(v) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")


def _token_grid(sequences: torch.Tensor, skip_positions: int) -> tuple[int, int, int]:
    """(N, T, skip_positions as an int) of the int64 token ids `sequences` [N, T]; ValueError when it
    is not an integer 2-d tensor or has no position >= skip_positions."""
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2 or sequences.is_floating_point():
        raise ValueError("sequences must be an integer tensor [N, T]")
    n_seq, t = sequences.shape
    s = int(skip_positions)
    if t - s < 1:
        raise ValueError(f"sequences of length {t} have no position >= skip_positions={s}")
    return n_seq, t, s


def _ablation_jobs(codes: LatentCodes, t: int, s: int, T: int, n_ablated: int, occurrences: int,
                   seed: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The seeded draws (module docstring): up to n_ablated sorted latent ids among those firing on an
    eligible token (positions p..p+T-1 inside its length-t sequence), and for each up to `occurrences`
    of those tokens. Returns (chosen latents, jobs [(latent, sequence, position)] sorted by position,
    so that a batch's lengths are similar: less padding work)."""
    per_seq = t - s
    rows, lat, _ = codes.tensors()
    seq_of = rows // per_seq
    pos_of = rows % per_seq + s
    ok = pos_of <= t - T
    lat, seq_of, pos_of = lat[ok], seq_of[ok], pos_of[ok]
    g = torch.Generator().manual_seed(seed)
    candidates = torch.unique(lat)
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n_ablated]].sort().values.tolist()
    jobs: list[tuple[int, int, int]] = []  # (latent, sequence, position)
    for j in chosen:
        where = (lat == j).nonzero().flatten()
        pick = where[torch.randperm(where.numel(), generator=g)[:occurrences]]
        jobs += [(int(j), int(seq_of[e]), int(pos_of[e])) for e in pick]
    jobs.sort(key=lambda job: job[2])
    return chosen, jobs


def _run_ablations(model: nn.Module, sae: nn.Module, spec, sequences: torch.Tensor, jobs: list[tuple[int, int, int]],
                   T: int, s: int, batch_size: int, device: torch.device,
                   subtract_median: bool) -> tuple[list[dict], int | None]:
    """Run the ablation jobs batch_size at a time (model and SAE in eval mode, restored after): an
    SAE-spliced forward before and one with each row's latent ablated at its position, truncated to
    the batch's last position + T. Returns (one {latent, seq, pos, sparsity, fraction} per job, in
    job order; sparsity NaN for no effect, vocabulary size V, None without jobs)."""
    from sae_dist.harvest.hooks import splice_hook

    sae_device = module_device(sae, device)
    details = []
    vocab = None
    with eval_mode(model, sae), fp32_logits(model):
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            length = max(p for _, _, p in batch) + T
            ids = sequences[[q for _, q, _ in batch], :length].to(device=device, dtype=torch.long)
            with splice_hook(model, spec, _ablation_splice(sae, sae_device, s, None)):
                before = model(input_ids=ids, use_cache=False).logits
            ablate = [(r, p, j) for r, (j, _, p) in enumerate(batch)]
            with splice_hook(model, spec, _ablation_splice(sae, sae_device, s, ablate)):
                after = model(input_ids=ids, use_cache=False).logits
            vocab = int(after.shape[-1])
            for r, (j, q, p) in enumerate(batch):
                delta = after[r, p : p + T].float() - before[r, p : p + T].float()
                eff = effective_logit_count(delta, subtract_median)
                details.append({"latent": j, "seq": q, "pos": p, "sparsity": eff, "fraction": eff / (T * vocab)})
    return details, vocab


def _ablation_summary(chosen: list[int], details: list[dict], T: int, vocab: int | None) -> dict[str, Any]:
    """`ablation_sparsity`'s dict (without details): per latent the mean over its ablations with an
    effect, then the mean over those latents (None when none had an effect)."""
    per_latent: dict[int, dict] = {}
    for j in chosen:
        effs = [d for d in details if d["latent"] == j and not math.isnan(d["sparsity"])]
        if effs:
            per_latent[j] = {
                "sparsity": sum(d["sparsity"] for d in effs) / len(effs),
                "fraction": sum(d["fraction"] for d in effs) / len(effs),
                "occurrences": len(effs),
            }
    n_zero = sum(math.isnan(d["sparsity"]) for d in details)
    return {
        "ablation_sparsity": (
            (sum(v["sparsity"] for v in per_latent.values()) / len(per_latent)) if per_latent else None
        ),
        "ablation_sparsity_fraction": (
            sum(v["fraction"] for v in per_latent.values()) / len(per_latent) if per_latent else None
        ),
        "ablation_latents": [int(j) for j in chosen],
        "ablation_positions": int(T),
        "ablation_vocab": vocab,
        "ablation_count": len(details) - n_zero,
        "ablation_zero_effect": int(n_zero),
        "ablation_per_latent": {str(j): v for j, v in per_latent.items()},
    }
