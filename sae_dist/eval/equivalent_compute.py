"""Downstream loss as "equivalent compute" (Gao et al. 2024, sec. 4.1 "Downstream loss").

The paper puts the SAE-spliced LM's loss on the pretraining-compute axis of its LM family: fit the
family's loss against pretraining compute, L(C), and find the compute C_eq at which a family member
would reach the spliced model's loss. `C_eq / C_model` (the fraction of the hooked model's own
pretraining compute) says how much of the model the SAE's reconstruction keeps: 0.1 means the spliced
model is as good as an LM trained with a tenth of the compute.

Here the family is a list of LMs that share the hooked model's tokenizer, each with its pretraining
compute in FLOPs (give `compute`, or `params` and `train_tokens` for the 6ND estimate). Their clean
cross entropies are measured on the SAME eval sequences and positions as `ce_loss_sae` (positions
skip..T-2 predicting skip+1..T-1, `sae_dist.eval.downstream`).

L(C) is interpolated, not extrapolated far: with >= 3 members the power law with an irreducible term
L(C) = exp(alpha + beta log C) + c (`sae_dist.eval.scaling.fit_power_law`), with 2 members the pure
power law through both. A spliced loss below the fitted irreducible term has no equivalent compute
(returned as None, with the reason).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["clean_cross_entropy", "equivalent_compute", "member_compute"]


def member_compute(entry: dict) -> float:
    """Pretraining compute (FLOPs) of one family member: `compute`, else 6 * params * train_tokens.

    Raises ValueError naming the entry when neither is given or a value is not positive."""
    if entry.get("compute") is not None:
        c = float(entry["compute"])
    elif entry.get("params") is not None and entry.get("train_tokens") is not None:
        c = 6.0 * float(entry["params"]) * float(entry["train_tokens"])
    else:
        raise ValueError(f"LM family member {entry.get('name')!r} needs `compute` (FLOPs) or `params` and "
                         f"`train_tokens` (for 6 * params * tokens), got {dict(entry)}")
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"LM family member {entry.get('name')!r}: compute must be a positive number, got {c}")
    return c


@torch.no_grad()
def clean_cross_entropy(model: nn.Module, sequences: torch.Tensor, *, batch_size: int = 8,
                        device: str | torch.device = "cpu", skip_positions: int = 1) -> float:
    """Mean next-token cross entropy (nats) of `model` on `sequences` (int64 [N, T]) at the positions of
    `sae_dist.eval.downstream.downstream_loss` (logits skip..T-2 predicting tokens skip+1..T-1);
    float32 log-softmax, float64 sums; batch_size is capped as in `downstream_loss` (one float32
    [B, T, V] log-prob tensor under MAX_LOGPROB_ELEMENTS). Raises ValueError when the model's vocabulary
    is smaller than the largest token id (a different tokenizer)."""
    from sae_dist.harvest.lm import check_token_ids
    from sae_dist.train.heldout import logprob_batch_size

    n, t = sequences.shape
    try:
        check_token_ids(model, sequences)
    except ValueError as e:
        raise ValueError(f"{e}; the LM family must share the evaluated model's tokenizer") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # as downstream_loss: the fp32 [B, T, V] log-probs bounded whatever the vocabulary
        batch_size = logprob_batch_size(batch_size, t, head.weight.shape[0])
    s = skip_positions
    total, count = 0.0, 0
    was = model.training
    model.eval()
    try:
        for i in range(0, n, batch_size):
            ids = sequences[i:i + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits
            lp = torch.log_softmax(logits[:, s:t - 1, :].float(), dim=-1)
            total -= float(lp.gather(-1, ids[:, s + 1:].unsqueeze(-1)).sum(dtype=torch.float64))
            count += ids[:, s + 1:].numel()
    finally:
        model.train(was)
    return total / count


#: ln of the smallest and largest compute (FLOPs) reported as a number: 1e-300 .. 1e300
_LOG_TINY, _LOG_HUGE = -300 * math.log(10), 300 * math.log(10)


def equivalent_compute(ce_sae: float, family_compute: Sequence[float], family_ce: Sequence[float],
                       model_compute: float) -> dict[str, Any]:
    """The pretraining compute at which the LM family reaches the spliced loss `ce_sae` (Gao et al.
    2024 sec. 4.1).

    family_compute: FLOPs of each member (>= 2, distinct); family_ce: their clean CE (nats) on the same
    tokens; model_compute: FLOPs of the hooked model. Returns {"equivalent_compute" (FLOPs or None),
    "equivalent_compute_fraction" (C_eq / model_compute or None), "lm_family_fit" {form, params},
    "equivalent_compute_note"}: None values and a note (never an exception) when the family's fit
    cannot be inverted at ce_sae (loss not falling with compute, ce_sae below the fitted irreducible
    loss, or a fit so flat that the compute is beyond 1e300). Raises ValueError for fewer than 2
    members or mismatched lengths.
    """
    C = np.asarray(family_compute, dtype=np.float64)
    L = np.asarray(family_ce, dtype=np.float64)
    if C.shape != L.shape or C.ndim != 1 or len(C) < 2 or len(np.unique(C)) < 2:
        raise ValueError(f"equivalent compute needs >= 2 family members of distinct compute, got compute "
                         f"{C.tolist()} and CE {L.tolist()}")
    order = np.argsort(C)
    C, L = C[order], L[order]
    if len(C) >= 3:
        from sae_dist.eval.scaling import fit_power_law

        f = fit_power_law(C, L, law="L(C) of the LM family")
        alpha, beta, c = f.params["alpha"], f.params["beta"], f.params["c"]
    else:
        beta = float((np.log(L[1]) - np.log(L[0])) / (np.log(C[1]) - np.log(C[0])))
        alpha, c = float(np.log(L[0]) - beta * np.log(C[0])), 0.0
    fit = {"form": "exp(alpha + beta*log C) + c", "params": {"alpha": alpha, "beta": beta, "c": c},
           "members": len(C)}
    out: dict[str, Any] = {"equivalent_compute": None, "equivalent_compute_fraction": None, "lm_family_fit": fit,
                           "equivalent_compute_note": None}
    if not all(math.isfinite(v) for v in (alpha, beta, c)):
        out["equivalent_compute_note"] = f"the family's fit failed (alpha={alpha}, beta={beta}, c={c})"
        return out
    if beta >= 0:
        out["equivalent_compute_note"] = f"the family's loss does not fall with compute (beta={beta:.3g})"
        return out
    if ce_sae <= c:
        out["equivalent_compute_note"] = (f"spliced CE {ce_sae:.4f} is below the family's fitted irreducible "
                                          f"loss {c:.4f}")
        return out
    log_c_eq = (math.log(ce_sae - c) - alpha) / beta
    if not _LOG_TINY < log_c_eq < _LOG_HUGE:
        # a family whose loss barely moves with compute (beta near 0) puts any other loss at an absurd
        # compute: report its order of magnitude instead of overflowing
        out["equivalent_compute_note"] = (
            f"the family's fit (beta={beta:.3g}) puts spliced CE {ce_sae:.4f} at 1e{log_c_eq / math.log(10):.3g} "
            f"FLOPs, outside any meaningful range: the family's loss hardly changes with compute")
        return out
    c_eq = math.exp(log_c_eq)
    out["equivalent_compute"] = c_eq
    out["equivalent_compute_fraction"] = c_eq / float(model_compute)
    if not (C[0] / 10 <= c_eq <= C[-1] * 10):
        out["equivalent_compute_note"] = (f"extrapolated: {c_eq:.3g} FLOPs is outside the family's range "
                                          f"[{C[0]:.3g}, {C[-1]:.3g}] by more than 10x")
    return out
