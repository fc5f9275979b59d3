"""SAE file formats other tools use: SAELens (both directions) and EleutherAI sparsify (export).

Our export (`sae_dist.sae.export.export_sae`) IS SAELens' on-disk layout (cfg.json +
sae_weights.safetensors); docs/formats.md says what loads where. This module holds the rest:

* Reading SAELens' own saves (`SAE.save_model` in SAELens 6.x, and the older pre-6.0 layout) into
  our `load_sae`: `canonical_cfg` / `canonical_tensors` map their variants onto the one dict and
  tensor set `ExportedSAE` runs; `read_sae_files` / `read_sae_cfg` read a directory that way.
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
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_dist.sae.export import (
    CFG_FILENAME,
    WEIGHTS_FILENAME,
    ExportedSAE,
    ExportedTopKSAE,
    _commit,
    _tmp_weights_path,
    load_sae,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES", "SPARSIFY_WEIGHTS_FILENAME", "SPARSIFY_PROVENANCE_FILENAME", "canonical_cfg",
    "canonical_tensors",
    "read_sae_cfg", "read_sae_files", "write_sae_files", "import_saelens", "to_saelens", "export_sparsify",
]

#: Architectures `load_sae` runs ("prolu" is ours; the others are SAELens' names).
SUPPORTED_ARCHITECTURES = ("topk", "standard", "jumprelu", "prolu")
#: sparsify's weights file name (its cfg.json has the same name as ours).
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
#: provenance written next to a sparsify export (sparsify ignores it)
SPARSIFY_PROVENANCE_FILENAME = "sae_dist.json"

# pre-6.0 SAELens cfg.json key names -> current ones
_RENAMED_KEYS = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                 "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
# tensors a SAELens save may hold besides the four matrices/biases; anything else is warned about
_KNOWN_TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "scaling_factor"}


def _is_ours(cfg: dict) -> bool:
    """Whether cfg.json was written by our export (it carries a "sae_dist" block)."""
    return isinstance(cfg.get("sae_dist"), dict)


def canonical_cfg(raw: dict, *, where: str = CFG_FILENAME) -> dict:
    """cfg.json of our export or of any SAELens version -> the dict `ExportedSAE` reads.

    Returns a new dict with, at top level: "architecture" (one of SUPPORTED_ARCHITECTURES),
    "d_in", "d_sae" (ints), "k" (int, "topk" only, from "k" or activation_fn_kwargs["k"]),
    "normalize_activations" (str; pre-6.0 booleans mapped as SAELens maps them: false -> "none",
    true -> "expected_average_only_in"), "apply_b_dec_to_input" (default true), and the metadata
    keys SAELens 6.x nests under "metadata" (hook_name, model_name, context_size, ...) copied up
    where the top level lacks them ("hook_layer" derived from "blocks.<L>." when missing). Pre-6.0
    names are renamed (hook_point -> hook_name, activation_fn_str -> activation_fn, ...); a missing
    architecture is "standard", and a pre-6.0 "standard" with activation_fn "topk" is "topk".
    Our own exports pass through unchanged apart from these defaults.

    Raises ValueError (message names `where`) for an architecture outside SUPPORTED_ARCHITECTURES
    (e.g. SAELens' "gated", "abstopk", "matching_pursuit", transcoders), a SAELens "standard" SAE
    with an activation other than ReLU, a "topk" without k, or missing/non-positive d_in / d_sae.
    """
    cfg = dict(raw)
    for old, new in _RENAMED_KEYS.items():
        if old in cfg:
            val = cfg.pop(old)
            cfg.setdefault(new, val)
    meta = cfg.get("metadata")
    if isinstance(meta, dict):
        for key, val in meta.items():
            if cfg.get(key) is None and val is not None:
                cfg[key] = val
    arch = cfg.get("architecture") or "standard"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    act = cfg.get("activation_fn")
    if arch == "standard" and act == "topk" and kwargs.get("k") is not None:
        arch = "topk"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {arch!r} is not supported by sae_dist.load_sae (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); load this SAE with SAELens itself"
        )
    if arch == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if k is None:
            raise ValueError(f"{where}: architecture 'topk' without k (nor activation_fn_kwargs.k)")
        cfg["k"] = int(k)
    if not _is_ours(cfg) and arch in ("standard", "jumprelu") and act not in (None, "relu"):
        raise ValueError(
            f"{where}: activation_fn={act!r} for architecture {arch!r}; sae_dist.load_sae runs "
            "SAELens' ReLU-based standard/jumprelu SAEs only (activation_fn 'relu')"
        )
    cfg["architecture"] = arch
    for key in ("d_in", "d_sae"):
        val = cfg.get(key)
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{where}: {key}={val!r}; expected a positive integer")
    norm = cfg.get("normalize_activations")
    if norm is None or norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    cfg["normalize_activations"] = norm
    cfg["apply_b_dec_to_input"] = bool(cfg.get("apply_b_dec_to_input", True))
    if cfg.get("hook_layer") is None:
        m = re.match(r"blocks\.(\d+)\.", str(cfg.get("hook_name") or ""))
        cfg["hook_layer"] = int(m.group(1)) if m else None
    if not _is_ours(cfg):
        cfg.setdefault("source_format", "saelens")
    return cfg


def canonical_tensors(cfg: dict, tensors: dict[str, torch.Tensor], *,
                      where: str = WEIGHTS_FILENAME) -> tuple[dict, dict[str, torch.Tensor]]:
    """Weights of a canonical cfg (`canonical_cfg`) -> (cfg, float32 tensors `ExportedSAE` takes).

    tensors: the safetensors file's tensors, any float dtype. Returns W_enc [d_in, d_sae],
    b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold [d_sae] for "jumprelu"),
    float32, after mapping SAELens' variants exactly as SAELens runs them:
      log_threshold (older JumpReLU saves) -> threshold = exp(log_threshold);
      scaling_factor [d_sae] (pre-6.0 "finetuning" scale, x^ = (z * s) W_dec + b_dec): dropped when
        all ones (SAELens' rule), else folded W_dec[i] <- s_i W_dec[i];
      "topk" with rescale_acts_by_decoder_norm (z = TopK(pre * ||W_dec_i||), x^ = (z / ||W_dec_i||)
        W_dec + b_dec): folded W_enc[:, i] *= n_i, b_enc[i] *= n_i, W_dec[i] /= n_i (n_i = ||W_dec_i||,
        clamped >= 1e-12); same latents, unit decoder rows; cfg then says false.
    The returned cfg is a copy; folds are listed in cfg["import_folds"]. Other unknown tensors are
    ignored with a UserWarning naming them. ValueError (naming `where`) for a missing tensor or a
    shape that disagrees with cfg's d_in / d_sae.
    """
    cfg = dict(cfg)
    t = {name: val for name, val in tensors.items()}
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    folds = list(cfg.get("import_folds") or [])
    unknown = sorted(set(t) - _KNOWN_TENSORS)
    if unknown:
        warnings.warn(f"{where}: ignoring tensors {unknown} (not used by sae_dist.load_sae)", stacklevel=3)
    if cfg["architecture"] == "jumprelu" and "threshold" not in t and "log_threshold" in t:
        t["threshold"] = t["log_threshold"].float().exp()
        folds.append("threshold = exp(log_threshold)")
    need = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        need["threshold"] = (d_sae,)
    for name, shape in need.items():
        if name not in t:
            raise ValueError(f"{where} lacks tensor {name!r}")
        if tuple(t[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t[name].shape)}, cfg.json implies {shape}")
    out = {name: t[name].float() for name in need}
    if "scaling_factor" in t:
        sf = t["scaling_factor"].float()
        if tuple(sf.shape) != (d_sae,):
            raise ValueError(f"{where}: scaling_factor has shape {tuple(sf.shape)}, expected ({d_sae},)")
        if not torch.allclose(sf, torch.ones_like(sf)):
            out["W_dec"] = out["W_dec"] * sf[:, None]
            folds.append("W_dec[i] *= scaling_factor[i]")
    if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        n = out["W_dec"].norm(dim=-1).clamp_min(1e-12)
        out["W_enc"] = out["W_enc"] * n
        out["b_enc"] = out["b_enc"] * n
        out["W_dec"] = out["W_dec"] / n[:, None]
        cfg["rescale_acts_by_decoder_norm"] = False
        folds.append("rescale_acts_by_decoder_norm: W_enc[:, i] *= n_i, b_enc[i] *= n_i, W_dec[i] /= n_i")
    if folds:
        cfg["import_folds"] = folds
    return cfg, {name: val.contiguous() for name, val in out.items()}


def read_sae_cfg(path: str | os.PathLike) -> dict:
    """The canonical cfg (`canonical_cfg`) of the SAE directory `path` (ours or SAELens'): use it
    instead of reading cfg.json directly, so SAELens' nested metadata (hook_name, model_name) is
    found. FileNotFoundError when `path/cfg.json` is missing; ValueError as `canonical_cfg`."""
    f = Path(path) / CFG_FILENAME
    if not f.is_file():
        raise FileNotFoundError(f"no {CFG_FILENAME} in {str(Path(path))!r}")
    return canonical_cfg(json.loads(f.read_text()), where=str(f))


def read_sae_files(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(canonical cfg, float32 tensors) of the SAE directory `path` (cfg.json +
    sae_weights.safetensors, ours or SAELens'); `canonical_cfg` + `canonical_tensors` on its files."""
    p = Path(path)
    cfg = read_sae_cfg(p)
    tensors = load_file(str(p / WEIGHTS_FILENAME), device="cpu")
    return canonical_tensors(cfg, tensors, where=str(p / WEIGHTS_FILENAME))


def write_sae_files(out: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an SAE directory in our layout (the inverse of `read_sae_files`): the tensors as float32
    sae_weights.safetensors and cfg.json, committed atomically; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()},
              str(_tmp_weights_path(out)))
    _commit(out, cfg)
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
    mode = sae.normalize_activations
    rule = "none"
    if mode != "none":
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
        warnings.warn(f"export_sparsify: the sparsify model takes normalised inputs: {rule}", stacklevel=2)
    with torch.no_grad():
        W_enc = sae.W_enc.detach().float().cpu()
        b_enc = sae.b_enc.detach().float().cpu()
        W_dec = sae.W_dec.detach().float().cpu()
        b_dec = sae.b_dec.detach().float().cpu()
        if not sae.apply_b_dec_to_input:
            b_enc = b_enc + b_dec @ W_enc
    d_in, d_sae = W_enc.shape
    unit = bool(torch.allclose(W_dec.norm(dim=-1), torch.ones(d_sae), atol=1e-4, rtol=0))
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": unit,
        "num_latents": int(d_sae),
        "k": int(sae.k),
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": int(d_in),
    }
    provenance = {
        "format": "EleutherAI sparsify SparseCoder (sae.safetensors + cfg.json), written by sae_dist",
        "source": src,
        "hook_name": sae.cfg.get("hook_name"),
        "model_name": sae.cfg.get("model_name"),
        "input_normalization": rule,
        "b_dec_folded_into_encoder_bias": not sae.apply_b_dec_to_input,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc.contiguous(),
               "W_dec": W_dec.contiguous(), "b_dec": b_dec.contiguous()}
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
