"""Configuration of the TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", arXiv:2406.04093).

Every field is a recipe knob of the paper; defaults follow the paper (section numbers in comments).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from sae_dist.fielddoc import option

__all__ = ["SAEConfig", "default_k_aux", "resolve_dead_tokens", "PAPER_DEAD_TOKENS", "NORMALIZE_MODES",
           "B_DEC_INITS", "DTYPES", "KERNEL_BACKENDS"]

NORMALIZE_MODES = ("layer_norm", "scalar", "none")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DTYPES = ("float32", "bfloat16", "float16")
#: architectures whose k is required (active latents per token, or per token on average)
_NEEDS_K = ("topk", "batchtopk", "matryoshka", "tree", "soft_topk")
KERNEL_BACKENDS = ("auto", "torch", "triton")


def default_k_aux(d_in: int) -> int:
    """Power of two nearest (in log scale) to d_in / 2: the paper's k_aux heuristic (Appendix A.2:
    "k_aux = d_model / 2", rounded here to a power of two). 768 -> 512, 576 -> 256, 32 -> 16."""
    if d_in < 2:
        return 1
    return 2 ** int(round(math.log2(d_in / 2)))


#: The paper's dead-latent threshold (Gao et al. 2024, section 2.4.1): no fire in 10M tokens.
PAPER_DEAD_TOKENS = 10_000_000


def resolve_dead_tokens(dead_tokens: int | None, run_tokens: int) -> int:
    """The AuxK dead threshold in tokens: `dead_tokens` when set, else min(10M, run_tokens // 10).

    The paper's 10M tokens (section 2.4.1) is a small fraction of its multi-billion-token runs; in a run
    of fewer than 100M tokens a tenth of the run plays that role, so that AuxK can fire at all (a
    threshold >= the run's length never marks a latent dead). run_tokens: the run's total training
    tokens (>= 1). Returns an int >= 1.
    """
    if dead_tokens is not None:
        return int(dead_tokens)
    return max(1, min(PAPER_DEAD_TOKENS, int(run_tokens) // 10))


@dataclass
class SAEConfig:
    """TopK SAE hyper-parameters.

    Fields:
      d_in: width of the hooked activation (the LM's d_model); required.
      d_sae: number of latents ("n" in the paper); default 16384.
      k: active latents per token (TopK, section 2.3); default 32.
      k_aux: latents used by the AuxK loss (Appendix A.2); None -> `default_k_aux(d_in)`, capped at
        d_sae.
      auxk_coef: AuxK loss coefficient alpha (Appendix A.2: 1/32).
      dead_tokens: a latent is dead (an AuxK target) when it has not fired for this many tokens;
        None (default) -> `resolve_dead_tokens`: the paper's 10M (section 2.4.1), or a tenth of the
        run when that is shorter (the paper's 10M is a small fraction of its runs).
      multi_topk: add the Multi-TopK term L(multi_topk_factor * k) * multi_topk_weight (section 5.3,
        L(k) + L(4k)/8).
      b_dec_init: "geometric_median" (section 2.1 / Appendix A.1), "mean" or "zeros".
      normalize: input normalisation of the activations, "layer_norm" (per-token mean-subtract, unit
        norm times sqrt(d_in), section 2.1), "scalar" (x * s, s = sqrt(d_in) / E||x||) or "none".
      dtype: parameter dtype ("float32"; master weights stay fp32 even under bf16 autocast).
      enc_init_scale: W_enc = enc_init_scale * W_dec^T at init (tied init, section 2.4.1; 1.0 here,
        the paper's transpose). The `sae=topk` CLI default (conf/sae/topk.yaml) is 1/sqrt(3), the row norm
        of `nn.Linear`'s default init that EleutherAI sparsify keeps for its encoder while tying only the
        direction: on the issue-15 comparison (benchmarks/quality.py) it lowers held-out fvu and the CE
        increase at once.
      kernels: deprecated and ignored (false warns): `TopKSAE.training_step_losses` always runs the
        `sae_dist.kernels` ops (fused encoder + running TopK that never materialises the [B, d_sae]
        pre-activations, sparse decode, AuxK), on CPU through their torch backend; the dense torch
        version is `sae_dist.sae.topk.topk_losses_reference`, the test oracle.
      architecture: registry name (`sae_dist.sae.registry.ARCHITECTURES`, Hydra `sae=<name>`).
      options: the architecture's own options (validated by its `Options` dataclass), e.g.
        {"l1_coef": 0.008} for relu. k may be None for architectures without k (relu, prolu, jumprelu).
      kernel_backend: backend of those kernels, "auto" (Triton when the tensors are on CUDA, else the
        chunked torch reference), "torch", or "triton" (CPU only under TRITON_INTERPRET=1, for tests).

    Raises ValueError naming the bad field and its valid range.
    """

    d_in: int = option(doc="width of the hooked activation (sae-train reads it from the store)")
    d_sae: int = option(16384, "number of latents (n in the paper)")
    k: int | None = option(32, "active latents per token (TopK family); null for relu / prolu / jumprelu")
    k_aux: int | None = option(None, "latents of the AuxK loss; null: a power of two near d_in / 2")
    auxk_coef: float = option(1.0 / 32.0, "AuxK loss coefficient (the paper's 1/32)")
    dead_tokens: int | None = option(None, "a latent not fired for this many tokens is dead (AuxK target); "
                                           "null: min(10M, tokens / 10)")
    multi_topk: bool = option(False, "add the Multi-TopK term L(factor * k) * weight (L(k) + L(4k)/8)")
    multi_topk_factor: int = option(4, "Multi-TopK: k multiplier of the second term")
    multi_topk_weight: float = option(0.125, "Multi-TopK: weight of the second term")
    b_dec_init: str = option("geometric_median", "b_dec init: geometric_median | mean | zeros")
    normalize: str = option("layer_norm", "input normalisation: layer_norm (paper, per token) | scalar "
                                          "(sqrt(d)/E||x||, folded at export) | none")
    dtype: str = option("float32", "parameter dtype: float32 | bfloat16 | float16")
    enc_init_scale: float = option(1.0, "tied init W_enc = c * W_dec^T (sae=topk: 1/sqrt(3))")
    kernels: bool = option(True, "deprecated and ignored: the TopK training path always runs sae_dist.kernels")
    kernel_backend: str = option("auto", "auto (Triton on CUDA, chunked torch on CPU) | torch | triton")
    architecture: str = option("topk", "architecture (the sae=<name> option)")
    options: dict = option({}, "the architecture's own options (top-level keys of the sae group on the CLI)")

    def __post_init__(self) -> None:
        from sae_dist.sae.registry import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"sae.architecture={self.architecture!r}; valid: {', '.join(ARCHITECTURES)}"
            )
        self.options = dict(self.options or {})
        for name in ("d_in", "d_sae", "k"):
            v = getattr(self, name)
            if name == "k" and v is None and self.architecture not in _NEEDS_K:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"sae.{name} must be a positive int, got {v!r}")
        if self.k is not None and self.k > self.d_sae:
            raise ValueError(
                f"sae.k={self.k} > d_sae={self.d_sae}: k must be <= d_sae "
                "(lower sae.k or raise sae.d_sae)"
            )
        if self.k_aux is None:
            self.k_aux = min(default_k_aux(self.d_in), self.d_sae)
        if not isinstance(self.k_aux, int) or self.k_aux < 1 or self.k_aux > self.d_sae:
            raise ValueError(
                f"sae.k_aux={self.k_aux!r} must be an int in [1, d_sae={self.d_sae}]"
            )
        if self.auxk_coef < 0:
            raise ValueError(f"sae.auxk_coef={self.auxk_coef} must be >= 0")
        if self.dead_tokens is not None and (isinstance(self.dead_tokens, bool)
                                             or not isinstance(self.dead_tokens, int) or self.dead_tokens < 1):
            raise ValueError(f"sae.dead_tokens={self.dead_tokens!r} must be an int >= 1, or null for "
                             "min(10M, a tenth of the run's tokens)")
        if self.multi_topk:
            if self.multi_topk_factor < 1:
                raise ValueError(
                    f"sae.multi_topk_factor={self.multi_topk_factor} must be >= 1"
                )
            if self.k is None:
                raise ValueError(f"Multi-TopK needs sae.k (architecture {self.architecture!r})")
            if self.multi_topk_factor * self.k > self.d_sae:
                raise ValueError(
                    f"Multi-TopK needs multi_topk_factor*k = {self.multi_topk_factor * self.k} <= "
                    f"d_sae={self.d_sae}; lower multi_topk_factor or k"
                )
            if self.multi_topk_weight < 0:
                raise ValueError(
                    f"sae.multi_topk_weight={self.multi_topk_weight} must be >= 0"
                )
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"sae.b_dec_init={self.b_dec_init!r}; valid: {B_DEC_INITS}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"sae.normalize={self.normalize!r}; valid: {NORMALIZE_MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"sae.dtype={self.dtype!r}; valid: {DTYPES}")
        if not isinstance(self.kernels, bool):
            raise ValueError(f"sae.kernels={self.kernels!r} must be true or false")
        if not self.kernels:
            warnings.warn("sae.kernels=false is deprecated and ignored: the kernel path is the only TopK "
                          "training path (its torch backend runs on CPU); set sae.kernel_backend=torch to "
                          "keep Triton out", FutureWarning, stacklevel=3)
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"sae.kernel_backend={self.kernel_backend!r}; valid: {KERNEL_BACKENDS}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
