"""Feature-density windows (`trainer.feature_density_every_steps`, sae_dist.train.density) in this process:
for every architecture the logged summaries, the wandb histogram and sparsity.safetensors equal a dense
reference computed from the SAE's own latents on the same batches (SAELens' definitions, restated here:
sae_lens/training/sae_trainer.py `_log_feature_sparsity` and `_build_sparsity_log_dict`); a run resumed
mid-window logs what an uninterrupted one logs; a checkpoint without the window restarts it. The same
windows over a dp x tp mesh: tests/integration/parallel/test_parallel_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import wandb
from helpers.synthetic import train_on_synthetic
from helpers.train import WandbRecorder, offline_one_thread, sparse_dictionary_data, synthetic_store, train_log
from safetensors import safe_open

from sae_dist.sae import SAEConfig
from sae_dist.sae.registry import ARCHITECTURES, architecture_class
from sae_dist.train import TrainerConfig, train

B, D_SAE, EVERY, STEPS = 128, 96, 3, 7
#: SAELens' wandb names of a window and our train_log.jsonl names
NAMES = {"metrics/mean_log10_feature_sparsity": "train/mean_log10_feature_density",
         "sparsity/below_1e-5": "train/latents_density_below_1e-5",
         "sparsity/below_1e-6": "train/latents_density_below_1e-6"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    yield from offline_one_thread(monkeypatch)


def _cfg(architecture: str) -> SAEConfig:
    k = None if architecture in ("relu", "prolu", "jumprelu") else 3
    opts = {"target_l0": 3.0} if architecture in ("relu", "prolu") else {}
    return SAEConfig(d_in=16, d_sae=D_SAE, k=k, architecture=architecture, dead_tokens=256, options=opts)


@torch.no_grad()
def _dense_fire_counts(sae, x: torch.Tensor) -> torch.Tensor:
    """int64 [d_sae]: tokens of x [B, d_in] on which each latent of `sae` is non-zero in training, from its dense
    latents: the BatchTopK selection (the k*B largest pre-activations of the batch, ReLU'd) for the batchtopk
    family, else the SAE's own `encode` (TopK, ReLU, JumpReLU, ProLU: the same rule in training)."""
    if sae.architecture == "batchtopk" or getattr(getattr(sae, "opts", None), "base", None) == "batchtopk":
        pre = sae.pre_acts(x)
        keep = torch.zeros(pre.numel(), dtype=torch.bool)
        keep[pre.reshape(-1).topk(sae.cfg.k * x.shape[0]).indices] = True
        z = F.relu(pre) * keep.view_as(pre)
    else:
        z = sae.encode(x)
    return (z != 0).sum(0)


def _spy_on_steps(monkeypatch, architecture: str) -> list[torch.Tensor]:
    """The dense fire counts of every training step's batch at the weights of that step: after its losses (a
    JumpReLU threshold is initialised from the first batch there), before the optimizer's update."""
    cls, seen = architecture_class(architecture), []
    step_losses = cls.training_step_losses

    def spy(self, x, dead_mask=None):
        res = step_losses(self, x, dead_mask)
        seen.append(_dense_fire_counts(self, x))
        return res

    monkeypatch.setattr(cls, "training_step_losses", spy)
    return seen


def _reference(counts: list[torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """SAELens' summaries of a window of per-step fire counts: frequency f = fires / tokens (float32),
    log10(f + 1e-10), its mean, the counts of f < 1e-5 and f < 1e-6."""
    f = torch.stack(counts).sum(0).float() / (len(counts) * B)
    log10 = torch.log10(f + 1e-10)
    return {"train/mean_log10_feature_density": log10.mean().item(),
            "train/latents_density_below_1e-5": (f < 1e-5).sum().item(),
            "train/latents_density_below_1e-6": (f < 1e-6).sum().item()}, log10


def _sparsity(run) -> tuple[torch.Tensor, dict]:
    with safe_open(str(run / "sparsity.safetensors"), "pt") as f:
        return f.get_tensor("sparsity"), f.metadata()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_window_densities_equal_a_dense_reference(tmp_path, monkeypatch, architecture):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(WandbRecorder(**kw)) or runs[-1])
    seen = _spy_on_steps(monkeypatch, architecture)
    torch.manual_seed(0)
    train_on_synthetic(tmp_path, _cfg(architecture), n_store_tokens=2048, tokens=B * STEPS, batch_tokens=B,
                       seed=5, log_every_steps=100, feature_density_every_steps=EVERY, lr=1e-2,
                       wandb_cfg={"mode": "offline"})
    assert len(seen) == STEPS
    log, (run,) = train_log(tmp_path / "run"), runs
    assert [r["step"] for r in log] == [s for s, _ in run.logged] == [3, 6, 7]  # window ends and the last step
    assert not set(NAMES.values()) & set(log[-1]) and not set(NAMES) & set(run.logged[-1][1])
    for w, (rec, (_, got)) in enumerate(zip(log[:2], run.logged[:2], strict=True)):
        want, log10 = _reference(seen[w * EVERY:(w + 1) * EVERY])
        assert rec["train/mean_log10_feature_density"] == pytest.approx(want["train/mean_log10_feature_density"],
                                                                         rel=1e-6)
        assert {k: rec[k] for k in list(want)[1:]} == {k: want[k] for k in list(want)[1:]}
        assert {k: got[k] for k in NAMES} == {k: rec[v] for k, v in NAMES.items()}
        hist, ref = got["plots/feature_density_line_chart"], wandb.Histogram(log10.numpy())
        assert hist.histogram == ref.histogram and np.allclose(hist.bins, ref.bins, rtol=0, atol=1e-6)
    values, meta = _sparsity(tmp_path / "run")  # the last window's per-latent values, in latent order
    torch.testing.assert_close(values, _reference(seen[EVERY:2 * EVERY])[1], rtol=0, atol=1e-6)
    assert meta == {"step": "6", "window_tokens": str(EVERY * B)}
    if architecture == "topk":  # the comparison covers rare latents and common ones
        assert 0 < log[0]["train/latents_density_below_1e-6"] < D_SAE


def test_resume_mid_window_logs_the_uninterrupted_densities(tmp_path):
    """A checkpoint inside a window keeps its counts (summed over dp, tokens in the trainer state): the run
    stopped after step 6 and resumed from the checkpoint of step 4 logs the windows of steps 5 and 10 as the
    uninterrupted run does; a checkpoint written with the option off restarts the window at the resume."""
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=2048, d=16, seed=1))

    def window_logs(run, every=5, max_steps=None):
        tcfg = TrainerConfig(tokens=B * 10, batch_tokens=B, lr=1e-2, log_every_steps=100, checkpoint_every_steps=4,
                             feature_density_every_steps=every, max_steps=max_steps)
        train(store_path=store, out_dir=tmp_path / run, sae_cfg=_cfg("topk"), trainer_cfg=tcfg, seed=5,
              progress=False, wandb_cfg={"enabled": False})
        return [{k: r[k] for k in ("step", *NAMES.values()) if k in r} for r in train_log(tmp_path / run)]

    whole = window_logs("whole")
    assert [r["step"] for r in whole] == [5, 10]
    window_logs("resumed", max_steps=6)
    assert window_logs("resumed") == whole
    assert torch.equal(_sparsity(tmp_path / "resumed")[0], _sparsity(tmp_path / "whole")[0])
    window_logs("was_off", every=0, max_steps=6)  # its last checkpoint (step 4) holds no window
    window_logs("was_off", max_steps=5)  # the window restarts at the resume: step 5's covers that step alone
    assert _sparsity(tmp_path / "was_off")[1] == {"step": "5", "window_tokens": str(B)}
    assert [r["step"] for r in window_logs("was_off")] == [5, 10]
    assert _sparsity(tmp_path / "was_off")[1] == {"step": "10", "window_tokens": str(5 * B)}
