"""Downstream loss of an SAE: the LM's next-token cross entropy with the SAE's reconstruction spliced
into the forward pass.

Definitions (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 4.1 "Downstream loss";
the normalised "CE loss score" as reported by SAELens' evals):

    ce_loss_clean          CE of the unmodified LM
    ce_loss_sae            CE with the hooked activation a replaced by x^ = SAE(a)
    ce_loss_zero_ablation  CE with the hooked activation replaced by 0
    ce_loss_score          (CE_zero - CE_sae) / (CE_zero - CE_clean)   (1 = as good as clean, 0 = as bad
                           as zero ablation; NaN when CE_zero == CE_clean)
    ce_loss_delta          CE_sae - CE_clean  (the paper's "delta loss")
    kl_div                 mean over predicted tokens of KL(P_clean || P_sae) in nats

Positions. Position 0 of every sequence is BOS, the attention sink, which the SAE never trained on;
positions < `skip_positions` keep their clean activation in every run. Cross entropy and KL are taken
over the positions whose prediction depends on a spliced position: logits at positions
skip_positions .. T-2 predicting targets skip_positions+1 .. T-1 (with the default skip_positions=1:
targets 2..T-1). The same positions are used for all three runs. Log-probabilities are computed in
float32, sums accumulated in float64. The SAE is applied in float32 and its output cast back to the LM's
activation dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["downstream_loss", "module_device", "eval_mode", "replace_after"]


def module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the module's first parameter (else first buffer), else `fallback`."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return fallback


def replace_after(a: torch.Tensor, skip: int, sae_device: torch.device, rows_fn) -> torch.Tensor:
    """a [B, L, d] -> a copy whose positions >= skip are rows_fn(x), x = those positions flattened to
    [B * (L - skip), d] float32 on `sae_device`; the result is cast back to a's device and dtype."""
    b, t, d = a.shape
    x = a[:, skip:, :].reshape(-1, d).to(device=sae_device, dtype=torch.float32)
    x_hat = rows_fn(x)
    out = a.clone()
    out[:, skip:, :] = x_hat.to(device=a.device, dtype=a.dtype).reshape(b, t - skip, d)
    return out


def _sae_splice(sae: nn.Module, sae_device: torch.device, skip: int):
    def rows(x: torch.Tensor) -> torch.Tensor:
        x_hat = sae(x)
        if not isinstance(x_hat, torch.Tensor) or x_hat.shape != x.shape:
            got = tuple(x_hat.shape) if isinstance(x_hat, torch.Tensor) else type(x_hat).__name__
            raise ValueError(f"sae(x) must return a tensor of shape {tuple(x.shape)}, got {got}")
        return x_hat

    return lambda a: replace_after(a, skip, sae_device, rows)


def _zero_splice(skip: int):
    def fn(a: torch.Tensor) -> torch.Tensor:
        out = a.clone()
        out[:, skip:, :] = 0
        return out

    return fn


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode for the block and restore each one's training flag after it, in
    the same order, even when the block raises."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


@torch.no_grad()
def downstream_loss(
    model: nn.Module, sae: nn.Module, hook_name: str, sequences: torch.Tensor, *, batch_size: int = 8,
    device: str | torch.device = "cpu", skip_positions: int = 1, progress: bool = False,
) -> dict[str, Any]:
    """Clean, SAE-spliced and zero-ablated next-token cross entropy, CE loss score and KL divergence.

    Definitions, positions and precision: see the module docstring (Gao et al. 2024 sec. 4.1; SAELens'
    CE loss score).

    Args:
        model: HF causal LM (returns `.logits` [B, T, V]); put in eval mode for the call.
        sae: module with `forward(x [M, d_in] float32) -> x_hat [M, d_in]` in the raw activation units
            of `hook_name` (e.g. from `sae_dist.load_sae`).
        hook_name: hook name (`sae_dist.harvest.hooks` scheme), e.g. "blocks.19.hook_resid_post".
        sequences: int64 [N, T] token ids, every row a full sequence (no padding), T >= skip_positions+2.
        batch_size: sequences per forward, at most: capped so that one fp32 [B, T, V] log-prob tensor stays
            under `sae_dist.train.heldout.MAX_LOGPROB_ELEMENTS` (about five exist at once), e.g. 1 for a
            256k vocabulary at T = 1024.
        device: device the token ids are moved to (the model's, or its first device).
        skip_positions: leading positions left clean (default 1: BOS / attention sink).
        progress: show a tqdm bar.

    Returns:
        dict of Python floats: `ce_loss_clean`, `ce_loss_sae`, `ce_loss_zero_ablation`, `ce_loss_score`,
        `ce_loss_delta`, `kl_div`, `kl_div_zero_ablation`, and int `ce_tokens` (number of predicted
        tokens). CE in nats per token.

    Raises:
        ValueError: `sequences` not a 2-D integer tensor, too short for `skip_positions`, empty,
            `batch_size` < 1, a token id outside the model's vocabulary, or non-finite clean logits (names
            the sequence range).
    """
    from sae_dist.harvest.hooks import resolve_hook
    from sae_dist.harvest.lm import check_token_ids
    from sae_dist.train.heldout import logprob_batch_size

    n, t = _check_downstream_inputs(sequences, skip_positions, batch_size)
    check_token_ids(model, sequences)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # the log-probs are fp32 [B, T, V]: bound them whatever the vocabulary
        batch_size = logprob_batch_size(batch_size, t, head.weight.shape[0])
    device = torch.device(device)
    spec = resolve_hook(model, hook_name)
    s = skip_positions
    splices = {"sae": _sae_splice(sae, module_device(sae, device), s), "zero": _zero_splice(s)}
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_pred = 0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval: downstream CE", unit="batch")
    with eval_mode(model, sae):
        for i in starts:
            ids = sequences[i : i + batch_size].to(device=device, dtype=torch.long)
            n_pred += _add_batch_losses(model, spec, splices, ids, s, sums, i, batch_size)
    return _ce_summary(sums, n_pred)


