"""Export a trained SAE (any architecture) in SAELens' on-disk layout and load it back (docs/formats.md#sae-export).

Files: `cfg.json` + `sae_weights.safetensors` (`W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec`
[d_sae, d_in] with unit-norm rows, `b_dec` [d_in]). The exported SAE takes RAW activations.

How the training-time input normalisation is folded (the training module sees x_n, computes
pre = (x_n - b_dec) W_enc + b_enc, z = TopK(pre), x_n^ = z W_dec + b_dec):

* "scalar" (x_n = s * x, s = sqrt(d_in) / E||x||): exported with normalize_activations "none" and
  b_enc' = b_enc / s, b_dec' = b_dec / s, W_enc' = W_enc, W_dec' = W_dec. Then on raw x,
  pre' = (x - b_dec') W_enc + b_enc' = pre / s (same TopK selection since s > 0), z' = z / s and
  z' W_dec + b_dec' = x_n^ / s = the raw reconstruction. W_dec keeps unit-norm rows; the latent
  activations of the exported SAE are those of the training module divided by s.
* "layer_norm" (ours, paper section 2.1: x_n = (x - mean(x)) / ||x - mean(x)|| * sqrt(d)) is
  per-token and cannot be folded; it is exported as normalize_activations "layer_norm". SAELens
  computes x_sl = (x - mu) / (std(x) + 1e-5) with the unbiased std (correction 1) and outputs
  x_sl^ * std + mu. Since ||x - mu|| = std * sqrt(d - 1), x_n = c * x_sl with c = sqrt(d / (d - 1))
  (up to SAELens' eps, a relative 1e-5/std difference). The constant c is folded exactly like s
  above: b_enc' = b_enc / c, b_dec' = b_dec / c, W_enc, W_dec unchanged (unit rows). `load_sae`
  applies our normalisation exactly (sae_dist.store.reader.normalize) and divides by c, so it reproduces
  the training module's x^ to float rounding; SAELens reproduces it up to its eps.
* "none": weights exported unchanged.

Compatibility (docs/formats.md; tests/unit/sae/test_formats_saelens.py checks it against SAELens 6.x): SAELens'
`SAE.load_from_disk` loads "topk", "standard" and "jumprelu" exports as they are (cfg.json's
metadata.sae_lens_version marks the 6.x layout); "prolu" goes through
`sae_dist.sae.formats.to_saelens`. `load_sae` also reads SAELens' own saves (via
`sae_dist.sae.sae_files.read_sae_files`), and `sae_dist.sae.formats.export_sparsify` writes TopK SAEs
for EleutherAI sparsify.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sae_dist.kernels.sparse_decode import sparse_decode_reference
from sae_dist.sae.sae_files import (
    CFG_FILENAME,
    SHARD_INDEX_FILENAME,
    WEIGHTS_FILENAME,
    canonical_cfg,
    canonical_tensors,
    has_weights,
    hook_layer,
    read_sae_cfg,
    read_sae_files,
)

__all__ = ["export_sae", "export_state", "exported_view", "load_sae", "ExportedSAE", "ExportedTopKSAE", "check_d_in",
           "topk_pre_blocked", "MAX_PRE_ELEMENTS", "CFG_FILENAME", "WEIGHTS_FILENAME", "export_cfg_dict",
           "tmp_weights_path", "commit_export"]

#: the SAELens cfg.json layout version our export follows (written as metadata.sae_lens_version)
SAELENS_FORMAT_VERSION = "6.0.0"


def _fold_factor(normalize: str, d_in: int, scale: float | None) -> tuple[float, str]:
    """(factor f, exported normalize_activations): exported b_enc = b_enc/f, b_dec = b_dec/f."""
    if normalize == "scalar":
        if scale is None or not (scale > 0) or not math.isfinite(scale):
            raise ValueError(
                f"export with normalize='scalar' needs the store's scale s > 0, got scale={scale!r}"
            )
        return float(scale), "none"
    if normalize == "layer_norm":
        if d_in < 2:
            raise ValueError(f"layer_norm needs d_in >= 2, got {d_in}")
        return math.sqrt(d_in / (d_in - 1)), "layer_norm"
    if normalize == "none":
        return 1.0, "none"
    raise ValueError(f"normalize={normalize!r}; valid: layer_norm, scalar, none")


def export_cfg_dict(*, d_in: int, d_sae: int, k: int | None, normalize: str, scale: float | None,
                    hook_name: str | None, model_name: str | None, extra_cfg: dict | None,
                    arch_cfg: dict | None = None) -> tuple[dict, float]:
    """(cfg.json content, fold factor f) of an export; shared by `export_sae` and the sharded export
    (`sae_dist.parallel.export.export_sae_sharded`) so both write the same file. arch_cfg: the
    architecture's fields (`SparseAutoencoder.export_cfg`); None: TopK with `k`. extra_cfg: merged
    into the top level (and into "metadata" where it has the key).

    ValueError from `_fold_factor` for a bad normalize / missing scale.
    """
    f, norm_out = _fold_factor(normalize, d_in, scale)
    meta = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer(hook_name),
        "hook_head_index": None,
        # our harvest puts BOS at position 0 of every sequence of context_size tokens (sae_dist.harvest.text
        # .pack_document) and never stores it (the attention sink): the SAE saw positions 1.. only, which SAELens
        # and SAEBench read from seqpos_slice (slice(1, None)); the trainer fills context_size and dataset_path
        "prepend_bos": True,
        "seqpos_slice": [1, None],
        "context_size": None,
        "dataset_path": None,
        # our hooks read the unmodified HF model; TransformerLens' default weight processing centres the
        # residual stream's writing weights, which would change the activations SAELens feeds the SAE
        "model_from_pretrained_kwargs": {"center_writing_weights": False},
    }
    if arch_cfg is None:
        arch_cfg = {"architecture": "topk", "k": int(k), "activation_fn": "topk",
                    "activation_fn_kwargs": {"k": int(k)}}
    cfg = {
        "architecture": arch_cfg["architecture"],
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        **{key: val for key, val in arch_cfg.items() if key != "architecture"},
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": norm_out,
        "reshape_activations": "none",
        "finetuning_scaling_factor": False,
        **meta,
        # "sae_lens_version" marks the layout (SAELens >= 6.0: metadata nested here), so SAELens'
        # loader reads it as a 6.x file instead of converting it as a pre-6.0 one (that conversion
        # fails on hook_name None); the SAE was not trained by SAELens ("sae_lens_training_version")
        "metadata": {**meta, "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None},
        "sae_dist": {
            "train_normalize": normalize,
            "scale": None if scale is None else float(scale),
            "fold_factor": f,
            "note": "b_enc and b_dec were divided by fold_factor; see sae_dist/sae/export.py",
        },
    }
    for key, val in (extra_cfg or {}).items():
        cfg[key] = val
        if key in cfg["metadata"]:
            cfg["metadata"][key] = val
    return cfg, f


def tmp_weights_path(out: Path) -> Path:
    """Temporary name (in the SAE directory `out`) the weights are written under before `commit_export`
    renames them to sae_weights.safetensors."""
    return out / (WEIGHTS_FILENAME + ".tmp")


def commit_export(out: Path, cfg: dict) -> None:
    """Finish an export into the directory `out` whose weights are already at `tmp_weights_path(out)`: write
    `cfg` as cfg.json (via a temporary name), then rename the weights, then the cfg into place (a reader that
    finds cfg.json finds complete weights)."""
    tmp_c = out / (CFG_FILENAME + ".tmp")
    tmp_c.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmp_weights_path(out), out / WEIGHTS_FILENAME)
    os.replace(tmp_c, out / CFG_FILENAME)


@torch.no_grad()
def export_state(
    sae,
    *,
    hook_name: str | None,
    model_name: str | None,
    normalize: str,
    scale: float | None = None,
    extra_cfg: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json content, float32 tensors of sae_weights.safetensors) of the export of `sae` (`export_sae`'s
    arguments; the input normalisation folded as the module docstring says), the tensors on `device`.

    On the parameters' own device and dtype (float32) W_enc and W_dec are the parameters' storage, not copies
    (detached); the folded biases are new tensors. ValueError for inconsistent shapes or a bad normalize /
    missing scale.
    """
    params = sae.export_params() if hasattr(sae, "export_params") else {
        "W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    W_enc, b_enc, W_dec, b_dec = (params[n].detach().to(device, torch.float32) for n in ("W_enc", "b_enc", "W_dec",
                                                                                          "b_dec"))
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(
            f"inconsistent SAE shapes W_enc {tuple(W_enc.shape)} W_dec {tuple(W_dec.shape)} "
            f"b_enc {tuple(b_enc.shape)} b_dec {tuple(b_dec.shape)}"
        )
    arch_cfg = sae.export_cfg() if hasattr(sae, "export_cfg") else None
    cfg, f = export_cfg_dict(d_in=d_in, d_sae=d_sae, k=None if arch_cfg else int(sae.k), normalize=normalize,
                             scale=scale, hook_name=hook_name, model_name=model_name, extra_cfg=extra_cfg,
                             arch_cfg=arch_cfg)
    tensors = {
        "W_enc": W_enc.contiguous(),
        "b_enc": (b_enc / f).contiguous(),
        "W_dec": W_dec.contiguous(),
        "b_dec": (b_dec / f).contiguous(),
    }
    extras = sae.export_extras() if hasattr(sae, "export_extras") else {}
    for name, t in extras.items():
        tensors[name] = (t.detach().to(device, torch.float32) / f).contiguous()
    return cfg, tensors


