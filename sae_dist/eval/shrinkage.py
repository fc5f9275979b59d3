"""Activation shrinkage (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 5.1
"TopK prevents activation shrinkage").

An L1 penalty pulls latent activations towards 0 (Tibshirani 1996): with the decoder fixed, larger
activations would reconstruct better. The paper measures this by running the encoder, keeping its set
of active latents, and optimising the activation values to reconstruct the input better with the
decoder frozen; ReLU+L1 SAEs' refined activations come out systematically larger, TopK's do not.

Here, for each token with SAE input x (the space the SAE encodes: raw activations, or the per-token
normalised ones for a "layer_norm" SAE), encoder code z (support S = {j : z_j != 0}), decoder W_dec
[d_sae, d_in] and b_dec [d_in]:

    z* = argmin_{z >= 0, z_j = 0 for j not in S} || x - b_dec - z W_dec ||^2      (support="active")
    z* = argmin_{z >= 0}                          || x - b_dec - z W_dec ||^2      (support="all")

(non-negative least squares; `refine_support` solves the first exactly when the unconstrained least
squares solution on S is non-negative and otherwise by FISTA projected gradient, `refine_all` by FISTA
over all latents). Reported over the sampled tokens (those with a non-zero code):

    shrinkage_ratio       mean over tokens of ||z*||_2 / ||z||_2  (1 = no shrinkage; > 1: the encoder
                          shrinks; < 1: it overshoots)
    shrinkage_fvu_encoder / shrinkage_fvu_refined: sum ||x - x^||^2 / sum ||x - mean(x)||^2 of the
                          encoder's and of the refined codes (in the SAE's input space)
    shrinkage_fvu_gain    (fvu_encoder - fvu_refined) / fvu_encoder, the relative FVU gained

Both choices (the L2 norm ratio as the summary; non-negativity kept in the refinement, since every
exported architecture has non-negative codes) are ours: the paper shows distributions of refined
vs. original activations.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["refine_support", "refine_all", "shrinkage", "sae_shrinkage"]


def _grad_gram(y: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Gradient G y - c of 0.5 y^T G y - c^T y, batched: y, c [B, k]; G [B, k, k]."""
    return (G @ y.unsqueeze(-1)).squeeze(-1) - c


