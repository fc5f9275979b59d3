"""Any exported SAE as SAEBench's SAE class: `to_saebench` (docs/formats.md#saebench).

SAEBench (Karvonen et al. 2025, "SAEBench: A Comprehensive Benchmark for Sparse Autoencoders",
github.com/adamkarvonen/SAEBench) evaluates custom SAEs through `sae_bench.custom_saes.base_sae.BaseSAE`:
parameters W_enc [d_in, d_sae], W_dec [d_sae, d_in] (unit-norm rows), b_enc [d_sae], b_dec [d_in];
encode / decode / forward on the RAW activations of the hook `cfg.hook_name` of the TransformerLens model
`cfg.model_name`; and `cfg` (a `CustomSAEConfig`) with the SAE's provenance. `to_saebench` presents a
`sae_dist.load_sae` model (any architecture: "topk", "standard", "jumprelu", "prolu"; ours or SAELens')
that way. encode / decode / forward ARE the loaded model's (`ExportedSAE`: the normalisation folded or
applied per token, the sparse TopK path): the adapter holds the same parameter tensors and adds no math.

SAEBench's pins (transformers < 4.57, numpy < 2, a CUDA torch) conflict with this project's, so it is
installed without its dependencies; its core evaluation (`sae_bench.evals.core.main`) then needs only
`tabulate` besides what sae-dist's [test] extra brings: see `SAEBENCH_INSTALL`.
"""

from __future__ import annotations

import functools
import os

import torch

from sae_dist.extras import MissingExtraError
from sae_dist.sae.export import ExportedSAE, load_sae
from sae_dist.sae.sae_files import hook_layer

__all__ = ["to_saebench", "SAEBENCH_INSTALL"]

#: how to install SAEBench next to sae-dist (its own pins would downgrade transformers and numpy)
SAEBENCH_INSTALL = "pip install tabulate && pip install --no-deps sae-bench==0.6.0"


