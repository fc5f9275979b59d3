"""Reading an SAE directory (cfg.json + sae_weights.safetensors), ours or SAELens', into one canonical form.

The weights may also be latent-sharded (`sae_weights-0000i-of-0000N.safetensors` + the index
`sae_weights.safetensors.index.json`, what `sae-push` uploads for an SAE over its shard size:
`sae_dist.sae.shards`); `read_sae_files` reassembles them.

Our export (`sae_dist.sae.export.export_sae`) IS SAELens' on-disk layout; SAELens' own saves
(`SAE.save_model` in SAELens 6.x, and the older pre-6.0 layout) vary in key names, nesting and tensors.
`canonical_cfg` / `canonical_tensors` map every variant onto the one dict and tensor set
`sae_dist.sae.export.ExportedSAE` runs; `read_sae_cfg` / `read_sae_files` read a directory that way.
`load_sae` (sae_dist.sae.export) and the format conversions (sae_dist.sae.formats) both build on this
module, which imports neither.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_dist.sae.shards import LATENT_AXES, SHARD_INDEX_FILENAME, read_shards

__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "SHARD_INDEX_FILENAME", "SUPPORTED_ARCHITECTURES", "hook_layer",
           "canonical_cfg", "canonical_tensors", "read_sae_cfg", "has_weights", "read_sae_files"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: Architectures `load_sae` runs ("prolu" is ours; the others are SAELens' names).
SUPPORTED_ARCHITECTURES = ("topk", "standard", "jumprelu", "prolu")

# pre-6.0 SAELens cfg.json key names -> current ones
_RENAMED_KEYS = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                 "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
# tensors a SAELens save may hold besides the four matrices/biases; anything else is warned about
_KNOWN_TENSORS = {*LATENT_AXES, "b_dec"}


def hook_layer(hook_name: str | None) -> int | None:
    """The block index L of a hook name "blocks.<L>. ..." (TransformerLens style), else None."""
    m = re.match(r"blocks\.(\d+)\.", str(hook_name or ""))
    return int(m.group(1)) if m else None


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
    cfg = _renamed_and_lifted(raw)
    cfg["architecture"] = _architecture(cfg, where)
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
        cfg["hook_layer"] = hook_layer(cfg.get("hook_name"))
    if not _is_ours(cfg):
        cfg.setdefault("source_format", "saelens")
    return cfg


def _renamed_and_lifted(raw: dict) -> dict:
    """A copy of cfg.json with pre-6.0 key names renamed (an existing new name wins) and SAELens 6.x's
    "metadata" values copied to the top level where it has None or nothing."""
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
    return cfg


def _architecture(cfg: dict, where: str) -> str:
    """The canonical architecture of a renamed cfg (`canonical_cfg`'s rules); sets cfg["k"] (int) for "topk".
    ValueError (naming `where`) for an unsupported architecture, a "topk" without k, or a SAELens
    standard/jumprelu SAE whose activation_fn is not ReLU."""
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
    return arch


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


def has_weights(path: str | os.PathLike) -> bool:
    """Whether the SAE directory `path` has weights: sae_weights.safetensors or a sharded-weights index."""
    return (Path(path) / WEIGHTS_FILENAME).is_file() or (Path(path) / SHARD_INDEX_FILENAME).is_file()


def read_sae_files(path: str | os.PathLike, cfg: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(canonical cfg, float32 tensors) of the SAE directory `path` (cfg.json + sae_weights.safetensors, ours
    or SAELens'; or cfg.json + latent-sharded weights, `sae_dist.sae.shards.read_shards`, when the directory
    has no sae_weights.safetensors but an index); `canonical_cfg` + `canonical_tensors` on its files.
    cfg: its `read_sae_cfg`, when the caller has read it already (None: read here).
    FileNotFoundError when it has neither (or a shard is missing); ValueError as `canonical_tensors`, or for
    shards that do not fit together (`read_shards`)."""
    p = Path(path)
    cfg = read_sae_cfg(p) if cfg is None else cfg
    if (p / WEIGHTS_FILENAME).is_file() or not (p / SHARD_INDEX_FILENAME).is_file():
        tensors = load_file(str(p / WEIGHTS_FILENAME), device="cpu")
        return canonical_tensors(cfg, tensors, where=str(p / WEIGHTS_FILENAME))
    return canonical_tensors(cfg, read_shards(p), where=str(p / SHARD_INDEX_FILENAME))