def _grad_lstsq(y: torch.Tensor, W: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient (y W - target) W^T of 0.5 ||y W - target||^2: y [B, d_sae]; W [d_sae, d]; target [B, d]."""
    return (y @ W - target) @ W.T


def _fista(grad_fn, z0: torch.Tensor, lipschitz: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Projected (z >= 0) accelerated gradient with adaptive restart; batched over the first dim."""
    z = z0.clamp_min(0)
    y = z.clone()
    tk = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
    step = 1.0 / lipschitz.reshape(-1, 1)
    for _ in range(max_iter):
        g = grad_fn(y)
        z_new = (y - step * g).clamp_min(0)
        diff = z_new - z
        # restart the momentum where it points uphill (O'Donoghue & Candes 2015)
        restart = ((g * diff).sum(1, keepdim=True) > 0)
        t_new = (1 + torch.sqrt(1 + 4 * tk * tk)) / 2
        mom = torch.where(restart, torch.zeros_like(tk), (tk - 1) / t_new)
        y = z_new + mom * diff
        tk = torch.where(restart, torch.ones_like(t_new), t_new)
        z = z_new
        if float(diff.abs().max()) <= tol * (1 + float(z.abs().max())):
            break
    return z


@torch.no_grad()
def refine_support(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    max_iter: int = 2000,
    tol: float = 1e-10,
    chunk: int = 256,
) -> torch.Tensor:
    """Non-negative least-squares refinement of the activations on each token's active support.

    Args:
        x: SAE inputs [N, d_in] (the space the SAE encodes).
        values: encoder activations [N, k] (>= 0; entries == 0 are not in the support and stay 0).
        indices: int64 [N, k] their latent ids.
        W_dec: [d_sae, d_in]; b_dec: [d_in].
        max_iter, tol: FISTA limits for tokens whose unconstrained solution has a negative entry.
        chunk: tokens per batched solve.

    Returns:
        refined values float64 [N, k] (same layout as `values`), minimising ||x - b_dec - sum_j v_j W_dec[i_j]||^2
        subject to v >= 0 and v = 0 outside the support.

    Raises:
        ValueError: shape mismatch.
    """
    if values.shape != indices.shape or values.ndim != 2 or x.ndim != 2 or x.shape[0] != values.shape[0]:
        raise ValueError(f"x [N, d_in], values and indices [N, k] expected; got {tuple(x.shape)}, "
                         f"{tuple(values.shape)}, {tuple(indices.shape)}")
    if W_dec.shape[1] != x.shape[1] or b_dec.shape != (x.shape[1],):
        raise ValueError(f"W_dec {tuple(W_dec.shape)} / b_dec {tuple(b_dec.shape)} do not match d_in={x.shape[1]}")
    W = W_dec.to(torch.float64)
    out = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    for i in range(0, x.shape[0], chunk):
        v0 = values[i : i + chunk].to(torch.float64)
        mask = (v0 != 0).to(torch.float64)
        Ws = W[indices[i : i + chunk]] * mask.unsqueeze(-1)  # [B, k, d]
        target = (x[i : i + chunk].to(torch.float64) - b_dec.to(torch.float64)).to(W.device)
        G = Ws @ Ws.transpose(1, 2)  # [B, k, k]
        c = (Ws @ target.unsqueeze(-1)).squeeze(-1)  # [B, k]
        # padded (masked) coordinates: identity rows so the systems stay non-singular; c = 0 there
        eye = torch.diag_embed(1.0 - mask)
        # solved on the CPU: its default driver (gelsy, pivoted QR) handles a singular G (more active latents
        # than d_in, or collinear rows); CUDA's only driver (gels) assumes full rank
        sol = torch.linalg.lstsq((G + eye).cpu(), c.unsqueeze(-1).cpu()).solution.squeeze(-1).to(G.device) * mask
        bad = (sol < 0).any(1)
        if bool(bad.any()):
            Gb, cb = G[bad], c[bad]
            lip = torch.linalg.eigvalsh(Gb)[:, -1].clamp_min(1e-30)
            sol[bad] = _fista(partial(_grad_gram, G=Gb, c=cb), sol[bad], lip, max_iter, tol)
        out[i : i + chunk] = sol.to(out.device)
    return out


@torch.no_grad()
def refine_all(
    x: torch.Tensor,
    z0: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-8,
    chunk: int = 256,
) -> torch.Tensor:
    """Non-negative least squares over ALL latents, started from the encoder code.

    Args:
        x: SAE inputs [N, d_in]; z0: encoder code [N, d_sae] (dense; on any device: each chunk of tokens is
        moved to W_dec's, where the iterations run); W_dec [d_sae, d_in]; b_dec [d_in].
        max_iter, tol: FISTA limits (step 1 / ||W_dec||_2^2); chunk: tokens per batch.

    Returns:
        z float64 [N, d_sae] on the CPU, >= 0 approximately minimising ||x - b_dec - z W_dec||^2 (FISTA stops after
        max_iter iterations: with d_sae > d_in the minimiser is not unique; the result is the one
        reached from z0).
    """
    W = W_dec.to(torch.float64)
    lip = torch.linalg.matrix_norm(W, ord=2) ** 2
    out = torch.zeros(z0.shape, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        target = x[i : i + chunk].to(torch.float64) - b_dec.to(torch.float64)
        zc = z0[i : i + chunk].to(W.device, torch.float64)  # z0 may be on the CPU (the caller's scatter)
        lipb = lip.expand(zc.shape[0])
        out[i : i + chunk] = _fista(partial(_grad_lstsq, W=W, target=target), zc, lipb, max_iter, tol).cpu()
    return out


@torch.no_grad()
def shrinkage(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    support: str = "active", max_iter: int | None = None,
) -> dict[str, Any]:
    """Shrinkage metrics of encoder codes against their frozen-decoder refinement (module docstring;
    Gao et al. 2024 sec. 5.1).

    Args:
        x: SAE inputs [N, d_in] (float; the space the SAE encodes).
        values, indices: the encoder's codes [N, k] (values >= 0, zeros = not active), int64 indices.
        W_dec: [d_sae, d_in]; b_dec: [d_in].
        support: "active" (refine on each token's support) or "all" (non-negative code over all latents).
        max_iter: FISTA iteration limit (None: the refine function's default).

    Returns:
        {"shrinkage_ratio", "shrinkage_fvu_encoder", "shrinkage_fvu_refined", "shrinkage_fvu_gain",
         "shrinkage_tokens" (tokens with a non-zero code used), "shrinkage_support"}; floats are None
        when no token has a non-zero code.

    Raises:
        ValueError: support not in {"active", "all"}; shape mismatch.
    """
    if support not in ("active", "all"):
        raise ValueError(f"shrinkage_support must be 'active' or 'all', got {support!r}")
    keep = (values != 0).any(1)
    x, values, indices = x[keep], values[keep], indices[keep]
    res: dict[str, Any] = {"shrinkage_tokens": int(keep.sum()), "shrinkage_support": support}
    if x.shape[0] == 0:
        return {**res, "shrinkage_ratio": None, "shrinkage_fvu_encoder": None, "shrinkage_fvu_refined": None,
                "shrinkage_fvu_gain": None}
    W = W_dec.to(torch.float64)
    v64 = values.to(torch.float64)
    x_hat_ref, norm_ref = _refined(x, values, indices, W_dec, b_dec, support, max_iter)
    x_hat_enc = torch.einsum("nk,nkd->nd", v64.to(W.device), W[indices])
    target = x.to(torch.float64).to(W.device) - b_dec.to(torch.float64)
    total = float((target - target.mean(0)).square().sum())
    err_enc = float((target - x_hat_enc).square().sum())
    err_ref = float((target - x_hat_ref).square().sum())
    ratio = (norm_ref.cpu() / v64.norm(dim=1).cpu()).mean()
    fvu_enc = err_enc / total if total > 0 else math.nan
    fvu_ref = err_ref / total if total > 0 else math.nan
    return {
        **res,
        "shrinkage_ratio": float(ratio),
        "shrinkage_fvu_encoder": fvu_enc,
        "shrinkage_fvu_refined": fvu_ref,
        "shrinkage_fvu_gain": (fvu_enc - fvu_ref) / fvu_enc if fvu_enc > 0 else math.nan,
    }


def _refined(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
             support: str, max_iter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The refined codes' float64 decoded rows [N, d_in] (b_dec excluded, on W_dec's device) and their
    L2 norms [N]: `refine_support` on each token's support ("active") or `refine_all` over every
    latent from the encoder's codes ("all")."""
    W = W_dec.to(torch.float64)
    kw = {} if max_iter is None else {"max_iter": int(max_iter)}
    if support == "active":
        ref = refine_support(x, values, indices, W_dec, b_dec, **kw)
        return torch.einsum("nk,nkd->nd", ref.to(W.device), W[indices]), ref.norm(dim=1)
    v64 = values.to(torch.float64)
    z0 = torch.zeros(x.shape[0], W.shape[0], dtype=torch.float64).scatter_(1, indices.cpu(), v64.cpu())
    ref = refine_all(x, z0, W_dec, b_dec, **kw)
    return ref.to(W.device) @ W, ref.norm(dim=1)


@torch.no_grad()
def sae_shrinkage(sae: nn.Module, x: torch.Tensor, *, support: str = "active",
                  max_iter: int | None = None) -> dict[str, Any]:
    """`shrinkage` of an exported SAE (`sae_dist.load_sae`) on raw activations x [N, d_in].

    The SAE's codes come from `encode_sparse` (TopK family) or `encode` (dense architectures; the
    support is the non-zero set, padded to the largest L0). The refinement works in the SAE's input
    space: x itself for normalize_activations "none", the per-token normalised x for "layer_norm"
    (the SAE's own input normalisation, `ExportedSAE._norm_in`).
    """
    x = x.to(device=sae.W_dec.device, dtype=torch.float32)
    x_in = sae._norm_in(sae._flat(x)) if hasattr(sae, "_norm_in") else x
    if hasattr(sae, "encode_sparse"):
        values, indices = sae.encode_sparse(x)
    else:
        z = sae.encode(x)
        kmax = max(int((z != 0).sum(1).max()), 1)
        values, indices = z.topk(kmax, dim=1)
        values = torch.where(values > 0, values, torch.zeros_like(values))
    return shrinkage(x_in, values, indices, sae.W_dec.detach(), sae.b_dec.detach(), support=support, max_iter=max_iter)
