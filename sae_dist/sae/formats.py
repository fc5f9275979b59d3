"""SAE file formats other tools use: SAELens (both directions) and EleutherAI sparsify (export).

Our export (`sae_dist.sae.export.export_sae`) IS SAELens' on-disk layout (cfg.json +
sae_weights.safetensors); docs/formats.md says what loads where. This module holds the rest:

* Reading SAELens' own saves (`SAE.save_model` in SAELens 6.x, and the older pre-6.0 layout) into
  our `load_sae`: `canonical_cfg` / `canonical_tensors` map their variants onto the one dict and
  tensor set `ExportedSAE` runs; `read_sae_files` / `read_sae_cfg` read a directory that way. They
  live in `sae_dist.sae.sae_files` (which `load_sae` uses too) and are re-exported here;
  `write_sae_files` writes a directory in our layout.
* `import_saelens`: a canonical copy in our layout, optionally folding SAELens'
  "expected_average_only_in" constant (which its files do not store).
* `to_saelens`: a copy SAELens' `SAE.load_from_disk` loads for every architecture we export; only
  ProLU needs rewriting (as an exactly equivalent JumpReLU).
* `export_sparsify`: a TopK SAE in sparsify's `SparseCoder.load_from_disk` layout.

The formulas are those of the formats' definitions (SAELens: z = act((x_n - b_dec) W_enc + b_enc),
x^ = z W_dec + b_dec, optional per-token normalisation; sparsify: z = TopK(ReLU(W (x - b_dec) + b)),
x^ = sum_i z_i W_dec[i] + b_dec); the tests check them against the packages themselves.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_dist.sae.export import ExportedSAE, ExportedTopKSAE, commit_export, load_sae, tmp_weights_path
from sae_dist.sae.sae_files import (
    CFG_FILENAME,
    SUPPORTED_ARCHITECTURES,
    canonical_cfg,
    canonical_tensors,
    read_sae_cfg,
    read_sae_files,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES", "SPARSIFY_WEIGHTS_FILENAME", "SPARSIFY_PROVENANCE_FILENAME", "canonical_cfg",
    "canonical_tensors",
    "read_sae_cfg", "read_sae_files", "write_sae_files", "import_saelens", "to_saelens", "export_sparsify",
]

#: sparsify's weights file name (its cfg.json has the same name as ours).
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
#: provenance written next to a sparsify export (sparsify ignores it)
SPARSIFY_PROVENANCE_FILENAME = "sae_dist.json"


def write_sae_files(out: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an SAE directory in our layout (the inverse of `read_sae_files`): the tensors as float32
    sae_weights.safetensors and cfg.json, committed atomically; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()},
              str(tmp_weights_path(out)))
    commit_export(out, cfg)
    return out


def import_saelens(src: str | os.PathLike, dst: str | os.PathLike, *,
                   norm_scaling_factor: float | None = None) -> Path:
    """Write a canonical copy of the SAE directory `src` (SAELens' save or ours) to `dst` in our
    layout (float32; cfg.json with hook_name etc. at top level), which `load_sae`, sae-eval and
    sae-browse read. Returns `dst`.

    norm_scaling_factor: for SAELens' normalize_activations "expected_average_only_in" (the SAE
      was trained on s * x with the dataset constant s = sqrt(d_in) / E||x||, which SAELens keeps
      outside the SAE's files): s is folded exactly as SAELens' `fold_activation_norm_scaling_factor`
      defines it, W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s (then
      (x - b_dec/s) s W_enc = (s x - b_dec) W_enc: the same latents, reconstruction in raw units),
      and the copy says "none".
    ValueError: "expected_average_only_in" without norm_scaling_factor, a norm_scaling_factor for
    any other mode, a non-finite or non-positive factor, and `canonical_cfg`'s errors.
    """
    cfg, t = read_sae_files(src)
    mode = cfg["normalize_activations"]
    if norm_scaling_factor is not None:
        s = float(norm_scaling_factor)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"norm_scaling_factor={norm_scaling_factor!r}; expected a finite number > 0")
        if mode != "expected_average_only_in":
            raise ValueError(
                f"norm_scaling_factor given but {src}'s normalize_activations is {mode!r}; it applies only "
                "to 'expected_average_only_in'"
            )
        t["W_enc"] = t["W_enc"] * s
        t["W_dec"] = t["W_dec"] / s
        t["b_dec"] = t["b_dec"] / s
        cfg["normalize_activations"] = "none"
        cfg["import_folds"] = [*(cfg.get("import_folds") or []),
                               f"norm_scaling_factor {s!r}: W_enc *= s, W_dec /= s, b_dec /= s"]
    elif mode == "expected_average_only_in":
        raise ValueError(
            f"{src}: normalize_activations='expected_average_only_in' needs the dataset constant "
            "s = sqrt(d_in) / E||x|| the SAE was trained with: pass norm_scaling_factor=s (SAELens' "
            "pretrained_saes.yaml lists it as norm_scaling_factor for its releases)"
        )
    cfg["dtype"] = "float32"
    cfg["imported_from"] = str(src)
    ExportedTopKSAE(cfg, t) if cfg["architecture"] == "topk" else ExportedSAE(cfg, t)  # validates
    return write_sae_files(Path(dst), cfg, t)


def to_saelens(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write a copy of our export `src` that SAELens' `SAE.load_from_disk` (6.x) loads, to `dst`.

    "topk", "standard", "jumprelu" exports already load in SAELens; they are copied unchanged
    (float32). "prolu" (no SAELens class) becomes the exactly equivalent "jumprelu": with
    m = (x_n - b_dec) W_enc, ProLU gives z = m 1[m > 0] 1[m + b_enc > 0] = m 1[m > max(0, -b_enc)],
    which is SAELens' JumpReLU ReLU(pre) 1[pre > threshold] with b_enc' = 0 and
    threshold = max(0, -b_enc) (so pre = m). Returns `dst`. ValueError from `read_sae_files`;
    "expected_average_only_in" sources are refused (fold it with `import_saelens` first).
    """
    cfg, t = read_sae_files(src)
    if cfg["normalize_activations"] == "expected_average_only_in":
        raise ValueError(f"{src}: fold normalize_activations='expected_average_only_in' with "
                         "import_saelens(src, dst, norm_scaling_factor=s) first")
    if cfg["architecture"] == "prolu":
        t = dict(t)
        t["threshold"] = torch.relu(-t["b_enc"])
        t["b_enc"] = torch.zeros_like(t["b_enc"])
        cfg = {**cfg, "architecture": "jumprelu", "activation_fn": "relu", "activation_fn_kwargs": {},
               "converted_from": "prolu (b_enc' = 0, threshold = max(0, -b_enc); see sae_dist.sae.formats)"}
    return write_sae_files(Path(dst), cfg, t)


def export_sparsify(sae, out_dir: str | os.PathLike, *, allow_normalized_inputs: bool = False) -> Path:
    """Write a TopK SAE in EleutherAI sparsify's layout: `out_dir/sae.safetensors` +
    `out_dir/cfg.json`, loadable by `sparsify.SparseCoder.load_from_disk(out_dir)` (`Sae` is the
    same class). Returns `out_dir`.

    sae: an SAE directory (ours or SAELens'; read with `load_sae`) or an `ExportedTopKSAE`.
    sparsify computes z = TopK(ReLU((x - b_dec) W^T + b)) with its encoder an nn.Linear
    (weight W [d_sae, d_in], bias b [d_sae]) and x^ = sum over the k kept latents of z_i W_dec[i] +
    b_dec (W_dec [d_sae, d_in]); we write encoder.weight = W_enc^T, encoder.bias = b_enc, W_dec,
    b_dec (float32): the same latents (values and, where the value is > 0, indices) and the same x^
    as our model. An SAE with apply_b_dec_to_input false gets encoder.bias = b_enc + b_dec W_enc
    (sparsify always subtracts b_dec; equal up to float rounding).
    cfg.json: d_in, num_latents = d_sae, k, activation "topk", expansion_factor, normalize_decoder
    (whether W_dec's rows have unit norm), multi_topk/skip_connection/transcode false (only keys
    sparsify's SparseCoderConfig knows, so it loads silently). `out_dir/sae_dist.json` records the
    provenance: source, hook_name, model_name, input normalisation, b_dec fold.

    Input normalisation: sparsify has none. A "none" SAE (our "scalar" and "none" trainings, whose
    scale is folded into the weights) needs nothing. A per-token one ("layer_norm",
    "constant_norm_rescale") raises ValueError unless allow_normalized_inputs=True: then the weights
    are written unchanged, sparsify's model takes the normalised input x_n of
    `ExportedSAE.normalize_input` (layer_norm: (x - mean(x)) / std(x) with the unbiased std, plus
    SAELens' 1e-5 in the std for SAELens-written SAEs; constant_norm_rescale: x sqrt(d_in)/||x||)
    and returns x^ in that space; the rule is recorded in sae_dist.json and a UserWarning is issued.
    ValueError: an architecture other than "topk" (naming it); TypeError: `sae` is neither a path
    nor an `ExportedTopKSAE` (export a training module with `export_sae` first).
    """
    sae, src = _exported_topk(sae)
    rule = _sparsify_input_rule(sae, allow_normalized_inputs)
    with torch.no_grad():
        W_enc = sae.W_enc.detach().float().cpu()
        b_enc = sae.b_enc.detach().float().cpu()
        W_dec = sae.W_dec.detach().float().cpu()
        b_dec = sae.b_dec.detach().float().cpu()
        if not sae.apply_b_dec_to_input:
            b_enc = b_enc + b_dec @ W_enc
    cfg = _sparsify_cfg(W_dec, int(sae.k))
    provenance = {
        "format": "EleutherAI sparsify SparseCoder (sae.safetensors + cfg.json), written by sae_dist",
        "source": src,
        "hook_name": sae.cfg.get("hook_name"),
        "model_name": sae.cfg.get("model_name"),
        "input_normalization": rule,
        "b_dec_folded_into_encoder_bias": not sae.apply_b_dec_to_input,
    }
    tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc.contiguous(),
               "W_dec": W_dec.contiguous(), "b_dec": b_dec.contiguous()}
    return _write_sparsify_files(Path(out_dir), tensors, cfg, provenance)


