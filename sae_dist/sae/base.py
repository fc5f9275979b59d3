"""The one interface every SAE architecture implements, so that one trainer, one evaluation and one
export serve them all (issue 5: TopK, ReLU+L1, JumpReLU, BatchTopK, Matryoshka, tree, soft TopK, ProLU).

An architecture is a subclass of `SparseAutoencoder` registered in `sae_dist.sae.registry`:

    class MySAE(SparseAutoencoder):
        architecture = "mine"              # the Hydra option `sae=mine` and SAEConfig.architecture
        export_architecture = "standard"   # cfg.json "architecture" (SAELens' name where it has one)
        Options = MyOptions                # dataclass of the architecture's own options (SAEConfig.options)

        def activation(self, pre) -> z     # dense [B, d_sae] latents from pre-activations (inference)
        def training_step_losses(self, x, dead_mask) -> TrainOutput   # the losses of one batch

and optionally `set_progress` (schedules: L1 warm-up, temperature annealing), `export_extras`
(extra tensors such as a JumpReLU `threshold`), `export_cfg` (cfg.json fields), `export_files`
(files written next to the weights, e.g. a tree) and persistent buffers (saved in checkpoints).

Parameters and layouts follow the export contract (SAELens): `W_enc` [d_in, d_sae], `b_enc` [d_sae],
`W_dec` [d_sae, d_in], `b_dec` [d_in] (b_dec is the paper's b_pre, subtracted before encoding),
extras by name. Inputs are the NORMALISED activations of the store; export folds the normalisation.
The shared pieces every architecture uses: the tied init (W_enc = W_dec^T, Gao et al. 2024 section
2.4.1; also Conerly et al. 2024), unit-norm decoder rows with the parallel gradient component removed
(Gao et al. 2024 Appendix A.1; Bricken et al. 2023), the normalised MSE and the AuxK loss on dense
pre-activations (`auxk_term`).

Also here, because every architecture's training step uses them: `LocalComm`, the collectives a
step calls through `sae.comm` (identities on one process; `sae_dist.parallel.tp.MeshComm` over a
mesh), `normalized_mse`, `DeadLatentTracker`, the per-latent "tokens since last fired" counter
that marks AuxK's dead latents, and `FeatureDensityWindow`, the per-latent fire counts of a window of
steps (`count_fires` counts a batch's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from sae_dist.kernels.sparse_decode import auxk_loss_reference
from sae_dist.sae.config import SAEConfig

__all__ = ["SparseAutoencoder", "TrainOutput", "NoOptions", "torch_dtype", "parse_options", "LocalComm",
           "LOCAL", "normalized_mse", "dead_topk", "count_fires", "DeadLatentTracker", "FeatureDensityWindow"]


# ------------------------------------------------------------------------------------------ collectives
class LocalComm:
    """One process holding the whole SAE and the whole batch: tp = dp = 1, every collective the identity.

    The methods (the contract `MeshComm` implements over a mesh):
      copy_to_tp(t) / reduce_from_tp(t): the two conjugate tensor-parallel operators (Shoeybi et al.
        2019): identity forward with the gradient summed over tp, and the sum over tp forward with an
        identity backward. Differentiable.
      sum_over_tp_(t), sum_over_dp_(t), max_over_dp_(t): in-place sums / maxima of a no-grad tensor.
      gather_over_dp(t): rows of every dp rank concatenated along dim 0 (rank order).
      batch_variance(x): sum_b ||x_b - mean(x)||^2 over the GLOBAL batch (all dp ranks' rows), float32;
        the denominator of the paper's normalised MSE (Gao et al. 2024, section 2.2).
      select_topk(values, indices, ms, width): per m in ms, this shard's entries among the global
        top-m of each row of the candidates (values, indices [B, w], values sorted descending along
        each row, w >= max(ms) here); returns [(values [B, m'], indices [B, m'])] with -1 indices (and
        values 0) where a slot holds no kept entry. Locally: the first m columns. width: the common
        candidate width over tp (pad target; unused here).
    """

    tp = 1
    dp = 1
    tp_rank = 0

    def copy_to_tp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_from_tp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_over_tp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_over_dp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_over_dp_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def batch_variance(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf - xf.mean(0, keepdim=True)).pow(2).sum()

    def select_topk(self, values: torch.Tensor, indices: torch.Tensor, ms: tuple[int, ...],
                    width: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(values[:, :m], indices[:, :m]) for m in ms]


#: The shared single-process instance (stateless).
LOCAL = LocalComm()


# ------------------------------------------------------------------------------------------ losses
def normalized_mse(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Paper's normalised MSE (section 2.2): sum_b ||t_b - r_b||^2 / sum_b ||t_b - mean_b(t)||^2.

    target, recon [B, d]. Over one batch this equals the fraction of variance unexplained (fvu).
    Returns a 0-d tensor (float32 accumulation); NaN/Inf if the batch has zero variance.
    """
    t = target.float()
    r = recon.float()
    num = (t - r).pow(2).sum(-1).mean()
    den = (t - t.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return num / den


def dead_topk(pre_acts: torch.Tensor, dead_mask: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The AuxK latents of each token from dense pre-activations (Gao et al. 2024, section 2.4.1): the
    top min(k_aux, n_dead) pre-activations among the dead latents, ReLU'd.

    pre_acts [B, d_sae] float; dead_mask bool [d_sae]; k_aux >= 1. Returns (values [B, k'] >= 0,
    indices [B, k'] int64), k' = min(k_aux, dead latents), for `sae_dist.kernels.sparse_decode.auxk_loss`.
    Raises ValueError when dead_mask is not bool [d_sae].
    """
    if dead_mask.dtype != torch.bool or dead_mask.shape != pre_acts.shape[-1:]:
        raise ValueError(f"dead_mask must be bool [{pre_acts.shape[-1]}], got {dead_mask.dtype} "
                         f"{tuple(dead_mask.shape)}")
    k_eff = min(int(k_aux), int(dead_mask.sum()))
    vals, idx = pre_acts.masked_fill(~dead_mask, float("-inf")).topk(k_eff, dim=-1, sorted=False)
    return torch.relu(vals), idx


# ------------------------------------------------------------------------------------------ dead latents
@torch.no_grad()
def count_fires(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """int64 [d_sae]: the number of tokens on which each latent fired, from the kept latents of a batch
    (values [B, k], indices [B, k] int64 in [0, d_sae), or -1 padding with value 0). A latent fires on a
    token when it is kept with a value > 0 (indices are distinct within a row). One scatter-add, no
    host synchronisation (unlike boolean-mask indexing)."""
    on = (values.detach() > 0).reshape(-1).to(torch.int64)
    counts = torch.zeros(d_sae, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(0, indices.reshape(-1).clamp_min(0), on)


class DeadLatentTracker:
    """Per-latent count of tokens since each latent last fired (section 2.4.1).

    `tokens_since_fired` int64 [d_sae]; `ever_fired` bool [d_sae]. A latent is dead when
    tokens_since_fired >= dead_tokens. A latent "fires" on a token when it is among the TopK and
    its ReLU'd value is > 0.
    """

    def __init__(self, d_sae: int, dead_tokens: int, device: torch.device | str = "cpu"):
        self.d_sae = d_sae
        self.dead_tokens = int(dead_tokens)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.ever_fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    @torch.no_grad()
    def fired(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """bool [d_sae]: latents among `indices` [B, k] with a value > 0 in `values` [B, k] (`count_fires` > 0)."""
        return count_fires(values, indices, self.d_sae) > 0

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """values, indices [B, k] of one batch of B tokens."""
        self.update_fired(self.fired(values, indices), indices.shape[0])

    @torch.no_grad()
    def update_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Advance the counters by a batch of n_tokens in which the latents of bool [d_sae] `fired`
        fired (under data parallelism: OR-reduced over dp, n_tokens = the global batch)."""
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired.masked_fill_(fired, 0)  # no host sync (a bool index is a nonzero() on CUDA)
        self.ever_fired |= fired

    def dead_mask(self) -> torch.Tensor:
        """bool [d_sae]: True where tokens_since_fired >= dead_tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def state_dict(self) -> dict:
        return {
            "tokens_since_fired": self.tokens_since_fired,
            "ever_fired": self.ever_fired,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.tokens_since_fired.copy_(sd["tokens_since_fired"])
        self.ever_fired.copy_(sd["ever_fired"])


class FeatureDensityWindow:
    """Per-latent fire counts over a window of training steps (the feature density SAELens logs every
    `feature_sampling_window` steps; `sae_dist.train.density` ends windows and sums them over processes).

    `fire_counts` int64 [d_sae]: tokens on which each latent fired (this module's latents; its shard under
    tensor parallelism), counted on the rows given to `add_` (a data-parallel rank's own rows: the window's
    counts are then the sum over the dp ranks); `n_tokens`: tokens of the global batches added.
    """

    def __init__(self, d_sae: int, device: torch.device | str = "cpu"):
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add_(self, fire_counts: torch.Tensor, n_tokens: int) -> None:
        """Add one step: fire_counts int64 [d_sae] (`TrainOutput.latent_fire_counts`); n_tokens: the
        global batch's tokens."""
        self.fire_counts += fire_counts
        self.n_tokens += int(n_tokens)

    def reset_(self) -> None:
        """Start a new window."""
        self.fire_counts.zero_()
        self.n_tokens = 0


@dataclass
class TrainOutput:
    """Result of `training_step_losses` for one batch x [B, d_in]. Losses are 0-d float32 tensors.

    loss: the differentiable total (the only field with a graph).
    fvu: detached normalised MSE of the main reconstruction over the batch (Gao et al. 2024, section
      2.2; over one batch it is the fraction of variance unexplained), logged as train/fvu.
    auxk_loss: detached AuxK loss (0 when the architecture has none).
    multi_topk_fvu: detached normalised MSE of the Multi-TopK reconstruction (at multi_topk_factor * k) or None.
    x_hat [B, d_in]: detached reconstruction.
    values, indices [B, k]: the kept latents of TopK-family architectures (None for dense ones).
    fire_counts: int64 [d_sae], the tokens of this batch on which each latent fired (non-zero), or None:
      counted from values/indices (`latent_fire_counts`). `fired` (bool [d_sae]) is fire_counts > 0.
    l0_sum: 0-d, number of non-zero latent activations in the batch (None: counted from values).
    terms: other detached loss terms, logged as train/<name> (e.g. l1, l0, tree).
    """

    loss: torch.Tensor
    fvu: torch.Tensor
    auxk_loss: torch.Tensor
    multi_topk_fvu: torch.Tensor | None
    x_hat: torch.Tensor
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    fire_counts: torch.Tensor | None = None
    l0_sum: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fired(self) -> torch.Tensor | None:
        """bool [d_sae]: the latents that fired on this batch (None when fire_counts is None)."""
        return None if self.fire_counts is None else self.fire_counts > 0

    def latent_fire_counts(self, d_sae: int) -> torch.Tensor:
        """int64 [d_sae]: `fire_counts`, or counted from values / indices (`count_fires`); d_sae: the
        latents this module holds (its shard's width under tensor parallelism)."""
        if self.fire_counts is not None:
            return self.fire_counts
        return count_fires(self.values, self.indices, d_sae)

    @staticmethod
    def from_dense(loss, nmse, z: torch.Tensor, x_hat: torch.Tensor, aux=None, terms=None) -> "TrainOutput":
        """TrainOutput of an architecture with dense latents z [B, d_sae] (fire counts / L0 from z != 0)."""
        nz = z.detach() != 0
        zero = loss.new_zeros((), dtype=torch.float32)
        return TrainOutput(loss, nmse.detach().float(), zero if aux is None else aux.detach().float(), None,
                           x_hat.detach(), fire_counts=nz.sum(0), l0_sum=nz.sum().to(torch.float64),
                           terms={k: v.detach().float() for k, v in (terms or {}).items()})


def torch_dtype(name: str) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" -> the torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class NoOptions:
    """An architecture without options of its own."""


def parse_options(options_cls, options: dict | None, architecture: str):
    """options_cls(**options), with a ValueError naming the architecture, the unknown option(s) and
    the valid ones instead of a TypeError."""
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"sae={architecture}: unknown option(s) {unknown}; valid options of this architecture: "
            f"{valid or 'none'}"
        )
    return options_cls(**options)


class SparseAutoencoder(nn.Module):
    """Base of all SAE architectures (module docstring: the interface).

    Args:
      cfg: SAEConfig (cfg.options holds the architecture's own options, parsed into `self.opts`).
      device: where the parameters live.
      generator: optional torch.Generator for the tied initialisation (the trainer re-initialises
        with the mesh-independent `sae_dist.sae.init.tied_init_rows_`).
    Raises ValueError for unknown options (naming them and the valid ones).
    """

    architecture: ClassVar[str] = ""
    export_architecture: ClassVar[str] = ""
    #: True when the architecture trains latent-sharded under tp > 1 (else the trainer refuses tp > 1).
    shardable: ClassVar[bool] = False
    #: True for TopK-family models: k latents per token, `encode_sparse` / sparse training outputs.
    uses_k: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions
    #: The collectives of the training step (`LocalComm`): identities on one process;
    #: `sae_dist.parallel.tp.parallelize_sae` installs the mesh's on the instance.
    comm: LocalComm = LOCAL

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.opts = parse_options(self.Options, cfg.options, cfg.architecture or self.architecture)
        if self.uses_k and cfg.k is None:
            raise ValueError(f"sae={self.architecture} needs sae.k (active latents per token)")
        dtype = torch_dtype(cfg.dtype)
        d, n = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, n, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        #: global latent range [latent_start, latent_end) this module holds (a shard under parallelize_sae)
        self.latent_start, self.latent_end = 0, n
        from sae_dist.sae.init import tied_init_

        tied_init_(self, generator=generator, enc_scale=cfg.enc_init_scale)

    # ------------------------------------------------------------------ shapes
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether W_dec rows are kept at unit norm (override: e.g. ReLU with decoder-norm-weighted L1)."""
        return True

    @property
    def n_local(self) -> int:
        """Latents held by this module: d_sae, or the shard's width under latent sharding."""
        return self.latent_end - self.latent_start

    def _check_whole(self) -> None:
        """NotImplementedError for inference on one latent shard (only training steps run sharded)."""
        if self.n_local != self.cfg.d_sae:
            raise NotImplementedError(
                "this module holds one latent shard of the SAE: export the trained SAE (sae/ in the run dir) "
                "and use sae_dist.load_sae for inference"
            )

    def _check_x(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input last dim {x.shape[-1]} != SAE d_in {self.cfg.d_in} (input shape {tuple(x.shape)})"
            )

    # ------------------------------------------------------------------ inference
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (x - b_dec) @ W_enc + b_enc: x [B, d_in] -> [B, d_sae]."""
        self._check_x(x)
        self._check_whole()
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents z [B, d_sae] from pre-activations [B, d_sae] (inference rule)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] (normalised) -> dense non-negative latents z [B, d_sae]."""
        return self.activation(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d_sae] -> z @ W_dec + b_dec [B, d_in]."""
        self._check_whole()
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d_in] -> x_hat [B, d_in] (normalised space)."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training
    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised). dead_mask: bool [d_sae] latents dead for
        `cfg.dead_tokens` tokens (for AuxK-style terms) or None."""
        raise NotImplementedError

    def auxk_term(self, pre: torch.Tensor, dead_mask: torch.Tensor | None, x: torch.Tensor,
                  x_hat: torch.Tensor) -> torch.Tensor:
        """The AuxK loss of Gao et al. 2024 (sec. 2.4.1 / A.2): the top `cfg.k_aux` dead-latent
        pre-activations pre [B, d_sae] reconstruct the residual x - x_hat.detach() (x, x_hat [B, d_in]),
        normalised by the residual's variance (`dead_topk`, then
        `sae_dist.kernels.sparse_decode.auxk_loss_reference`). A float32 scalar; 0 when `dead_mask` (bool
        [d_sae]) is None, no latent is dead or `cfg.auxk_coef` is 0. The caller adds auxk_coef times it."""
        if dead_mask is None or self.cfg.auxk_coef <= 0:
            return pre.new_zeros((), dtype=torch.float32)
        values, indices = dead_topk(pre, dead_mask, self.cfg.k_aux)
        return auxk_loss_reference(values, indices, self.W_dec, (x - x_hat.detach()).float())

    def refuse_multi_topk(self) -> None:
        """ValueError naming the architecture when `cfg.multi_topk` is set on one that lacks it."""
        if self.cfg.multi_topk:
            raise ValueError(
                f"sae={self.architecture} does not support multi_topk=True (a TopK-only option); "
                "set sae.multi_topk=false"
            )

    def set_progress(self, step: int, n_steps: int) -> None:
        """Called by the trainer before each step (0-based `step` of `n_steps`): schedules such as an
        L1 warm-up or a temperature annealing read it. Default: nothing."""

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) row of W_dec (Gao et al. 2024,
        Appendix A.1): g_i -= (g_i . w_i) w_i. No-op without a gradient or a unit-norm decoder."""
        g = self.W_dec.grad
        if g is None or not self.unit_norm_decoder:
            return
        w = self.W_dec
        coef = torch.einsum("nd,nd->n", g, w.to(g.dtype))
        g.addcmul_(coef.unsqueeze(-1), w, value=-1.0)

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 0.0) -> None:
        """Rescale each W_dec row to unit L2 norm (after every optimizer step) when the architecture
        keeps a unit-norm decoder."""
        if not self.unit_norm_decoder:
            return
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        if eps:
            norms = norms.clamp_min(eps)
        self.W_dec.div_(norms)

    # ------------------------------------------------------------------ export
    def export_params(self) -> dict[str, torch.Tensor]:
        """W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] as exported, in the
        training space (the export folds the input normalisation afterwards). Default: the
        parameters. Override to fold something exactly, e.g. decoder row norms into the encoder."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    def export_extras(self) -> dict[str, torch.Tensor]:
        """Extra tensors of the export in ACTIVATION units of the training space (e.g. a JumpReLU
        `threshold` [d_sae]); the export divides them by the normalisation fold factor like b_enc."""
        return {}

    def export_cfg(self) -> dict:
        """cfg.json fields of this architecture (at least "architecture"; "k" where it applies)."""
        if self.uses_k:
            k = int(self.cfg.k)
            return {"architecture": self.export_architecture, "k": k, "activation_fn": "topk",
                    "activation_fn_kwargs": {"k": k}}
        return {"architecture": self.export_architecture, "activation_fn": "relu", "activation_fn_kwargs": {}}

    def export_files(self) -> dict[str, object]:
        """JSON-serialisable objects written as `<name>` next to the weights (e.g. "tree.json")."""
        return {}
