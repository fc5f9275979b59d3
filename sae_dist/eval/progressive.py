"""Progressive recovery (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 5.3).

A TopK SAE trained at k is run at other sparsities after training, and each setting is placed in the
L0-MSE plane (the paper's Figure 10):

* TopK(k'): the activation keeps the k' largest pre-activations (then ReLU) instead of k. The paper
  sweeps k' from k/4 to 4k and finds that a plain TopK SAE gives a progressive code only up to about
  k, while one trained with Multi-TopK (L(k) + L(4k)/8, sec. 5.3.1; `sae.multi_topk=true`) keeps
  improving for k' > k.
* fixed threshold: the activation becomes a JumpReLU with ONE threshold theta > 0 shared by every
  latent, z_i = pre_i * 1[pre_i > theta]; sweeping theta traces another curve. Here theta is
  calibrated so that the mean L0 over given activations hits a target (`calibrate_threshold`).

For an exported SAE (`sae_dist.load_sae`) with pre-activations pre = (x_n - b_dec) W_enc + b_enc
(x_n: the SAE's input normalisation of the raw activation x, `ExportedSAE.normalize_input`), theta is
in the units of `pre` of the loaded SAE, i.e. of the exported weights; `export_fixed_threshold` writes
the SAE as a "jumprelu" export (`threshold` = theta for every latent) that `load_sae` runs with the
same outputs as `evaluate_threshold`.

Metrics per point, over the N given tokens (definitions of `sae_dist.eval.metrics`): `l0` (mean number
of non-zero latents), `fvu` (= normalized MSE, on raw activations, as eval.json's `fvu`), `fvu_normalized_inputs`
(the same ratio in the per-token layer-normed space the SAE was trained in, the paper's convention;
equal to `fvu` for SAEs without per-token normalisation), `mse` (per element, raw units).

The curve is computed from one encoder pass: the m largest pre-activations of each token, sorted
(`topk_codes`). TopK(k') for k' <= m is its first k' columns; a threshold theta is exact on them when
every token's m-th value is <= theta (then no dropped value exceeds theta); otherwise m is doubled and
the pass repeated (`TruncatedCodesError`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from sae_dist.eval.metrics import ReconstructionStats
from sae_dist.sae.export import check_d_in, topk_pre_blocked
from sae_dist.store.reader import normalize

__all__ = [
    "DEFAULT_K_FACTORS", "TruncatedCodesError", "check_topk_sae", "k_values_from_factors", "topk_codes",
    "evaluate_topk", "evaluate_threshold", "calibrate_threshold", "threshold_for_l0", "progressive_curve",
    "export_fixed_threshold",
]

#: k'/k of the curve: k/4 ... 4k (Gao et al. 2024 sec. 5.3); for k=32: 8, 12, 16, 24, 32, 48, 64, 96, 128.
DEFAULT_K_FACTORS = (0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)

_DEFINITION = (
    "Gao et al. 2024 sec. 5.3 (progressive recovery): the TopK SAE trained at k_train run at test time with "
    "TopK(k') (topk) and as a JumpReLU with one threshold theta > 0 for all latents, z = pre * 1[pre > theta] "
    "(threshold; theta calibrated so that the mean L0 on the calibration tokens, see `calibration`, equals "
    "target_l0, the L0 of the matching topk point; theta in the units of the exported SAE's pre-activations). "
    "l0 = mean active latents per token; fvu on raw activations, fvu_normalized_inputs in the per-token "
    "layer-normed space (the paper's normalised MSE); mse per element in raw units"
)


class TruncatedCodesError(ValueError):
    """The m largest pre-activations per token do not hold every value above a threshold (some
    token's m-th value exceeds it): recompute `topk_codes` with a larger m."""


def check_topk_sae(sae) -> int:
    """The training k of a loaded TopK SAE (`sae_dist.load_sae` of a "topk" export, an
    `ExportedTopKSAE`); ValueError naming the architecture otherwise (progressive recovery replaces
    the TopK activation, sec. 5.3, so it needs one)."""
    arch = getattr(sae, "architecture", None)
    k = getattr(sae, "k", None)
    if arch != "topk" or k is None or not hasattr(sae, "normalize_input"):
        raise ValueError(
            f"progressive recovery needs a TopK SAE loaded with sae_dist.load_sae (architecture 'topk' "
            f"with k), got architecture={arch!r} k={k!r}; turn eval.progressive off for this SAE"
        )
    return int(k)


def k_values_from_factors(k: int, factors: Sequence[float], d_sae: int) -> list[int]:
    """Sorted distinct k' = round(f * k), clipped to [1, d_sae], for each factor f > 0 (e.g.
    `DEFAULT_K_FACTORS`). ValueError for an empty list or a factor that is not a finite number > 0."""
    if not factors:
        raise ValueError("progressive k factors are empty; give e.g. [0.25, 0.5, 1, 2, 4] (k' = factor * k)")
    out = set()
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"progressive k factor {f!r} must be a finite number > 0 (k' = factor * k)")
        out.add(min(int(d_sae), max(1, round(float(f) * int(k)))))
    return sorted(out)