def _exported_topk(sae) -> tuple[ExportedTopKSAE, str | None]:
    """(model, source directory or None) of `export_sparsify`'s `sae` argument: a directory is loaded with
    `load_sae`. TypeError for anything but a directory or an `ExportedSAE`; ValueError when it is not a
    TopK SAE (architecture "topk")."""
    if isinstance(sae, (str, os.PathLike)):
        src = str(sae)
        sae = load_sae(sae)
    elif isinstance(sae, ExportedSAE):
        src = None
    else:
        raise TypeError(
            f"export_sparsify takes an SAE directory or a sae_dist.load_sae model, got {type(sae).__name__}; "
            "export a training module with sae_dist.sae.export_sae first"
        )
    arch = getattr(sae, "architecture", None)
    if arch != "topk" or not isinstance(sae, ExportedTopKSAE):
        raise ValueError(
            f"export_sparsify: architecture {arch!r} is not supported; sparsify's SparseCoder is a TopK "
            "SAE, so only architecture 'topk' exports (TopK, Matryoshka-TopK, tree, soft TopK)"
        )
    return sae, src


def _sparsify_input_rule(sae: ExportedTopKSAE, allow_normalized_inputs: bool) -> str:
    """The input rule a sparsify copy of `sae` needs, as recorded in sae_dist.json: "none", or (with
    allow_normalized_inputs, and a UserWarning to `export_sparsify`'s caller) the per-token normalisation
    its input must get. ValueError for a per-token normalisation without allow_normalized_inputs."""
    mode = sae.normalize_activations
    if mode == "none":
        return "none"
    if not allow_normalized_inputs:
        raise ValueError(
            f"export_sparsify: this SAE normalises each input per token (normalize_activations={mode!r}) "
            "and sparsify has no input normalisation; pass allow_normalized_inputs=True to export "
            "weights that take the normalised input (see docs/formats.md)"
        )
    if mode == "constant_norm_rescale":
        rule = "x_n = x * sqrt(d_in) / ||x||; x^ returned in that space"
    elif sae.ln_convention == "saelens":
        rule = "x_n = (x - mean(x)) / (std(x, unbiased) + 1e-5); x^ returned in that space"
    else:
        rule = "x_n = (x - mean(x)) / std(x, unbiased); x^ returned in that space"
    warnings.warn(f"export_sparsify: the sparsify model takes normalised inputs: {rule}", stacklevel=3)
    return rule


