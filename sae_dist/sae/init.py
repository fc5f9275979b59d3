"""Initialisation of the TopK SAE (Gao et al. 2024, section 2.1 and section 2.4.1 / Appendix A.1):
tied encoder/decoder init and b_dec at the geometric median of a data sample.
"""

from __future__ import annotations

import torch

__all__ = ["tied_init_", "init_rows", "tied_init_rows_", "INIT_BLOCK_ROWS", "geometric_median", "init_b_dec_"]


@torch.no_grad()
def tied_init_(sae, generator: torch.Generator | None = None, enc_scale: float = 1.0) -> None:
    """Tied init (section 2.4.1, "we initialize the encoder to the transpose of the decoder"):
    W_dec rows i.i.d. uniformly random unit vectors (normalised Gaussians), W_enc = enc_scale *
    W_dec^T, b_enc = 0. Works in place on `sae.W_dec` [d_sae, d_in], `sae.W_enc` [d_in, d_sae],
    `sae.b_enc` [d_sae]. The Gaussian is drawn in float32 on CPU when `generator` is a CPU generator
    (reproducible across devices), then moved.
    """
    n, d = sae.W_dec.shape
    gen_device = generator.device if generator is not None else sae.W_dec.device
    w = torch.randn(n, d, generator=generator, device=gen_device, dtype=torch.float32)
    w = w / w.norm(dim=-1, keepdim=True)
    sae.W_dec.copy_(w.to(sae.W_dec.device, sae.W_dec.dtype))
    sae.W_enc.copy_((enc_scale * w.T).to(sae.W_enc.device, sae.W_enc.dtype))
    sae.b_enc.zero_()


#: Rows of W_dec drawn per generator in the mesh-independent tied init (`init_rows`).
INIT_BLOCK_ROWS = 4096


@torch.no_grad()
def init_rows(start: int, end: int, d_in: int, seed: int) -> torch.Tensor:
    """Rows [start, end) of the tied-init decoder (Gao et al. 2024, section 2.4.1): i.i.d. uniformly
    random unit vectors, float32 [end - start, d_in] on CPU.

    Mesh independent: rows come in blocks of INIT_BLOCK_ROWS, block b drawn from a CPU generator
    seeded with (seed, b), so any shard of latents gets the same rows as the unsharded model and no
    rank ever draws more than its own rows plus one block.
    """
    if not 0 <= start <= end:
        raise ValueError(f"init_rows: bad latent range [{start}, {end})")
    out = torch.empty(end - start, d_in, dtype=torch.float32)
    b0, b1 = start // INIT_BLOCK_ROWS, (end + INIT_BLOCK_ROWS - 1) // INIT_BLOCK_ROWS
    for b in range(b0, b1):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        block = torch.randn(INIT_BLOCK_ROWS, d_in, generator=g, dtype=torch.float32)
        lo, hi = max(start, b * INIT_BLOCK_ROWS), min(end, (b + 1) * INIT_BLOCK_ROWS)
        out[lo - start: hi - start] = block[lo - b * INIT_BLOCK_ROWS: hi - b * INIT_BLOCK_ROWS]
    return out / out.norm(dim=-1, keepdim=True)


@torch.no_grad()
def tied_init_rows_(sae, seed: int, latent_start: int = 0) -> None:
    """Mesh-independent tied init (Gao et al. 2024, section 2.4.1) of `sae` holding latents
    [latent_start, latent_start + W_dec.shape[0]): W_dec = `init_rows`, W_enc = enc_init_scale *
    W_dec^T, b_enc = 0; b_dec untouched. The whole SAE (latent_start 0) and every shard get the same
    global weights."""
    n_rows, d = sae.W_dec.shape
    w = init_rows(latent_start, latent_start + n_rows, d, seed)
    sae.W_dec.copy_(w.to(sae.W_dec.device, sae.W_dec.dtype))
    sae.W_enc.copy_((sae.cfg.enc_init_scale * w.T).to(sae.W_enc.device, sae.W_enc.dtype))
    sae.b_enc.zero_()


@torch.no_grad()
def geometric_median(
    x: torch.Tensor, n_iter: int = 300, eps: float = 1e-8, tol: float = 1e-7
) -> torch.Tensor:
    """Geometric median argmin_m sum_i ||x_i - m||_2 of x [N, d] by Weiszfeld iterations.

    Starts from the mean; each iteration m <- sum_i w_i x_i / sum_i w_i with w_i = 1 / max(||x_i -
    m||, eps); stops after `n_iter` iterations or when the step is below tol * (1 + ||m||).
    Computed in float64; returns [d] in x's dtype. Used for b_dec (Gao et al. 2024, section 2.1,
    following Bricken et al. 2023). ValueError for an empty or non-2-D sample, or non-finite values.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] sample, got {tuple(x.shape)}")
    xd = x.double()
    if not torch.isfinite(xd).all():
        raise ValueError("geometric_median: the sample contains NaN/Inf")
    m = xd.mean(0)
    for _ in range(n_iter):
        dist = (xd - m).norm(dim=-1).clamp_min(eps)
        w = 1.0 / dist
        m_new = (w[:, None] * xd).sum(0) / w.sum()
        step = (m_new - m).norm()
        m = m_new
        if step <= tol * (1.0 + m.norm()):
            break
    return m.to(x.dtype)


@torch.no_grad()
def init_b_dec_(sae, sample: torch.Tensor, mode: str = "geometric_median", n_iter: int = 300) -> None:
    """Set sae.b_dec from a sample of normalised activations [N, d_in].

    mode: "geometric_median" (paper), "mean", or "zeros". ValueError for other modes or a d_in
    mismatch.
    """
    if mode == "zeros":
        sae.b_dec.zero_()
        return
    if sample.dim() != 2 or sample.shape[-1] != sae.b_dec.shape[0]:
        raise ValueError(
            f"b_dec sample must be [N, d_in={sae.b_dec.shape[0]}], got {tuple(sample.shape)}"
        )
    if mode == "geometric_median":
        b = geometric_median(sample.float(), n_iter=n_iter)
    elif mode == "mean":
        b = sample.double().mean(0)
    else:
        raise ValueError(f"b_dec_init={mode!r}; valid: geometric_median, mean, zeros")
    sae.b_dec.copy_(b.to(sae.b_dec.device, sae.b_dec.dtype))