def _flat(sae, x: torch.Tensor) -> torch.Tensor:
    """x [..., d_in] -> float32 [N, d_in] on the SAE's device; ValueError for a wrong width / no token."""
    check_d_in(sae, x.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(device=sae.W_enc.device, dtype=torch.float32)
    if x2.shape[0] == 0:
        raise ValueError("progressive recovery got 0 tokens; pass activations of shape [N, d_in] with N >= 1")
    return x2


def _centred(sae, x2: torch.Tensor) -> torch.Tensor:
    """The encoder input x_n - b_dec [N, d_in] of raw x2 (sets the SAE's per-token statistics)."""
    x_n = sae.normalize_input(x2)
    return x_n - sae.b_dec if sae.apply_b_dec_to_input else x_n


@torch.no_grad()
def topk_codes(sae, x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest pre-activations of each token: (values float32 [N, m], sorted descending, BEFORE
    any ReLU; indices int64 [N, m]). x: raw activations [..., d_in] (N = the product of the leading
    dims); sae: a loaded TopK SAE (`check_topk_sae`). Memory is bounded as in
    `sae_dist.sae.export.topk_pre_blocked`. ValueError for m outside [1, d_sae] or a wrong width.
    """
    check_topk_sae(sae)
    if not 1 <= int(m) <= sae.d_sae:
        raise ValueError(f"m={m} must be in [1, d_sae={sae.d_sae}]")
    xc = _centred(sae, _flat(sae, x))
    return topk_pre_blocked(xc, sae.W_enc, sae.b_enc, int(m), sae.max_pre_elements)


def _point(sae, x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
    """Metrics of the codes (values >= 0 [N, j], indices [N, j]) of the raw tokens x2 [N, d_in]."""
    sae.normalize_input(x2)  # the per-token statistics decode_sparse denormalises with
    x_hat = sae.decode_sparse(values, indices)
    raw = ReconstructionStats(x2.shape[1], device=x2.device)
    raw.update(x2, x_hat, l0=(values != 0).sum(1))
    out = raw.result()
    fvu_n = out["fvu"]
    if sae.normalize_activations == "layer_norm":
        x_n, ctx = normalize(x2, "layer_norm")
        norm = ReconstructionStats(x2.shape[1], device=x2.device)
        norm.update(x_n, (x_hat - ctx["mean"]) * (math.sqrt(x2.shape[1]) / ctx["norm"]))
        fvu_n = norm.result()["fvu"]
    return {"l0": float(out["l0"]), "fvu": float(out["fvu"]), "fvu_normalized_inputs": float(fvu_n),
            "mse": float(out["mse"])}


@torch.no_grad()
def evaluate_topk(sae, x: torch.Tensor, k_prime: int) -> dict[str, float]:
    """The SAE run with TopK(k') instead of its training k (Gao et al. 2024 sec. 5.3):
    z = ReLU of the k' largest pre-activations. x: raw activations [..., d_in] (any float dtype).

    Returns {"k": k', "l0", "fvu", "fvu_normalized_inputs", "mse"} (module docstring; Python floats).
    k' = sae.k reproduces the SAE's own forward. ValueError for k' outside [1, d_sae], a non-TopK SAE
    or a wrong width.
    """
    x2 = _flat(sae, x)
    values, indices = topk_codes(sae, x2, int(k_prime))
    return {"k": int(k_prime), **_point(sae, x2, torch.relu(values), indices)}


@torch.no_grad()
def evaluate_threshold(sae, x: torch.Tensor, theta: float) -> dict[str, float]:
    """The TopK SAE run as a JumpReLU with one threshold for all latents (Gao et al. 2024 sec. 5.3):
    z_i = pre_i * 1[pre_i > theta], computed densely in blocks of tokens (each block's [B, d_sae]
    pre-activations at most `sae.max_pre_elements`), independently of `topk_codes`.

    x: raw activations [..., d_in]; theta: float > 0 in the units of the loaded SAE's pre-activations.
    Returns {"theta", "l0", "fvu", "fvu_normalized_inputs", "mse"}: what the export of
    `export_fixed_threshold(src, dst, theta)` gives under `load_sae`. ValueError for theta not a finite
    number > 0, a non-TopK SAE or a wrong width.
    """
    check_topk_sae(sae)
    theta = _check_theta(theta)
    x2 = _flat(sae, x)
    rows = max(1, sae.max_pre_elements // sae.d_sae)
    vals, idxs = [], []
    for r0 in range(0, x2.shape[0], rows):
        pre = _centred(sae, x2[r0:r0 + rows]) @ sae.W_enc + sae.b_enc
        z = pre * (pre > theta)
        width = max(1, int((z != 0).sum(1).max()))
        v, i = z.topk(width, dim=1)
        vals.append(v)
        idxs.append(i)
    width = max(v.shape[1] for v in vals)
    values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in vals])
    indices = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in idxs])
    return {"theta": theta, **_point(sae, x2, values, indices)}


def _positive(name: str, value, hint: str) -> float:
    """value as a float; ValueError naming `name` and `hint` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0 ({hint})")
    return float(value)


def _check_theta(theta) -> float:
    return _positive("threshold theta", theta, "the units of the SAE's pre-activations; get one with "
                     "calibrate_threshold / threshold_for_l0")


def _check_target(target_l0) -> float:
    return _positive("target_l0", target_l0, "mean active latents per token")


def calibrate_threshold(values: torch.Tensor, target_l0: float, d_sae: int) -> float:
    """The single threshold theta > 0 at which the mean L0 of z = pre * 1[pre > theta] over the N tokens
    of `values` is round(target_l0 * N) / N (Gao et al. 2024 sec. 5.3's fixed-threshold variant).

    values: float [N, m], each row the m largest pre-activations of a token sorted descending
      (`topk_codes`); d_sae: the SAE's number of latents (m == d_sae means the rows are complete).
    theta is the midpoint between the c-th and (c+1)-th largest pre-activation of all tokens
    (c = round(target_l0 * N); the (c+1)-th taken as max(., 0)), so exactly c values exceed it unless
    the two are tied. Returns a Python float.

    Raises ValueError for target_l0 not a finite number > 0, or above the mean number of positive
    pre-activations (the most a threshold > 0 keeps; the message gives it); TruncatedCodesError (a
    ValueError) when m < d_sae and some token's m-th value exceeds theta (call again with larger m).
    """
    target_l0 = _check_target(target_l0)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be [N, m] with N >= 1 (topk_codes), got shape {tuple(values.shape)}")
    n, m = values.shape
    c = max(1, round(float(target_l0) * n))
    s = values.flatten().float()
    if c > s.numel():
        raise TruncatedCodesError(f"target_l0={target_l0} needs more than m={m} pre-activations per token")
    top = s.topk(min(c + 1, s.numel())).values
    if top[c - 1] <= 0:
        reach = float((values > 0).sum()) / n
        raise ValueError(f"target_l0={target_l0} is not reachable with a threshold > 0: at most "
                         f"{reach:.4g} pre-activations per token are positive; lower the target")
    nxt = float(top[c].clamp_min(0)) if c < top.numel() else 0.0
    theta = 0.5 * (float(top[c - 1]) + nxt)
    if m < int(d_sae) and bool((values[:, m - 1] > theta).any()):
        raise TruncatedCodesError(f"theta={theta:.6g} for target_l0={target_l0}: some token has more than "
                                  f"m={m} pre-activations above it; recompute topk_codes with a larger m")
    return theta


def _covering_codes(sae, x2: torch.Tensor, m: int, targets: Sequence[float]):
    """(values, indices, thetas): topk_codes of x2 with m doubled until `calibrate_threshold` of every
    target succeeds on them."""
    while True:
        values, indices = topk_codes(sae, x2, m)
        try:
            return values, indices, [calibrate_threshold(values, t, sae.d_sae) for t in targets]
        except TruncatedCodesError:
            if m >= sae.d_sae:
                raise
            m = min(sae.d_sae, 2 * m)


@torch.no_grad()
def threshold_for_l0(sae, x: torch.Tensor, target_l0: float) -> float:
    """theta > 0 whose JumpReLU (z = pre * 1[pre > theta], all latents) has mean L0 `target_l0` on the raw
    activations x [..., d_in] (up to 1/(2N) and ties; `calibrate_threshold`, Gao et al. 2024 sec. 5.3).
    ValueError as `calibrate_threshold` (unreachable target) and for a non-TopK SAE / wrong width."""
    x2 = _flat(sae, x)
    m = min(sae.d_sae, max(2 * math.ceil(_check_target(target_l0)), 16))
    return _covering_codes(sae, x2, m, [target_l0])[2][0]


@torch.no_grad()
def progressive_curve(sae, x: torch.Tensor, k_values: Sequence[int] | None = None, *,
                      calib_x: torch.Tensor | None = None) -> dict[str, Any]:
    """The progressive-recovery curves of a loaded TopK SAE (Gao et al. 2024 sec. 5.3, Figure 10).

    x: held-out raw activations [..., d_in]; k_values: the k' of the TopK curve (default: round(f * k)
    for f in DEFAULT_K_FACTORS, k/4 ... 4k). The threshold curve has one point per TopK point, its
    target L0 that point's measured L0; theta is calibrated on `calib_x` [..., d_in] (default: x itself;
    theta only picks the sparsity: both L0 and fvu are measured on x).

    Returns {"k_train", "tokens", "topk": [{"k", "l0", "fvu", "fvu_normalized_inputs", "mse"}, ...],
    "threshold": [{"target_l0", "theta", "l0", "fvu", "fvu_normalized_inputs", "mse"}, ...],
    "calibration": "same tokens" | "calib_x (<n> tokens)", "definition"}. ValueError for a non-TopK SAE,
    a wrong width, a k' outside [1, d_sae], and `calibrate_threshold`'s errors.
    """
    k = check_topk_sae(sae)
    ks = sorted({int(v) for v in k_values}) if k_values else k_values_from_factors(k, DEFAULT_K_FACTORS, sae.d_sae)
    if ks[0] < 1 or ks[-1] > sae.d_sae:
        raise ValueError(f"k' values {ks} must lie in [1, d_sae={sae.d_sae}]")
    x2 = _flat(sae, x)
    calib2 = None if calib_x is None else _flat(sae, calib_x)
    values, indices = topk_codes(sae, x2, min(sae.d_sae, 2 * ks[-1]))
    topk = [{"k": kp, **_point(sae, x2, torch.relu(values[:, :kp]), indices[:, :kp])} for kp in ks]
    targets = [p["l0"] for p in topk]
    if calib2 is not None:
        thetas = _covering_codes(sae, calib2, values.shape[1], targets)[2]
    else:
        values, indices, thetas = _covering_codes(sae, x2, values.shape[1], targets)
    m = values.shape[1]
    while m < sae.d_sae and bool((values[:, -1] > min(thetas)).any()):  # calib_x's theta may need more on x
        m = min(sae.d_sae, 2 * m)
        values, indices = topk_codes(sae, x2, m)
    threshold = []
    for target, theta in zip(targets, thetas, strict=True):
        keep = values > theta
        threshold.append({"target_l0": target, "theta": theta,
                          **_point(sae, x2, values * keep, indices)})
    return {"k_train": k, "tokens": int(x2.shape[0]), "topk": topk, "threshold": threshold,
            "calibration": "same tokens" if calib2 is None else f"calib_x ({calib2.shape[0]} tokens)",
            "definition": _DEFINITION}


def export_fixed_threshold(src: str | os.PathLike, dst: str | os.PathLike, theta: float) -> Path:
    """Write the TopK SAE export `src` as a JumpReLU export at `dst` with one threshold theta for every
    latent (Gao et al. 2024 sec. 5.3's fixed-threshold variant): the same W_enc, b_enc, W_dec, b_dec and
    normalisation, cfg.json architecture "jumprelu" (SAELens' name: z = ReLU(pre) * 1[pre > threshold])
    and a float32 `threshold` [d_sae] filled with theta (units of the export's pre-activations, as
    `calibrate_threshold` / `threshold_for_l0` return on `load_sae(src)`). `load_sae(dst)` then gives
    the outputs of `evaluate_threshold(load_sae(src), x, theta)`. Returns `dst`.

    ValueError: `src` is not a "topk" export, theta not a finite number > 0; FileNotFoundError /
    ValueError from `sae_dist.sae.formats.read_sae_files` for a missing or bad `src`.
    """
    from sae_dist.sae.formats import read_sae_files, write_sae_files

    theta = _check_theta(theta)
    cfg, tensors = read_sae_files(src)
    if cfg["architecture"] != "topk":
        raise ValueError(f"{src}: architecture {cfg['architecture']!r}; export_fixed_threshold converts a "
                         "'topk' export (the SAE of sae-train with sae=topk)")
    k = cfg.pop("k")
    cfg.update({"architecture": "jumprelu", "activation_fn": "relu", "activation_fn_kwargs": {},
                "converted_from": (f"topk k={k} -> jumprelu with one threshold {theta!r} for all latents "
                                   "(Gao et al. 2024 sec. 5.3; sae_dist.eval.progressive)"),
                "fixed_threshold": theta, "trained_k": int(k)})
    tensors = {**tensors, "threshold": torch.full((int(cfg["d_sae"]),), theta, dtype=torch.float32)}
    return write_sae_files(Path(dst), cfg, tensors)