def _sparsify_cfg(W_dec: torch.Tensor, k: int) -> dict:
    """sparsify's cfg.json for a TopK SAE with decoder W_dec [d_sae, d_in] (float32) and k: only keys
    sparsify's SparseCoderConfig knows; normalize_decoder says whether W_dec's rows have unit norm (atol 1e-4)."""
    d_sae, d_in = W_dec.shape
    unit = bool(torch.allclose(W_dec.norm(dim=-1), torch.ones(d_sae), atol=1e-4, rtol=0))
    return {
        "activation": "topk",
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": unit,
        "num_latents": int(d_sae),
        "k": int(k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": int(d_in),
    }


def _write_sparsify_files(out: Path, tensors: dict[str, torch.Tensor], cfg: dict, provenance: dict) -> Path:
    """Write sparsify's sae.safetensors and cfg.json and our sae_dist.json into `out` (created if missing),
    each under a temporary name first; the weights and cfg.json are renamed into place last. Returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tmp_w = out / (SPARSIFY_WEIGHTS_FILENAME + ".tmp")
    tmp_c = out / (CFG_FILENAME + ".tmp")
    save_file(tensors, str(tmp_w))
    tmp_c.write_text(json.dumps(cfg, indent=2))
    tmp_p = out / (SPARSIFY_PROVENANCE_FILENAME + ".tmp")
    tmp_p.write_text(json.dumps(provenance, indent=2))
    os.replace(tmp_p, out / SPARSIFY_PROVENANCE_FILENAME)
    os.replace(tmp_w, out / SPARSIFY_WEIGHTS_FILENAME)
    os.replace(tmp_c, out / CFG_FILENAME)
    return out