def _check_downstream_inputs(sequences: torch.Tensor, skip_positions: int, batch_size: int) -> tuple[int, int]:
    """(N, T) of `sequences`; ValueError (the `downstream_loss` cases) naming what is wrong."""
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2 or sequences.is_floating_point():
        shape = tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__
        raise ValueError(f"sequences must be an integer tensor [N, T], got {shape}")
    n, t = sequences.shape
    if skip_positions < 0:
        raise ValueError(f"skip_positions must be >= 0, got {skip_positions}")
    if t < skip_positions + 2:
        raise ValueError(
            f"sequences have length T={t}, but skip_positions={skip_positions} needs T >= {skip_positions + 2} "
            "(at least one prediction that depends on a spliced position); use a longer ctx_len"
        )
    if n == 0:
        raise ValueError("sequences is empty (N=0); nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n, t


def _add_batch_losses(model: nn.Module, spec, splices: dict, ids: torch.Tensor, s: int, sums: dict[str, float],
                      i: int, batch_size: int) -> int:
    """Add one batch's summed CE (nats, float64) of the clean and of each spliced forward, and each
    splice's KL(clean || spliced), to `sums`; returns the batch's number of predictions. Predictions
    from positions s..T-2 (of tokens s+1..T-1). ValueError for non-finite clean logits (names the
    sequences [i, i + rows) of batch i // batch_size)."""
    from sae_dist.harvest.hooks import splice_hook

    t = ids.shape[1]

    def logprobs() -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits
        # logits at positions s..T-2 predict tokens s+1..T-1
        return torch.log_softmax(logits[:, s : t - 1, :].float(), dim=-1)

    targets = ids[:, s + 1 :].unsqueeze(-1)
    lp_clean = logprobs()
    if not torch.isfinite(lp_clean).all():
        raise ValueError(
            f"non-finite clean logits for sequences [{i}, {i + ids.shape[0]}) (batch {i // batch_size}); "
            "the LM produces NaN/Inf on these inputs (try dtype=float32)"
        )
    p_clean = lp_clean.exp()
    sums["clean"] -= float(lp_clean.gather(-1, targets).sum(dtype=torch.float64))
    for name, fn in splices.items():
        with splice_hook(model, spec, fn):
            lp = logprobs()
        sums[name] -= float(lp.gather(-1, targets).sum(dtype=torch.float64))
        kl = (p_clean * (lp_clean - lp)).sum(-1, dtype=torch.float64)
        sums["kl_" + name] += float(kl.sum())
        del lp
    return targets.numel()


def _ce_summary(sums: dict[str, float], n_pred: int) -> dict[str, Any]:
    """`downstream_loss`'s dict from the summed losses over n_pred predictions (nats per token; the
    CE loss score is NaN when zero ablation does not change the CE)."""
    ce_clean = sums["clean"] / n_pred
    ce_sae = sums["sae"] / n_pred
    ce_zero = sums["zero"] / n_pred
    denom = ce_zero - ce_clean
    score = (ce_zero - ce_sae) / denom if denom != 0 else math.nan
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_sae": ce_sae,
        "ce_loss_zero_ablation": ce_zero,
        "ce_loss_score": score,
        "ce_loss_delta": ce_sae - ce_clean,
        "kl_div": sums["kl_sae"] / n_pred,
        "kl_div_zero_ablation": sums["kl_zero"] / n_pred,
        "ce_tokens": int(n_pred),
    }