def export_sae(
    sae,
    out_dir: str | os.PathLike,
    *,
    hook_name: str | None,
    model_name: str | None,
    normalize: str,
    scale: float | None = None,
    extra_cfg: dict | None = None,
) -> Path:
    """Write `out_dir/cfg.json` and `out_dir/sae_weights.safetensors` (SAELens layout, float32).

    sae: a `SparseAutoencoder` of any architecture (or any module with W_enc [d_in, d_sae], b_enc,
      W_dec [d_sae, d_in], b_dec and an integer `k`: exported as TopK) trained on normalised inputs.
      Its `export_cfg()` gives cfg.json's architecture fields, `export_extras()` extra tensors in
      activation units (folded like b_enc, e.g. a JumpReLU `threshold`), `export_files()` extra JSON
      files written next to the weights (e.g. a tree's `tree.json`).
    normalize: the training normalisation ("layer_norm" | "scalar" | "none"); scale: the store's
      scalar s for "scalar" mode (ValueError if missing). See the module docstring for the folding.
    extra_cfg: merged into cfg.json (top level) e.g. {"context_size": 128, "dataset_path": ...}.
    Returns the output directory. The files are written to temporary names then renamed.
    A latent-sharded SAE is exported without gathering it by
    `sae_dist.parallel.export.export_sae_sharded` (same files). `exported_view` is the same SAE in memory.
    """
    cfg, tensors = export_state(sae, hook_name=hook_name, model_name=model_name, normalize=normalize, scale=scale,
                                extra_cfg=extra_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = sae.export_files() if hasattr(sae, "export_files") else {}
    for name, obj in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, out / name)
    save_file(tensors, str(tmp_weights_path(out)))
    commit_export(out, cfg)
    return out