@functools.cache
def _adapter_class():
    """The `BaseSAE` subclass wrapping an `ExportedSAE` (built on first use: sae_bench is optional)."""
    try:
        from sae_bench.custom_saes.base_sae import BaseSAE
    except ImportError as e:
        raise MissingExtraError(
            f"to_saebench needs SAEBench (the sae_bench package), which is not importable ({e}); install it "
            f"without its pinned dependencies: {SAEBENCH_INSTALL}"
        ) from e

    class SAEBenchSAE(BaseSAE):
        """SAEBench's `BaseSAE` over an `ExportedSAE` (`self.sae`), sharing its parameters (no copy)."""

        def __init__(self, sae: ExportedSAE, *, model_name: str, hook_name: str, layer: int,
                     device: torch.device, dtype: torch.dtype):
            # BaseSAE allocates zero W_enc / W_dec of the full size: on the meta device they take no memory;
            # they are replaced by the loaded model's parameters below
            with torch.device("meta"):
                super().__init__(d_in=sae.d_in, d_sae=sae.d_sae, model_name=model_name, hook_layer=layer,
                                 device=torch.device("meta"), dtype=dtype, hook_name=hook_name)
            self.sae = sae
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                setattr(self, name, getattr(sae, name))
            self.to(device=device, dtype=dtype)

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            """x [..., d_in] raw activations -> latents [..., d_sae] (dense, >= 0): `ExportedSAE.encode`."""
            return self.sae.encode(x)

        def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
            """latents [..., d_sae] -> reconstruction [..., d_in] in raw units: `ExportedSAE.decode` (a per-token
            normalisation uses the statistics of the last `encode`, as SAELens does)."""
            return self.sae.decode(feature_acts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """x [..., d_in] raw -> x_hat [..., d_in] raw: `ExportedSAE.forward`."""
            return self.sae(x)

    return SAEBenchSAE


def _as_dtype(dtype) -> torch.dtype:
    """torch.dtype of `dtype` (a torch.dtype or its name, e.g. "bfloat16"); ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    out = getattr(torch, str(dtype), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating dtype; use e.g. torch.float32 or 'bfloat16'")
    return out


def _fill_cfg(cfg, src: dict, sae: ExportedSAE, device: torch.device) -> None:
    """Copy the provenance of the canonical cfg.json `src` into SAEBench's CustomSAEConfig `cfg`."""
    cfg.architecture = sae.architecture
    cfg.apply_b_dec_to_input = sae.apply_b_dec_to_input
    cfg.activation_fn_str = src.get("activation_fn") or ("topk" if sae.architecture == "topk" else "relu")
    cfg.activation_fn_kwargs = {"k": sae.k} if sae.k is not None else {}
    cfg.normalize_activations = sae.normalize_activations  # applied inside encode, as SAELens does
    cfg.context_size = src.get("context_size")
    cfg.dataset_path = src.get("dataset_path") or ""
    cfg.prepend_bos = bool(src.get("prepend_bos", True))
    cfg.model_from_pretrained_kwargs = dict(src.get("model_from_pretrained_kwargs") or {})
    cfg.seqpos_slice = tuple(src.get("seqpos_slice") or (None,))
    if src.get("training_tokens") is not None:
        cfg.training_tokens = int(src["training_tokens"])
    cfg.device = str(device)


def to_saebench(sae, *, model_name: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype | str = torch.float32):
    """An instance of a subclass of SAEBench's `sae_bench.custom_saes.base_sae.BaseSAE` for `sae`.

    sae: an SAE directory (ours or SAELens'; a ``hf://`` path too), read with `sae_dist.load_sae`, or an
      `ExportedSAE` it returned (then shared, not copied: moving or casting the adapter moves it too).
    model_name: the TransformerLens name of the LM the SAE reads (SAEBench loads it with
      `HookedTransformer.from_pretrained_no_processing(model_name, **cfg.model_from_pretrained_kwargs)`);
      default cfg.json's model_name.
    device, dtype: where and in which dtype the adapter's parameters live (SAEBench's core evaluation casts
      the SAE to the LM's dtype itself).
    Returns the adapter: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] are the
    loaded model's parameters; encode(x [..., d_in]) -> [..., d_sae], decode -> [..., d_in], forward(x) ->
    x_hat [..., d_in], all `ExportedSAE`'s; `cfg` carries hook_name, hook_layer, d_in, d_sae,
    architecture, activation_fn_str / _kwargs (k), normalize_activations, apply_b_dec_to_input,
    context_size, dataset_path, prepend_bos, model_from_pretrained_kwargs, seqpos_slice, training_tokens
    from cfg.json.

    Raises MissingExtraError (an ImportError) when sae_bench is not installed, naming `SAEBENCH_INSTALL`;
    TypeError for anything but a path or an `ExportedSAE`; ValueError when the SAE names no model
    (pass model_name), has no hook_name, or its hook is not inside a block "blocks.<L>." (SAEBench runs
    the LM up to layer L), or for a non-float dtype; `load_sae`'s errors for a bad directory.
    """
    cls = _adapter_class()
    dtype = _as_dtype(dtype)
    device = torch.device(device)
    if isinstance(sae, (str, os.PathLike)):
        sae = load_sae(sae, device=device)
    elif not isinstance(sae, ExportedSAE):
        raise TypeError(f"to_saebench takes an SAE directory or a sae_dist.load_sae model, got "
                        f"{type(sae).__name__}; export a training module with sae_dist.sae.export_sae first")
    src = sae.cfg
    hook_name, model_name = src.get("hook_name"), model_name or src.get("model_name")
    layer = hook_layer(hook_name)
    if not model_name:
        raise ValueError("the SAE's cfg.json names no model_name: pass to_saebench(..., model_name=<the "
                         "TransformerLens name of the LM>)")
    if layer is None:
        raise ValueError(f"SAEBench needs the block index of the SAE's hook, but hook_name={hook_name!r} is not "
                         "of the form 'blocks.<L>.<hook>' (TransformerLens' names)")
    out = cls(sae, model_name=model_name, hook_name=hook_name, layer=layer, device=device, dtype=dtype)
    _fill_cfg(out.cfg, src, sae, device)
    return out
