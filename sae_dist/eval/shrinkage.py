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

Memory: tokens are refined in chunks of `chunk` tokens, by default as many as keep the chunk's largest
float64 tensor within `CHUNK_BYTES` (at least one token): the decoder rows of the chunk's active
latents, gathered in float64 [B, k, d_in], and for support "all" the chunk's codes over every latent
[B, d_sae]. W_dec is never copied whole to float64 (its active rows are gathered; for "all" each product
converts it block by block of at most CHUNK_BYTES), no [N, k, d_in] or [N, d_sae] tensor is built, and a
dense SAE's codes are encoded chunk by chunk too. A chunk's working set is a few times CHUNK_BYTES (about
3x for "active", about 10x for "all"), besides W_dec itself, the inputs, and for "all" a float64
[d_in, d_in] Gram matrix (its step size). Each token's FISTA stops on its own convergence test, so the
results do not depend on the chunking, up to floating-point reassociation.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["refine_support", "refine_all", "shrinkage", "sae_shrinkage", "CHUNK_BYTES"]

#: Bytes of the largest float64 tensor one chunk of tokens builds (module docstring: the gathered decoder
#: rows [B, k, d_in], the codes over all latents [B, d_sae], a float64 block of W_dec) and of a dense
#: SAE's float32 codes [B, d_sae] in `sae_shrinkage`, when no `chunk` is given; a chunk holds >= 1 token.
CHUNK_BYTES = 1 << 28

#: FISTA limits of `refine_support` (for tokens whose least-squares code on the support has a negative entry)
SUPPORT_MAX_ITER, SUPPORT_TOL = 2000, 1e-10
#: FISTA limits of `refine_all`
ALL_MAX_ITER, ALL_TOL = 500, 1e-8


