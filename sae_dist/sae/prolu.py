"""ProLU sparse autoencoder (`sae=prolu`; Taggart 2024, "ProLU: A Nonlinearity for Sparse
Autoencoders", AI Alignment Forum; one of the baselines TopK is compared against in Gao et al. 2024,
"Scaling and evaluating sparse autoencoders", section 5 / appendix).

With m = (x - b_dec) W_enc (the encoder's linear part, no bias) and the encoder bias b = b_enc:

    ProLU(m, b) = m * 1[m > 0] * 1[m + b > 0]                               [B, d_sae]
    x^ = z W_dec + b_dec,     L = NMSE(x, x^) + lambda(t) * L1(z)

The bias only decides WHETHER a latent fires (a per-latent threshold -b on m) and no longer shifts
its magnitude when it fires ("scale consistency", Taggart section "Motivation"). In the export's
terms (`sae_dist.sae.export.ExportedSAE`, architecture "prolu"): pre = (x - b_dec) W_enc + b_enc,
m = pre - b_enc, z = m * 1[m > 0] * 1[pre > 0].

The true gradient of z with respect to b is zero almost everywhere, so training uses one of Taggart's
two synthetic gradients (`ProLUFunction`, option `ste`); on the gate G = 1[m > 0] * 1[m + b > 0],
with g = dL/dz, both are 0 off the gate and:

    ste="relu"  (ProLU-ReLU): dL/dm = g G,            dL/db = g G       (as if z were ReLU(m + b) on G)
    ste="ste"   (ProLU-STE):  dL/dm = g G (1 + m),    dL/db = g G m     (the straight-through estimate
                 d/du 1[u > 0] ~ 1 on the gate, applied to z = m * 1[m + b > 0]: dz/db ~ m and
                 dz/dm ~ 1 + m)

(the two variants of Taggart's post and code, which also apply the STE term to dL/dm, as the
post's discussion confirms; "ste" is the default here, "relu" is kept for comparison). The L1 term,
its warm-up and the decoder-norm option are those of `sae=relu` (`sae_dist.sae.relu`); ProLU is
positively homogeneous in (m, b) jointly, so the decoder-norm fold of the export is exact here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_dist.sae.relu import ReLUOptions, ReLUSAE

__all__ = ["ProLUSAE", "ProLUOptions", "ProLUFunction", "prolu", "STE_VARIANTS"]

#: the synthetic-gradient variants of `ProLUFunction` (Taggart 2024)
STE_VARIANTS = ("ste", "relu")


@dataclass
class ProLUOptions(ReLUOptions):
    """Options of `sae=prolu`: those of `ReLUOptions` (l1_coef, l1_warmup_frac, l1_decoder_norm,
    tied_weights) plus

    ste: the synthetic gradient of the ProLU bias, "ste" (ProLU-STE, default) or "relu" (ProLU-ReLU);
      see the module docstring.
    l1_decoder_norm defaults to False here: unit-norm decoder rows and a plain L1 penalty on z, the
    setup of Bricken et al. 2023 that ProLU was introduced against. l1_coef's default (0.008) and its
    derivation are those of `ReLUOptions`; ProLU's active values are m, on ReLU's scale, but not shrunk by
    the bias, so a latent fires only for coefficients above ~2 tau: somewhat sparser at equal l1_coef.
    Raises ValueError naming the option, the bad value and the valid values.
    """

    l1_decoder_norm: bool = False
    ste: str = "ste"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ste not in STE_VARIANTS:
            raise ValueError(f"sae option ste={self.ste!r}; valid: {', '.join(STE_VARIANTS)}")


class ProLUFunction(torch.autograd.Function):
    """z = ProLU(m, b) with a synthetic backward (module docstring; Taggart 2024).

    forward(m [..., d_sae], b [d_sae] (broadcast against m), ste: bool) -> z, m's shape and dtype:
      z = m where (m > 0) & (m + b > 0), else 0.
    backward: with G the gate and g the incoming gradient,
      ste=False (ProLU-ReLU): grad_m = g G, grad_b = sum over the broadcast dims of g G
      ste=True  (ProLU-STE):  grad_m = g G (1 + m), grad_b = sum over the broadcast dims of g G m
    Computed in at least float32 (bf16 m under autocast) and returned in each input's dtype.
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor, b: torch.Tensor, ste: bool) -> torch.Tensor:
        gate = (m > 0) & (m + b > 0)
        ctx.save_for_backward(m, gate)
        ctx.ste = bool(ste)
        ctx.b_shape, ctx.b_dtype = b.shape, b.dtype
        return torch.where(gate, m, torch.zeros((), dtype=m.dtype, device=m.device))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        m, gate = ctx.saved_tensors
        acc = torch.promote_types(m.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays fp64
        g = torch.where(gate, grad_out.to(acc), 0.0)
        if ctx.ste:
            gb = g * m.to(acc)
            gm = g + gb
        else:
            gb = g
            gm = g
        grad_m = gm.to(m.dtype) if ctx.needs_input_grad[0] else None
        grad_b = gb.sum_to_size(ctx.b_shape).to(ctx.b_dtype) if ctx.needs_input_grad[1] else None
        return grad_m, grad_b, None


def prolu(m: torch.Tensor, b: torch.Tensor, ste: str = "ste") -> torch.Tensor:
    """ProLU(m, b) [..., d_sae] with the synthetic gradient `ste` ("ste" | "relu"; `ProLUFunction`).
    ValueError for another `ste`."""
    if ste not in STE_VARIANTS:
        raise ValueError(f"prolu: ste={ste!r}; valid: {', '.join(STE_VARIANTS)}")
    return ProLUFunction.apply(m, b, ste == "ste")


class ProLUSAE(ReLUSAE):
    """ProLU SAE (`sae=prolu`, module docstring). Export architecture "prolu".

    Args / parameters / tied weights / decoder-norm fold / L1 schedule: as `ReLUSAE` (cfg.options ->
    `ProLUOptions`). Training latents: `prolu((x - b_dec) W_enc, b_enc, ste)`; inference
    (`activation`): the export's rule on pre = (x - b_dec) W_enc + b_enc.
    """

    architecture = "prolu"
    export_architecture = "prolu"
    Options = ProLUOptions

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, d_sae] -> z [B, d_sae]: m = pre - b_enc, z = m * 1[m > 0] * 1[pre > 0] (the export's
        rule, `ExportedSAE.activation`)."""
        m = pre - self.b_enc
        return torch.where((m > 0) & (pre > 0), m, torch.zeros((), dtype=m.dtype, device=m.device))

    def train_latents(self, x: torch.Tensor) -> torch.Tensor:
        """z = prolu((x - b_dec) W_enc, b_enc, ste) [B, d_sae] with the synthetic gradient."""
        self._check_x(x)
        m = (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc
        return prolu(m, self.b_enc, self.opts.ste)

    def export_cfg(self) -> dict:
        """cfg.json fields: architecture "prolu", activation_fn "prolu"."""
        return {"architecture": self.export_architecture, "activation_fn": "prolu", "activation_fn_kwargs": {}}
