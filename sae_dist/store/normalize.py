"""Input normalisation of activations before the SAE, and its exact inverse.

Modes (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 2.1 and appendix):

- ``"layer_norm"``: per token, subtract the mean over d_model and scale to unit L2 norm (the paper's
  LayerNorm without affine parameters); we multiply by sqrt(d) so that ||x_n|| = sqrt(d) (entries of
  order 1). ctx = {"mean": [..., 1], "norm": [..., 1]} (the norm after the eps floor) so `denormalize`
  restores x exactly (up to float rounding).
- ``"scalar"``: x_n = s * x with one dataset-wide scalar s = sqrt(d) / E||x|| (`scalar_scale`, from
  the store's norm_stats), so E||x_n|| = sqrt(d). ctx = {"scale": s}. Linear, hence foldable into
  exported SAE weights.
- ``"none"``: identity.

Functions accept torch tensors or numpy arrays [..., d] and return the same kind; half-precision
inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

MODES = ("layer_norm", "scalar", "none")
EPS = 1e-8


def check_mode(mode) -> str:
    """Return the canonical mode name (None -> "none"); ValueError listing the valid modes otherwise."""
    if mode is None:
        return "none"
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; valid modes: {list(MODES)}")
    return mode


def scalar_scale(norm_stats: Mapping[str, Any], d: int) -> float:
    """s = sqrt(d) / E||x|| for the "scalar" mode, from a store's ``norm_stats`` attribute.

    Args: norm_stats with "mean_norm" (mean L2 norm of activation rows, > 0); d = d_model.
    Raises: ValueError if mean_norm is missing, non-finite or <= 0.
    """
    try:
        mean_norm = float(norm_stats["mean_norm"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"norm_stats {norm_stats!r} has no usable 'mean_norm'; recompute it with "
                         f"sae_dist.store.finalize_store or write_store") from None
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"norm_stats mean_norm={mean_norm} must be finite and > 0 for scalar normalisation")
    return math.sqrt(d) / mean_norm


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def normalize(x, mode: str, scale: float | None = None):
    """Normalise activations x [..., d] (torch or numpy).

    Args:
        x: activations, last axis = d_model.
        mode: "layer_norm" | "scalar" | "none" (see module docstring).
        scale: s for "scalar" mode (required there, see `scalar_scale`); ignored otherwise.
    Returns: (x_n, ctx): x_n like x (same shape, dtype, device); ctx a dict for `denormalize`.
    Raises: ValueError for an unknown mode or a missing/invalid scale in "scalar" mode.
    """
    mode = check_mode(mode)
    if mode == "none":
        return x, {}
    if mode == "scalar":
        if scale is None or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"scalar normalisation needs a finite scale > 0 (scalar_scale(norm_stats, d)), "
                             f"got {scale!r}")
        return x * float(scale), {"scale": float(scale)}
    d = x.shape[-1]
    if _is_torch(x):
        import torch

        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dim=-1, keepdim=True)
        xc = xf - mean
        norm = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).clamp_min(EPS)
        out = xc * (math.sqrt(d) / norm)
        return out.to(x.dtype), {"mean": mean, "norm": norm}
    a = np.asarray(x)
    af = a.astype(np.float32) if a.dtype.itemsize < 4 else a
    mean = af.mean(axis=-1, keepdims=True)
    xc = af - mean
    norm = np.maximum(np.sqrt(np.sum(xc * xc, axis=-1, keepdims=True)), EPS).astype(af.dtype)
    out = xc * (math.sqrt(d) / norm)
    return out.astype(a.dtype), {"mean": mean, "norm": norm}


def denormalize(x_n, mode: str, ctx: Mapping[str, Any]):
    """Invert `normalize`: map x_n [..., d] (or a reconstruction of it) back to activation space.

    Args: x_n as returned by normalize (or an SAE reconstruction), mode, ctx from that normalize call.
    Returns: x like x_n. Raises: ValueError for an unknown mode or a ctx missing its keys.
    """
    mode = check_mode(mode)
    if mode == "none":
        return x_n
    if mode == "scalar":
        if "scale" not in ctx:
            raise ValueError("denormalize(mode='scalar') needs ctx['scale'] from normalize()")
        return x_n / ctx["scale"]
    if "mean" not in ctx or "norm" not in ctx:
        raise ValueError("denormalize(mode='layer_norm') needs ctx['mean'] and ctx['norm'] from normalize()")
    d = x_n.shape[-1]
    if _is_torch(x_n):
        import torch

        xf = x_n.float() if x_n.dtype in (torch.float16, torch.bfloat16) else x_n
        return (xf * (ctx["norm"] / math.sqrt(d)) + ctx["mean"]).to(x_n.dtype)
    a = np.asarray(x_n)
    af = a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return (af * (ctx["norm"] / math.sqrt(d)) + ctx["mean"]).astype(a.dtype)


__all__ = ["MODES", "EPS", "normalize", "denormalize", "scalar_scale", "check_mode"]