def _rows(token_bytes: int, chunk: int | None) -> int:
    """Tokens per chunk: `chunk` when given, else as many as keep token_bytes per token within
    CHUNK_BYTES (at least 1). ValueError for a chunk < 1."""
    if chunk is None:
        return max(1, CHUNK_BYTES // max(1, int(token_bytes)))
    if isinstance(chunk, bool) or int(chunk) < 1:
        raise ValueError(f"chunk must be a number of tokens >= 1 (or None: as many as fit in CHUNK_BYTES), "
                         f"got {chunk!r}")
    return int(chunk)


def _support_bytes(k: int, d: int) -> int:
    """Bytes per token of the largest float64 tensor of support "active": rows [k, d] or Gram [k, k]."""
    return 8 * k * max(d, k)


def _w_blocks(W_dec: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float64 rows) of W_dec [d_sae, d_in] in blocks of at most CHUNK_BYTES (>= 1 row each);
    a block is a view of W_dec when it is float64 already."""
    rows = _rows(8 * W_dec.shape[1], None)
    for r in range(0, W_dec.shape[0], rows):
        yield r, W_dec[r : r + rows].to(torch.float64)


def _times_w(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """z [B, d_sae] float64 @ W_dec -> float64 [B, d_in], summed over the blocks of `_w_blocks`."""
    out = torch.zeros(z.shape[0], W_dec.shape[1], dtype=torch.float64, device=z.device)
    for r, Wb in _w_blocks(W_dec):
        out.addmm_(z[:, r : r + Wb.shape[0]], Wb)
    return out


def _times_wt(y: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """y [B, d_in] float64 @ W_dec^T -> float64 [B, d_sae], block by block of `_w_blocks`."""
    out = torch.empty(y.shape[0], W_dec.shape[0], dtype=torch.float64, device=y.device)
    for r, Wb in _w_blocks(W_dec):
        out[:, r : r + Wb.shape[0]] = y @ Wb.T
    return out


def _lipschitz(W_dec: torch.Tensor) -> torch.Tensor:
    """||W_dec||_2^2 (float64 scalar, >= 1e-30): the largest eigenvalue of the float64 [d_in, d_in]
    Gram matrix W_dec^T W_dec, accumulated over the blocks of `_w_blocks`."""
    d = W_dec.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=W_dec.device)
    for _, Wb in _w_blocks(W_dec):
        gram.addmm_(Wb.T, Wb)
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(1e-30)


def _grad_gram(y: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Gradient G y - c of 0.5 y^T G y - c^T y, batched: y, c [B, k]; G [B, k, k]."""
    return (G @ y.unsqueeze(-1)).squeeze(-1) - c


def _grad_lstsq(y: torch.Tensor, W_dec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient (y W - target) W^T of 0.5 ||y W - target||^2: y [B, d_sae] float64; W_dec [d_sae, d]
    (any float dtype: used in float64 blocks); target [B, d] float64."""
    return _times_wt(_times_w(y, W_dec) - target, W_dec)


def _fista(grad_fn, z0: torch.Tensor, lipschitz: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Projected (z >= 0) accelerated gradient with adaptive restart, batched over the first dim. Each
    row stops (keeps its z) at its own test max|z_new - z| <= tol (1 + max|z_new|), so a row's result
    does not depend on the other rows of its batch."""
    z = z0.clamp_min(0)
    y = z.clone()
    tk = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
    live = torch.ones(z.shape[0], 1, dtype=torch.bool, device=z.device)
    step = 1.0 / lipschitz.reshape(-1, 1)
    for _ in range(max_iter):
        g = grad_fn(y)
        z_new = (y - step * g).clamp_min(0)
        diff = z_new - z
        # restart the momentum where it points uphill (O'Donoghue & Candes 2015)
        restart = ((g * diff).sum(1, keepdim=True) > 0)
        t_new = (1 + torch.sqrt(1 + 4 * tk * tk)) / 2
        mom = torch.where(restart, torch.zeros_like(tk), (tk - 1) / t_new)
        y = torch.where(live, z_new + mom * diff, y)
        tk = torch.where(restart, torch.ones_like(t_new), t_new)
        z = torch.where(live, z_new, z)
        live &= diff.abs().amax(1, keepdim=True) > tol * (1 + z_new.abs().amax(1, keepdim=True))
        if not bool(live.any()):
            break
    return z


def _check_codes(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor) -> None:
    """ValueError unless x [N, d_in], values and indices [N, k], W_dec [d_sae, d_in], b_dec [d_in]."""
    if values.shape != indices.shape or values.ndim != 2 or x.ndim != 2 or x.shape[0] != values.shape[0]:
        raise ValueError(f"x [N, d_in], values and indices [N, k] expected; got {tuple(x.shape)}, "
                         f"{tuple(values.shape)}, {tuple(indices.shape)}")
    if W_dec.ndim != 2 or W_dec.shape[1] != x.shape[1] or b_dec.shape != (x.shape[1],):
        raise ValueError(f"W_dec {tuple(W_dec.shape)} / b_dec {tuple(b_dec.shape)} do not match d_in={x.shape[1]}")


def _target(x: torch.Tensor, b_dec: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float64 x - b_dec [B, d_in] on `device` (x [B, d_in] on any device)."""
    return x.to(device, torch.float64) - b_dec.to(device, torch.float64)


def _gathered_rows(W_dec: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 W_dec[indices] * mask [B, k, d_in] (indices int64 [B, k], mask float64 [B, k] of 0 / 1,
    both on W_dec's device): only the gathered rows are converted."""
    return W_dec[indices].to(torch.float64).mul_(mask.unsqueeze(-1))


def _solve_support(target: torch.Tensor, Ws: torch.Tensor, mask: torch.Tensor, max_iter: int,
                   tol: float) -> torch.Tensor:
    """NNLS codes float64 [B, k] (0 where mask is 0) of target [B, d_in] on the masked rows Ws [B, k, d_in]:
    least squares, then FISTA on the Gram system for the tokens with a negative entry."""
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
    return sol


def _refine_all_chunk(target: torch.Tensor, z0: torch.Tensor, W_dec: torch.Tensor, lip: torch.Tensor,
                      max_iter: int, tol: float) -> torch.Tensor:
    """FISTA over all latents from z0 float64 [B, d_sae] (step 1 / lip) for target [B, d_in] -> float64 [B, d_sae]."""
    return _fista(partial(_grad_lstsq, W_dec=W_dec, target=target), z0, lip.expand(z0.shape[0]), max_iter, tol)


@torch.no_grad()
def refine_support(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    max_iter: int = SUPPORT_MAX_ITER,
    tol: float = SUPPORT_TOL,
    chunk: int | None = None,
) -> torch.Tensor:
    """Non-negative least-squares refinement of the activations on each token's active support.

    Args:
        x: SAE inputs [N, d_in] (the space the SAE encodes).
        values: encoder activations [N, k] (>= 0; entries == 0 are not in the support and stay 0).
        indices: int64 [N, k] their latent ids.
        W_dec: [d_sae, d_in]; b_dec: [d_in]. The solve runs on W_dec's device (the least-squares step on
            the CPU); only the gathered rows are converted to float64.
        max_iter, tol: FISTA limits for tokens whose unconstrained solution has a negative entry.
        chunk: tokens per batched solve; None: as many as keep the float64 [chunk, k, d_in] gathered rows
            within CHUNK_BYTES (module docstring). The result does not depend on it (up to rounding).

    Returns:
        refined values float64 [N, k] on values' device (same layout as `values`), minimising
        ||x - b_dec - sum_j v_j W_dec[i_j]||^2 subject to v >= 0 and v = 0 outside the support.

    Raises:
        ValueError: shape mismatch; chunk < 1.
    """
    _check_codes(x, values, indices, W_dec, b_dec)
    rows = _rows(_support_bytes(values.shape[1], x.shape[1]), chunk)
    dev = W_dec.device
    out = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    for i in range(0, x.shape[0], rows):
        mask = (values[i : i + rows] != 0).to(dev, torch.float64)
        Ws = _gathered_rows(W_dec, indices[i : i + rows].to(dev), mask)
        sol = _solve_support(_target(x[i : i + rows], b_dec, dev), Ws, mask, max_iter, tol)
        out[i : i + rows] = sol.to(out.device)
    return out


@torch.no_grad()
def refine_all(
    x: torch.Tensor,
    z0: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    *,
    max_iter: int = ALL_MAX_ITER,
    tol: float = ALL_TOL,
    chunk: int | None = None,
) -> torch.Tensor:
    """Non-negative least squares over ALL latents, started from the encoder code.

    Args:
        x: SAE inputs [N, d_in]; z0: encoder code [N, d_sae] (dense; on any device: each chunk of tokens is
        moved to W_dec's, where the iterations run); W_dec [d_sae, d_in] (used in float64 blocks of at most
        CHUNK_BYTES, never copied whole); b_dec [d_in].
        max_iter, tol: FISTA limits (step 1 / ||W_dec||_2^2); chunk: tokens per batch, None: as many as
        keep a float64 [chunk, d_sae] code within CHUNK_BYTES. The result does not depend on it (up to rounding).

    Returns:
        z float64 [N, d_sae] on the CPU, >= 0 approximately minimising ||x - b_dec - z W_dec||^2 (FISTA stops after
        max_iter iterations: with d_sae > d_in the minimiser is not unique; the result is the one
        reached from z0). The result itself is dense: `shrinkage` (support "all") never builds it whole.

    Raises:
        ValueError: shape mismatch; chunk < 1.
    """
    if z0.ndim != 2 or x.ndim != 2 or z0.shape != (x.shape[0], W_dec.shape[0]) or W_dec.shape[1] != x.shape[1] \
            or b_dec.shape != (x.shape[1],):
        raise ValueError(f"x [N, d_in], z0 [N, d_sae], W_dec [d_sae, d_in], b_dec [d_in] expected; got "
                         f"{tuple(x.shape)}, {tuple(z0.shape)}, {tuple(W_dec.shape)}, {tuple(b_dec.shape)}")
    rows = _rows(8 * W_dec.shape[0], chunk)
    dev = W_dec.device
    lip = _lipschitz(W_dec)
    out = torch.zeros(z0.shape, dtype=torch.float64)
    for i in range(0, x.shape[0], rows):
        zc = z0[i : i + rows].to(dev, torch.float64)  # z0 may be on the CPU
        out[i : i + rows] = _refine_all_chunk(_target(x[i : i + rows], b_dec, dev), zc, W_dec, lip,
                                              max_iter, tol).cpu()
    return out


@torch.no_grad()
def shrinkage(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
    support: str = "active", max_iter: int | None = None, chunk: int | None = None,
) -> dict[str, Any]:
    """Shrinkage metrics of encoder codes against their frozen-decoder refinement (module docstring;
    Gao et al. 2024 sec. 5.1).

    Args:
        x: SAE inputs [N, d_in] (float; the space the SAE encodes).
        values, indices: the encoder's codes [N, k] (values >= 0, zeros = not active), int64 indices.
        W_dec: [d_sae, d_in]; b_dec: [d_in]. The work runs on W_dec's device, in float64 per chunk.
        support: "active" (refine on each token's support) or "all" (non-negative code over all latents).
        max_iter: FISTA iteration limit (None: `refine_support`'s / `refine_all`'s default).
        chunk: tokens refined at once; None: as many as keep the chunk's largest float64 tensor within
            CHUNK_BYTES ([chunk, k, d_in] gathered rows; for "all" also the [chunk, d_sae] codes). The
            results do not depend on it (up to floating-point reassociation).

    Returns:
        {"shrinkage_ratio", "shrinkage_fvu_encoder", "shrinkage_fvu_refined", "shrinkage_fvu_gain",
         "shrinkage_tokens" (tokens with a non-zero code used), "shrinkage_support"}; floats are None
        when no token has a non-zero code.

    Raises:
        ValueError: support not in {"active", "all"}; shape mismatch; chunk < 1.
    """
    if support not in ("active", "all"):
        raise ValueError(f"shrinkage_support must be 'active' or 'all', got {support!r}")
    _check_codes(x, values, indices, W_dec, b_dec)
    keep = (values != 0).any(1)
    x, values, indices = x[keep], values[keep], indices[keep]
    res: dict[str, Any] = {"shrinkage_tokens": int(keep.sum()), "shrinkage_support": support}
    if x.shape[0] == 0:
        return {**res, "shrinkage_ratio": None, "shrinkage_fvu_encoder": None, "shrinkage_fvu_refined": None,
                "shrinkage_fvu_gain": None}
    (d_sae, d), k = W_dec.shape, values.shape[1]
    token_bytes = _support_bytes(k, d) if support == "active" else 8 * max(d_sae, k * d)
    err_enc, err_ref, total, ratio = _shrinkage_sums(x, values, indices, W_dec, b_dec, support, max_iter,
                                                     _rows(token_bytes, chunk))
    fvu_enc = err_enc / total if total > 0 else math.nan
    fvu_ref = err_ref / total if total > 0 else math.nan
    return {
        **res,
        "shrinkage_ratio": ratio,
        "shrinkage_fvu_encoder": fvu_enc,
        "shrinkage_fvu_refined": fvu_ref,
        "shrinkage_fvu_gain": (fvu_enc - fvu_ref) / fvu_enc if fvu_enc > 0 else math.nan,
    }


def _shrinkage_sums(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, support: str, max_iter: int | None,
                    rows: int) -> tuple[float, float, float, float]:
    """Over the N tokens (every one with a non-zero code), `rows` at a time on W_dec's device in float64:
    (sum ||t - x^_enc||^2, sum ||t - x^_ref||^2, sum ||t - mean(t)||^2, mean ||z*|| / ||z||) with
    t = x - b_dec, the encoder's reconstruction x^_enc = sum_j v_j W_dec[i_j] and the refined one x^_ref."""
    n, dev = x.shape[0], W_dec.device
    starts = range(0, n, rows)
    mean = sum(_target(x[i : i + rows], b_dec, dev).sum(0) for i in starts) / n
    lip = _lipschitz(W_dec) if support == "all" else None
    err_enc = err_ref = total = 0.0
    ratios = []
    for i in starts:
        t = _target(x[i : i + rows], b_dec, dev)
        v = values[i : i + rows].to(dev, torch.float64)
        idx = indices[i : i + rows].to(dev)
        mask = (v != 0).to(torch.float64)
        Ws = _gathered_rows(W_dec, idx, mask)
        if support == "active":
            z = _solve_support(t, Ws, mask, SUPPORT_MAX_ITER if max_iter is None else int(max_iter), SUPPORT_TOL)
            x_ref = torch.einsum("bk,bkd->bd", z, Ws)
        else:
            z0 = torch.zeros(t.shape[0], W_dec.shape[0], dtype=torch.float64, device=dev).scatter_add_(1, idx, v)
            z = _refine_all_chunk(t, z0, W_dec, lip, ALL_MAX_ITER if max_iter is None else int(max_iter), ALL_TOL)
            x_ref = _times_w(z, W_dec)
        err_enc += float((t - torch.einsum("bk,bkd->bd", v, Ws)).square().sum())
        err_ref += float((t - x_ref).square().sum())
        total += float((t - mean).square().sum())
        ratios.append((z.norm(dim=1) / v.norm(dim=1)).cpu())
    return err_enc, err_ref, total, float(torch.cat(ratios).mean())


def _dense_codes(sae: nn.Module, x: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense encoder's codes as (values [N, kmax], int64 indices [N, kmax]), kmax = the largest L0 over
    x [N, d_in] (>= 1): `sae.encode` chunk by chunk (float32 [chunk, d_sae] within CHUNK_BYTES unless
    `chunk` is given), a token with fewer active latents padded with value 0 (outside its support)."""
    rows = _rows(4 * sae.W_dec.shape[0], chunk)
    vals = [x.new_zeros(0, 1)]
    idxs = [torch.zeros(0, 1, dtype=torch.int64, device=x.device)]
    for i in range(0, x.shape[0], rows):
        z = sae.encode(x[i : i + rows])
        v, idx = z.topk(max(int((z != 0).sum(1).max()), 1), dim=1)
        vals.append(torch.where(v > 0, v, torch.zeros_like(v)))
        idxs.append(idx)
    kmax = max(v.shape[1] for v in vals)
    return (torch.cat([F.pad(v, (0, kmax - v.shape[1])) for v in vals]),
            torch.cat([F.pad(i, (0, kmax - i.shape[1])) for i in idxs]))


@torch.no_grad()
def sae_shrinkage(sae: nn.Module, x: torch.Tensor, *, support: str = "active",
                  max_iter: int | None = None, chunk: int | None = None) -> dict[str, Any]:
    """`shrinkage` of an exported SAE (`sae_dist.load_sae`) on raw activations x [N, d_in].

    The SAE's codes come from `encode_sparse` (TopK family) or `encode` (dense architectures, chunk by
    chunk as `chunk` / CHUNK_BYTES allow; the support is the non-zero set, padded to the largest L0). The
    refinement works in the SAE's input space: x itself for normalize_activations "none", the per-token
    normalised x for "layer_norm" (the SAE's own input normalisation, `ExportedSAE._norm_in`).

    Returns / Raises: as `shrinkage` (x is moved to W_dec's device as float32).
    """
    x = x.to(device=sae.W_dec.device, dtype=torch.float32)
    x_in = sae._norm_in(sae._flat(x)) if hasattr(sae, "_norm_in") else x
    if hasattr(sae, "encode_sparse"):
        values, indices = sae.encode_sparse(x)
    else:
        values, indices = _dense_codes(sae, x, chunk)
    return shrinkage(x_in, values, indices, sae.W_dec.detach(), sae.b_dec.detach(), support=support,
                     max_iter=max_iter, chunk=chunk)
