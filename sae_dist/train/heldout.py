"""Held-out evaluation during training: every `trainer.eval_every_steps` steps, the LM's next-token cross entropy
and KL divergence with the SAE spliced in at its hook (`sae_dist.eval.downstream.downstream_loss`: Gao et al. 2024
sec. 4.1, the CE loss score as SAELens reports it), on a small fixed set of held-out contexts.

What is evaluated: the SAE the run would export at that step (the EMA when `trainer.ema`), on the device the SAE
trains on. A whole SAE (parallel.tp = 1) as `sae_dist.sae.export.exported_view` builds it in memory (the input
normalisation folded exactly as the export folds it; W_enc and W_dec are not copied). A latent-sharded TopK SAE
(parallel.tp > 1) is never gathered (a 16M-latent SAE does not fit on one rank): `ShardedTopKSplice` runs the
training step's own TopK path on each rank's shard (`TopKSAE.reconstruct`: the hook's activations normalised as
the store normalises them, this shard's fused-encoder candidates, the exact global TopK across the tp group, the
shards' sparse decodes summed over tp, + b_dec, the normalisation undone), the same x_hat on every tp rank and, up
to float rounding, the exported SAE's. The LM stays on its own device; the hook's activations move to the SAE's
device and back.

Contexts: the first `trainer.eval_contexts` held-out contexts of sae-eval (`heldout_sequences`: the eval split of
the text, packed as harvest packs it, in corpus order), tokenised once when the run starts and kept on the LM's
input device: the same contexts at every evaluation, and the first ones sae-eval evaluates. A few dozen contexts
give a noisier number than sae-eval's (16k tokens by default): a curve to watch, not a result.

Where it runs: on the first dp replica (dp rank 0). With parallel.tp = 1 that is the process that logs (global
rank 0, or a grid group's first rank). With parallel.tp > 1 every tp rank of dp replica 0 loads the LM and the
contexts and runs the same evaluation (the LM's forwards on each, the SAE's splice collective over their tp group);
global rank 0 logs it. The other dp replicas go on to the next step's collective and wait for it there (the
evaluation has no collective over dp), within the collective timeout (SAE_DIST_TIMEOUT_S,
`sae_dist.parallel.mesh`).

Cost of one evaluation: three LM forwards (clean, spliced, zero-ablated) over N contexts of T tokens, in batches of
`batch_size` contexts, plus the SAE on N (T - 1) rows. Transient memory: `downstream_loss` holds about six
[batch_size, T, vocab] float32 tensors (log-probabilities and their differences) at once on the LM's device;
`batch_size` keeps each under MAX_LOGPROB_ELEMENTS (512 MiB, so about 3 GiB in all; e.g. one context per batch
at 1024 tokens of a 128k vocabulary), and a TopK SAE holds at most 256 MiB of pre-activations
(`topk_pre_blocked`; latent-sharded, `ShardedTopKSplice` encodes blocks of rows whose fused-encoder buffer stays
within the same MAX_PRE_ELEMENTS). For the whole run the LM's weights are held on its device besides the SAE
(sae-train loads the LM once at the start; with source=lm a second copy, as the stream's runs in its background
thread), under parallel.tp > 1 on each of the tp ranks of dp replica 0 (one LM per GPU of that replica).

The trainer (`sae_dist.train.trainer`) decides when: it loads the LM (sae-train's loader) once the run directory is
locked, on dp replica 0, only when a run still has an evaluation step ahead (`evals_due`), calls `measure` at each
multiple of trainer.eval_every_steps, logs the records (`train_log.jsonl`: {"step", "tokens", "eval/<key>" for each
key of `downstream_loss`'s dict} after the step's own record; wandb: the names of SAELens' in-training evaluator,
`sae_dist.train.logging.saelens_eval_metrics`) and leaves the evaluation's wall time out of every run's
`train/tokens_per_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

__all__ = ["HeldoutEval", "ShardedTopKSplice", "evals_due", "MAX_LOGPROB_ELEMENTS", "logprob_batch_size"]

#: Most elements of one [batch, T, vocab] float32 tensor of log-probabilities an evaluation batch makes (512 MiB):
#: `downstream_loss` holds about six of them at once. Sets `HeldoutEval.batch_size` (at most 32 contexts).
MAX_LOGPROB_ELEMENTS = 1 << 27


def logprob_batch_size(batch_size: int, ctx_len: int, vocab: int) -> int:
    """`batch_size` capped so that one float32 [batch, ctx_len, vocab] log-prob tensor stays under
    MAX_LOGPROB_ELEMENTS (at least 1)."""
    return min(batch_size, max(1, MAX_LOGPROB_ELEMENTS // (ctx_len * vocab)))


def evals_due(every: int, step: int, stop_at: int) -> bool:
    """Whether a run at `step` that stops at `stop_at` (trainer.max_steps or its last step) has a held-out
    evaluation left: every = trainer.eval_every_steps > 0 and a multiple of it in (step, stop_at]."""
    return every > 0 and (step // every + 1) * every <= stop_at


class ShardedTopKSplice(nn.Module):
    """The SAE a latent-sharded TopK run would export, as the splice of `downstream_loss`, without gathering it.

    sae: this rank's latent shard of a `TopKSAE` (`parallelize_sae`, tp > 1; its `comm` the mesh's), trained on
    inputs normalised by `normalize` (`scale`: the store's for "scalar"). forward(x) -> x_hat: x float [M, d_in] RAW
    activations, the same on every tp rank of the group (each calls forward with it: collective over tp), x_hat
    float32 [M, d_in] raw, the same on every tp rank. Rows are taken in blocks of `block_rows`, each normalised as
    the store normalises (`sae_dist.store.normalize`), reconstructed by `TopKSAE.reconstruct` (the exact global
    TopK, Gao et al. 2024 eq. 3, across the shards), and mapped back (`denormalize`): what `exported_view` / the
    exported SAE computes, to float rounding. block_rows = MAX_PRE_ELEMENTS // min(n_local, LATENT_CHUNK), so the
    fused encoder's pre-activation buffer [rows, LATENT_CHUNK] holds at most 256 MiB of float32 (the bound of
    `topk_pre_blocked` on one process; the Triton encoder bounds its candidate buffers itself, `encode_topk`).
    ValueError (at forward) as `normalize`: a bad mode, "scalar" without a scale.
    """

    def __init__(self, sae: nn.Module, *, normalize: str, scale: float | None = None):
        from sae_dist.kernels.encoder_topk import LATENT_CHUNK
        from sae_dist.sae.export import MAX_PRE_ELEMENTS

        super().__init__()
        self.sae, self.mode, self.scale = sae, normalize, scale
        self.block_rows = max(1, MAX_PRE_ELEMENTS // min(sae.n_local, LATENT_CHUNK))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sae_dist.store import denormalize, normalize

        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], self.block_rows):
            x_n, stats = normalize(x[s:s + self.block_rows].float(), self.mode, self.scale)
            out[s:s + self.block_rows] = denormalize(self.sae.reconstruct(x_n).float(), self.mode, stats)
        return out


@dataclass
class HeldoutEval:
    """The LM, hook point and fixed held-out contexts of the held-out evaluation (module docstring).

    model: HF causal LM (eval mode, gradients off). hook_name: where the SAE is spliced in
    (`sae_dist.harvest.hooks` names). sequences: int64 [N, T] token ids on the LM's input device, BOS first.
    batch_size: contexts per LM forward (`from_text`: as many as MAX_LOGPROB_ELEMENTS allows, 1 to 32).
    """

    model: nn.Module
    hook_name: str
    sequences: torch.Tensor
    batch_size: int = 8

    @classmethod
    def from_text(cls, model: nn.Module, tokenizer, hook_name: str, docs: Iterable[str], *, ctx_len: int,
                  eval_fraction: float, n_contexts: int, d_in: int) -> HeldoutEval:
        """The first `n_contexts` held-out contexts of `docs` (`heldout_sequences`, with the harvest's ctx_len and
        eval_fraction), tokenised once, on the LM's input device; the hook's width is checked on the first, the
        vocabulary measured there sets `batch_size` (MAX_LOGPROB_ELEMENTS).

        Raises ValueError: ctx_len < 3 (the CE needs BOS + 2 tokens), no held-out context (`heldout_sequences`),
        an unknown hook (`resolve_hook` lists the valid names), or a hook width other than d_in (the SAE's).
        """
        from sae_dist.eval.evaluate import heldout_sequences
        from sae_dist.harvest.harvester import lm_input_device
        from sae_dist.harvest.hooks import run_to_hook

        if ctx_len < 3:
            raise ValueError(f"data.ctx_len={ctx_len}: the held-out CE needs contexts of >= 3 tokens (BOS + 2)")
        seqs = heldout_sequences(docs, tokenizer, ctx_len, n_contexts * (ctx_len - 1), eval_fraction)
        seqs = seqs.to(lm_input_device(model))
        with torch.no_grad():
            width = run_to_hook(model, hook_name, seqs[:1]).shape[-1]
            vocab = model(input_ids=seqs[:1, :2], use_cache=False).logits.shape[-1]
        if width != d_in:
            raise ValueError(f"hook {hook_name!r} of this LM has width {width}, but the SAE has d_in={d_in}: "
                             "the LM is not the one the activations came from (model.name)")
        return cls(model, hook_name, seqs, logprob_batch_size(32, ctx_len, vocab))

    def measure(self, sae: nn.Module, *, normalize: str, scale: float | None = None,
                n_contexts: int | None = None) -> dict:
        """`downstream_loss`'s dict (ce_loss_clean, ce_loss_sae, ce_loss_zero_ablation, ce_loss_score,
        ce_loss_delta, kl_div, kl_div_zero_ablation in nats per token; ce_tokens) with the training SAE `sae`
        (inputs normalised by `normalize`, `scale` the store's for "scalar") spliced in as its export would be, on
        the first `n_contexts` contexts (None: all). `sae`: a whole `SparseAutoencoder` (`exported_view`), or this
        rank's latent shard of a TopK SAE under tp > 1 (`ShardedTopKSplice`: collective over tp, every tp rank
        calls `measure` alike). ValueError as `exported_view` and `downstream_loss`."""
        from sae_dist.eval.downstream import downstream_loss
        from sae_dist.sae.export import exported_view

        if sae.comm.tp > 1:
            view = ShardedTopKSplice(sae, normalize=normalize, scale=scale)
        else:
            view = exported_view(sae, normalize=normalize, scale=scale)
        return downstream_loss(self.model, view, self.hook_name, self.sequences[:n_contexts],
                               batch_size=self.batch_size, device=self.sequences.device)