def exported_view(sae, *, normalize: str, scale: float | None = None) -> ExportedSAE:
    """The module `load_sae` would return for `export_sae(sae, ..., normalize=normalize, scale=scale)`, built in
    memory on the SAE's device without writing files: an `ExportedTopKSAE` / `ExportedSAE` in eval mode taking
    RAW activations [..., d_in]. W_enc and W_dec share the storage of float32 parameters (no copy: the view
    follows the SAE until its next optimizer step); the folded biases are copies ([d_sae] + [d_in] floats).
    For a whole SAE only: a latent shard (tp > 1) would give the shard's own SAE. ValueError as `export_state`.
    """
    device = sae.W_dec.device
    cfg, tensors = export_state(sae, hook_name=None, model_name=None, normalize=normalize, scale=scale, device=device)
    cfg, tensors = canonical_tensors(canonical_cfg(cfg), tensors)
    return _exported_module(cfg, tensors)


def _exported_module(cfg: dict, tensors: dict[str, torch.Tensor]) -> ExportedSAE:
    """`ExportedTopKSAE` for architecture "topk", else `ExportedSAE`, of a canonical cfg and its tensors, in eval
    mode."""
    cls = ExportedTopKSAE if cfg["architecture"] == "topk" else ExportedSAE
    return cls(cfg, tensors).eval()


