"""Feature density over a window of training steps, as SAELens' trainer logs it to wandb
(`sae_lens.training.sae_trainer.SAETrainer._build_sparsity_log_dict`): every
`trainer.feature_density_every_steps` steps (SAELens' `feature_sampling_window`) the firing frequency of
each latent over the window, f = (tokens on which it was non-zero) / (tokens in the window), is
summarised, and the window restarts. The summaries (`density_summary`) are SAELens' definitions: the mean
over latents of log10(f + 1e-10), the counts of latents with f < 1e-5 and f < 1e-6, and the histogram of
log10(f + 1e-10) (float32, as SAELens computes them).

Cost. Per step each rank adds its rows' fire counts (int64 [d_sae / tp], `TrainOutput.latent_fire_counts`,
one scatter-add the dead-latent tracker needs anyway) to its window (`sae_dist.sae.base.FeatureDensityWindow`,
beside the dead-latent counters): no collective, no host sync. At a window's end (`window_frequency`,
collective): one sum all-reduce of the counts over dp (int64 [d_sae / tp] per rank), then the
frequencies of the tp shards gathered onto the dp-rank-0 ranks (float32 [d_sae]: 64 MB at 16M latents,
once per window) and summarised on global rank 0, where wandb.Histogram
bins them (numpy over d_sae values: a fraction of a second at 16M latents). The vector is gathered
rather than a fixed-bin histogram computed with collectives (cheaper: 64 bins per rank) because then the
wandb histogram is exactly SAELens' (64 bins over the values' range, which a fixed range would change),
and the per-latent values can be kept: `<run_dir>/sparsity.safetensors` (SAELens' file name and key,
`write_sparsity`) holds the last window's log10(f + 1e-10). Off (`feature_density_every_steps=0`): no
counting, no memory.

Checkpoints hold the window (`density/fire_counts`, sharded over tp like the dead-latent counters, after
`total_over_dp_`; its token count in the trainer state), so a resumed run logs the densities of an
uninterrupted one. A checkpoint written without it (the option off, or a release before it) restarts the
window at the resume: the first window after it is shorter (f stays fires / tokens counted).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sae_dist.parallel.comm import all_gather_cat, all_reduce_
from sae_dist.parallel.mesh import ParallelContext
from sae_dist.sae.base import FeatureDensityWindow
from sae_dist.train.logging import BELOW_KEYS, MEAN_LOG10_KEY

__all__ = ["end_window", "total_over_dp_", "keep_on_first_dp_rank_", "SPARSITY_FILENAME"]

#: SAELens' epsilon: log10(f + 1e-10), so a latent that never fired counts as -10
LOG10_EPS = 1e-10
#: SAELens' file of per-latent log10 feature densities (key "sparsity")
SPARSITY_FILENAME = "sparsity.safetensors"


def total_over_dp_(window: FeatureDensityWindow, ctx: ParallelContext) -> None:
    """Collective over dp: every dp rank then holds the window's counts (before a checkpoint, whose tensors
    are replicated over dp; `keep_on_first_dp_rank_` undoes the sharing)."""
    all_reduce_(window.fire_counts, ctx.dp_group)


def keep_on_first_dp_rank_(window: FeatureDensityWindow, ctx: ParallelContext) -> None:
    """After `total_over_dp_` (or a checkpoint's load): the counts stay on dp rank 0 and the other dp ranks
    restart from 0, so that the sum over dp is the window's counts again."""
    if ctx.dp_rank:
        window.fire_counts.zero_()


@torch.no_grad()
def window_frequency(window: FeatureDensityWindow, ctx: ParallelContext) -> torch.Tensor | None:
    """End the window (collective over every rank of `ctx`): the firing frequency of every latent, f =
    fires / window tokens, float32 [d_sae] on CPU in latent order on global rank 0 (None on the others);
    the window restarts on every rank. Counts are summed over dp, the shards gathered over tp (module
    docstring: cost)."""
    total_over_dp_(window, ctx)
    freq = None
    if ctx.dp_rank == 0:  # the tp group of dp rank 0 holds global rank 0
        local = window.fire_counts.float() / max(window.n_tokens, 1)
        freq = all_gather_cat(local, ctx.tp_group, dim=0)
    window.reset_()
    return freq.cpu() if ctx.is_main else None


def density_summary(frequency: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """SAELens' summaries of a window's firing frequencies `frequency` float32 [d_sae] (in [0, 1]):
    ({MEAN_LOG10_KEY: mean of log10(f + 1e-10), each BELOW_KEYS key: the count of latents with f below its
    threshold}, log10(f + 1e-10) float32 [d_sae]). Source: SAELens' `_build_sparsity_log_dict`."""
    log10 = torch.log10(frequency + LOG10_EPS)
    m = {MEAN_LOG10_KEY: float(log10.mean())}
    m.update({key: int((frequency < t).sum()) for key, t in BELOW_KEYS.items()})
    return m, log10


def write_sparsity(path: str | os.PathLike, log10: torch.Tensor, step: int, window_tokens: int) -> None:
    """Write log10(f + 1e-10) float32 [d_sae] to the safetensors file `path` under SAELens' key "sparsity",
    with the window's last step and token count as metadata; atomically (a temporary file renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({"sparsity": log10.float().contiguous()}, str(tmp),
              metadata={"step": str(step), "window_tokens": str(window_tokens)})
    os.replace(tmp, path)


def end_window(window: FeatureDensityWindow, ctx: ParallelContext, out_dir: str | os.PathLike,
               step: int) -> tuple[dict, torch.Tensor] | None:
    """End the window at training step `step` (collective, `window_frequency`): on global rank 0 its
    summaries and log10(f + 1e-10) float32 [d_sae] (`density_summary`), the latter also written to
    `out_dir`/sparsity.safetensors (`write_sparsity`); None on the other ranks."""
    n_tokens = window.n_tokens
    freq = window_frequency(window, ctx)
    if freq is None:
        return None
    scalars, log10 = density_summary(freq)
    write_sparsity(Path(out_dir) / SPARSITY_FILENAME, log10, step, n_tokens)
    return scalars, log10