class ExportedSAE(nn.Module):
    """An exported SAE of a dense-activation architecture taking RAW activations (the contract API).

    cfg.json "architecture" -> activation of the pre-activations pre = (x_n - b_dec) W_enc + b_enc
    (x_n - b_dec replaced by x_n when cfg.json says apply_b_dec_to_input false, as SAELens does):
      "standard" (ReLU+L1; SAELens' name): z = ReLU(pre)
      "jumprelu" (JumpReLU, and BatchTopK / Matryoshka-BatchTopK at inference; SAELens' name):
          z = ReLU(pre) * 1[pre > threshold], `threshold` [d_sae] in the weights file
      "prolu" (ProLU, Taggart 2024): m = pre - b_enc, z = m * 1[m > 0] * 1[m + b_enc > 0]
    Parameters W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold).
    Inputs may have any leading dims [..., d_in].
      encode(x) -> [..., d_sae] dense; decode(z) -> [..., d_in]; forward(x) -> x_hat [..., d_in].

    cfg.json "normalize_activations" (x -> x_n on the way in, the inverse on the way out):
      "none": x_n = x.
      "layer_norm", our export (cfg.json has a "sae_dist" block): our per-token normalisation
          (sae_dist.store.reader.normalize, Gao et al. 2024 sec. 2.1) divided by the fold factor
          c = sqrt(d_in / (d_in - 1)) (module docstring), i.e. x_n = (x - mean) / std_unbiased.
      "layer_norm", written by SAELens: SAELens' rule x_n = (x - mean) / (std_unbiased + 1e-5),
          output y * std_unbiased + mean.
      "constant_norm_rescale" (SAELens): x_n = x * sqrt(d_in) / ||x||, output y * ||x|| / sqrt(d_in).
    Per-token modes take their statistics from the input: forward handles them itself; decode uses
    the statistics of the most recent encode call (as SAELens does) and raises RuntimeError when
    there is none of a matching shape. Other modes raise ValueError at construction
    ("expected_average_only_in": see `sae_dist.sae.formats.import_saelens`).
    """

    ARCHITECTURES = ("standard", "jumprelu", "prolu")
    NORMALIZE_MODES = ("none", "layer_norm", "constant_norm_rescale")

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.architecture = cfg.get("architecture", "topk")
        self.W_enc = nn.Parameter(tensors["W_enc"])
        self.b_enc = nn.Parameter(tensors["b_enc"])
        self.W_dec = nn.Parameter(tensors["W_dec"])
        self.b_dec = nn.Parameter(tensors["b_dec"])
        if "threshold" in tensors:
            self.threshold = nn.Parameter(tensors["threshold"])
        self.d_in = int(cfg["d_in"])
        self.d_sae = int(cfg["d_sae"])
        self.k = None if cfg.get("k") is None else int(cfg["k"])
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        self.normalize_activations = cfg.get("normalize_activations", "none")
        if self.normalize_activations == "expected_average_only_in":
            raise ValueError(
                "normalize_activations='expected_average_only_in': this SAE expects inputs multiplied by "
                "a dataset constant s = sqrt(d_in) / E||x|| that its files do not store (SAELens keeps "
                "it in its pretrained-SAE directory as norm_scaling_factor); fold it into a copy with "
                "sae_dist.sae.formats.import_saelens(src, dst, norm_scaling_factor=s) and load that"
            )
        if self.normalize_activations not in self.NORMALIZE_MODES:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported by "
                f"sae_dist.load_sae (supported: {', '.join(self.NORMALIZE_MODES)})"
            )
        d = self.d_in
        self.ln_convention = "sae_dist" if isinstance(cfg.get("sae_dist"), dict) else "saelens"
        self.ln_factor = float(
            cfg.get("sae_dist", {}).get("fold_factor", math.sqrt(d / (d - 1)))
        ) if (self.normalize_activations == "layer_norm" and self.ln_convention == "sae_dist") else 1.0
        self._ln_ctx = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        check_d_in(self, x.shape[-1])
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] raw -> x_n [B, d_in], the input the weights act on (class docstring); per-token
        modes remember the statistics for the next `decode`."""
        mode = self.normalize_activations
        if mode == "none":
            self._ln_ctx = None
            return x
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True)
            self._ln_ctx = (x.shape[0], coeff)
            return x * coeff
        if self.ln_convention == "saelens":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            self._ln_ctx = (x.shape[0], (mu, std))
            return xc / (std + 1e-5)
        from sae_dist.store import normalize

        x_n, ctx = normalize(x, "layer_norm")
        self._ln_ctx = (x.shape[0], ctx)
        return x_n / self.ln_factor

    def denormalize_output(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, d_in] in the weights' space -> raw space, with the statistics of the last encode."""
        mode = self.normalize_activations
        if mode == "none":
            return y
        if self._ln_ctx is None or self._ln_ctx[0] != y.shape[0]:
            raise RuntimeError(
                f"this SAE normalises inputs per token ({mode}): call encode/encode_sparse on "
                "the same batch before decode, or use forward(x)"
            )
        stats = self._ln_ctx[1]
        if mode == "constant_norm_rescale":
            return y / stats
        if self.ln_convention == "saelens":
            mu, std = stats
            return y * std + mu
        from sae_dist.store import denormalize

        return denormalize(y * self.ln_factor, "layer_norm", stats)

    # old private names, kept for callers inside the package
    _norm_in = normalize_input
    _norm_out = denormalize_output

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        x_n = self.normalize_input(x)
        if self.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        return x_n @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, d_sae] from pre-activations [B, d_sae] (the class docstring's rules)."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "prolu":
            m = pre - self.b_enc
            return m * ((m > 0) & (pre > 0))
        raise ValueError(f"architecture {self.architecture!r}; valid: {self.ARCHITECTURES}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw -> z [..., d_sae] dense, non-negative."""
        lead = x.shape[:-1]
        return self.activation(self._pre(self._flat(x))).reshape(*lead, self.d_sae)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d_sae] -> raw reconstruction [..., d_in]."""
        lead = z.shape[:-1]
        y = z.reshape(-1, self.d_sae).to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return self.denormalize_output(y).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw -> x_hat [..., d_in] raw."""
        return self.decode(self.encode(x))


#: Most pre-activation elements `ExportedTopKSAE.encode_sparse` materialises at once (256 MiB of
#: float32): a batch whose [B, d_sae] pre-activations are larger is encoded in blocks of tokens, and
#: a single token whose d_sae alone exceeds it in blocks of latents too.
MAX_PRE_ELEMENTS = 1 << 26


def topk_pre_blocked(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                     max_elements: int = MAX_PRE_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest pre-activations of xc @ W_enc + b_enc per row, never more than `max_elements`
    of them in memory at once: (values [B, k] sorted descending, before any ReLU; indices [B, k] int64).

    xc [B, d_in] (already normalised and centred), W_enc [d_in, n], b_enc [n], 1 <= k <= n. When
    B * n <= max_elements this is the plain dense `topk`; otherwise rows are taken in blocks of
    max(1, max_elements // n) tokens, and when one row alone exceeds the budget its latents in blocks
    of max(k, max_elements) columns whose top-k are merged into a running top-k (same selection; an
    exact tie at the k-th value may pick another index of the same value). Differentiable.
    """
    B, n = xc.shape[0], W_enc.shape[1]
    if B * n <= max_elements:
        return (xc @ W_enc + b_enc).topk(k, dim=-1)
    cols = n if n <= max_elements else max(k, max_elements)
    rows = max(1, max_elements // cols)
    out_v, out_i = [], []
    for r0 in range(0, B, rows):
        xr = xc[r0:r0 + rows]
        best_v = best_i = None
        for c0 in range(0, n, cols):
            pre = torch.addmm(b_enc[c0:c0 + cols], xr, W_enc[:, c0:c0 + cols])
            v, i = pre.topk(min(k, pre.shape[1]), dim=-1)
            i = i + c0
            if best_v is not None:
                v, j = torch.cat([best_v, v], dim=1).topk(k, dim=-1)
                i = torch.cat([best_i, i], dim=1).gather(1, j)
            best_v, best_i = v, i
        out_v.append(best_v)
        out_i.append(best_i)
    return torch.cat(out_v), torch.cat(out_i)


class ExportedTopKSAE(ExportedSAE):
    """An exported TopK SAE ("topk": TopK, soft TopK, Matryoshka/tree over TopK) taking RAW
    activations (the contract API): as `ExportedSAE`, z = ReLU of the k largest pre-activations, and
      encode_sparse(x) -> (values [..., k], indices [..., k] int64)
      decode_sparse(values, indices) -> [..., d_in] raw space.
    encode_sparse and forward hold at most `max_pre_elements` (default MAX_PRE_ELEMENTS) pre-activations
    at a time (`topk_pre_blocked`), so a batch of a 16M-latent SAE needs no [B, d_sae] matrix; `encode`
    returns the dense [..., d_sae] latents it promises, built from the sparse ones.
    """

    max_pre_elements: int = MAX_PRE_ELEMENTS

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw -> z [..., d_sae] dense, non-negative (k non-zero entries at most)."""
        vals, idx = self.encode_sparse(x)
        z = vals.new_zeros(*vals.shape[:-1], self.d_sae)
        return z.scatter(-1, idx, vals)

    def encode_sparse(self, x: torch.Tensor):
        """x [..., d_in] raw -> (values [..., k] >= 0, indices [..., k] int64)."""
        lead = x.shape[:-1]
        x_n = self.normalize_input(self._flat(x))
        if self.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        vals, idx = topk_pre_blocked(x_n, self.W_enc, self.b_enc, self.k, self.max_pre_elements)
        vals = torch.relu(vals)
        return vals.reshape(*lead, self.k), idx.reshape(*lead, self.k)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(values, indices) [..., k] -> raw reconstruction [..., d_in]."""
        lead = values.shape[:-1]
        kk = values.shape[-1]
        y = sparse_decode_reference(values.reshape(-1, kk), indices.reshape(-1, kk), self.W_dec, self.b_dec)
        return self.denormalize_output(y).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw -> x_hat [..., d_in] raw."""
        vals, idx = self.encode_sparse(x)
        return self.decode_sparse(vals, idx)


def check_d_in(sae, d: int) -> None:
    """ValueError "activation width d != SAE d_in D" when an input width does not match."""
    if int(d) != int(sae.d_in):
        raise ValueError(
            f"activation width {d} != SAE d_in {sae.d_in}: this SAE was trained on a hook of "
            f"width {sae.d_in}; use the matching model/hook"
        )


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedSAE:
    """Load an SAE directory -> `ExportedTopKSAE` (architecture "topk") or `ExportedSAE`
    ("standard", "jumprelu", "prolu") on `device`, float32; it takes raw activations. `path` may be a
    hub path, ``hf://ORG/REPO[/SUBFOLDER][@REVISION]`` (`sae_dist.sae.hub.resolve_sae_path`).

    Reads our exports and SAELens' own saves (`SAE.save_model`, any 6.x and the older layouts:
    hook_name under "metadata", "hook_point", "activation_fn_str", log_threshold, scaling_factor,
    rescale_acts_by_decoder_norm, apply_b_dec_to_input false, bfloat16 weights); how each is
    mapped: `sae_dist.sae.sae_files.canonical_cfg` / `canonical_tensors`. The model's `cfg` is the
    canonical dict (hook_name, model_name, ... at top level). The weights may be latent-sharded
    (`sae_weights.safetensors.index.json` + shards, as `sae-push` uploads big SAEs: `sae_dist.sae.shards`).

    FileNotFoundError naming the missing file(s) or shard(s); ValueError for an unsupported architecture
    (e.g. SAELens' "gated"), an unsupported normalize_activations, weights whose shapes disagree with
    cfg.json (or a jumprelu without `threshold`), or shards that do not fit together (a gap in the latent
    ranges, a shard inconsistent with the index); MemoryError, before reading any weight, when `device` is a
    CUDA device with less free memory than the float32 W_enc and W_dec (8 * d_sae * d_in bytes).
    """
    from sae_dist.sae.hub import resolve_sae_path

    p = resolve_sae_path(path)
    missing = [n for n, ok in ((CFG_FILENAME, (p / CFG_FILENAME).is_file()), (WEIGHTS_FILENAME, has_weights(p)))
               if not ok]
    if missing:
        raise FileNotFoundError(
            f"SAE directory {str(p)!r} lacks {', '.join(missing)} (expected an export made by "
            "sae_dist.sae.export.export_sae / sae-train, or SAELens' SAE.save_model: cfg.json + "
            f"sae_weights.safetensors, or sharded weights with {SHARD_INDEX_FILENAME} as sae-push uploads them)"
        )
    cfg = read_sae_cfg(p)
    check_fits_device(int(cfg["d_in"]), int(cfg["d_sae"]), device, f"the SAE at {str(p)!r}")
    cfg, tensors = read_sae_files(p, cfg)
    return _exported_module(cfg, tensors).to(device)


def check_fits_device(d_in: int, d_sae: int, device: str | torch.device, what: str, memory: str = "free") -> None:
    """MemoryError when the float32 W_enc and W_dec of a [d_in, d_sae] SAE (8 * d_sae * d_in bytes) exceed the
    CUDA `device`'s free memory (memory="free", what `load_sae` checks before reading weights) or its total
    memory (memory="total": it can never hold them). `what` names the SAE in the message. Other devices are
    not checked."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = 8 * d_sae * d_in
    free, total = torch.cuda.mem_get_info(device)
    if need > (free if memory == "free" else total):
        gib = 2.0**30
        raise MemoryError(
            f"{what} (d_sae={d_sae}, d_in={d_in}) needs {need / gib:.1f} GiB of "
            f"float32 weights on {device}, which has {free / gib:.1f} GiB free of {total / gib:.1f} GiB: load it on "
            "the CPU (device='cpu', sae-eval device=cpu) if host memory allows, or read the held-out metrics the "
            "trainer computes on the latent-sharded SAE (trainer.eval_every_steps)")
