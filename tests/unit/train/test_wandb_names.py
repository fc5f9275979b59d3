"""What sae-train sends to wandb: SAELens' metric names (losses/overall_loss, metrics/explained_variance,
metrics/l0, sparsity/dead_features, ...), each computed from the same step's train_log.jsonl record, the
feature-density window's (metrics/mean_log10_feature_sparsity, sparsity/below_1e-5, the histogram
plots/feature_density_line_chart) at the window's end only (their values against a dense reference:
tests/unit/train/test_feature_density.py), and the
wandb.entity / wandb.tags options. wandb itself is replaced by a recorder of what `wandb.init`,
`run.log` and `run.log_artifact` receive (a real offline run's file is read back in
tests/integration/eval/test_scaling_multirun.py)."""

from __future__ import annotations

import json

import pytest
import torch
import wandb
from helpers.synthetic import train_on_synthetic
from helpers.train import WandbRecorder
from safetensors.torch import load_file

from sae_dist.sae import SAEConfig
from sae_dist.train.logging import saelens_term_name

SAELENS_KEYS = {"losses/overall_loss", "losses/mse_loss", "losses/auxiliary_reconstruction_loss",
                "metrics/explained_variance", "metrics/l0", "sparsity/dead_features", "details/current_learning_rate",
                "details/n_training_samples", "details/tokens_per_s"}
#: SAELens' names of a feature-density window (sae_lens SAETrainer._build_sparsity_log_dict)
DENSITY_KEYS = {"metrics/mean_log10_feature_sparsity", "sparsity/below_1e-5", "sparsity/below_1e-6",
                "plots/feature_density_line_chart"}


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_wandb_gets_saelens_names_computed_from_the_logged_step(tmp_path, monkeypatch, architecture):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(WandbRecorder(**kw)) or runs[-1])
    opts = {"target_l0": 4.0} if architecture == "relu" else {}
    cfg = SAEConfig(d_in=16, d_sae=64, k=4 if architecture == "topk" else None, architecture=architecture,
                    dead_tokens=1024, options=opts)
    torch.manual_seed(0)
    train_on_synthetic(tmp_path, cfg, tokens=512 * 12, batch_tokens=512, log_every_steps=4, seed=3,
                       feature_density_every_steps=6,
                       wandb_cfg={"mode": "offline", "entity": "lab", "tags": ["gpt2", "layer8"]})
    (run,) = runs
    assert run.init["entity"] == "lab" and run.init["tags"] == ["gpt2", "layer8"] and run.init["mode"] == "offline"
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [s for s, _ in run.logged] == [r["step"] for r in log] == [4, 6, 8, 12]  # + the window ends 6, 12
    for (step, got), rec in zip(run.logged, log, strict=True):
        assert SAELENS_KEYS <= set(got) and not any(k.startswith("train/") for k in got)
        assert set(got) & DENSITY_KEYS == (DENSITY_KEYS if step % 6 == 0 else set()), step
        if step % 6 == 0:
            assert got["metrics/mean_log10_feature_sparsity"] == rec["train/mean_log10_feature_density"]
            assert got["sparsity/below_1e-5"] == rec["train/latents_density_below_1e-5"]
            assert got["sparsity/below_1e-6"] == rec["train/latents_density_below_1e-6"]
            hist = got["plots/feature_density_line_chart"]
            assert isinstance(hist, wandb.Histogram) and sum(hist.histogram) == 64 and len(hist.bins) == 65
        assert got["losses/overall_loss"] == rec["train/loss"] and got["losses/mse_loss"] == rec["train/fvu"]
        assert got["metrics/explained_variance"] == pytest.approx(1 - rec["train/fvu"], abs=1e-12)
        assert got["metrics/l0"] == rec["train/l0"] and got["details/current_learning_rate"] == rec["train/lr"]
        assert got["sparsity/dead_features"] == round(rec["train/dead_fraction"] * 64)
        assert got["details/n_training_samples"] == rec["tokens"]
        extra = {k for k in rec if k.startswith("train/")} - {
            "train/loss", "train/fvu", "train/auxk_loss", "train/l0", "train/dead_fraction", "train/lr",
            "train/tokens_per_s", "train/mean_log10_feature_density", "train/latents_density_below_1e-5",
            "train/latents_density_below_1e-6"}
        for k in extra:  # an architecture's own terms, named as SAELens names them
            assert got[saelens_term_name(k.removeprefix("train/"))] == rec[k]
    # the last window's histogram is the one of the per-latent values kept in sparsity.safetensors
    last = wandb.Histogram(load_file(str(tmp_path / "run" / "sparsity.safetensors"))["sparsity"].numpy())
    hist = run.logged[-1][1]["plots/feature_density_line_chart"]
    assert (hist.histogram, hist.bins) == (last.histogram, last.bins)
    (art,) = run.artifacts  # the export, as a wandb model artifact
    assert (art.name, art.type) == ("sae-run", "model")
    assert {"cfg.json", "sae_weights.safetensors"} <= set(art.manifest.entries)
    assert run.summary["tokens_trained"] == 512 * 12
    if architecture == "relu":  # SAELens' names for the L1 penalty and its scheduled coefficient
        assert {"losses/l1_loss", "details/l1_coefficient"} <= set(run.logged[-1][1])


def test_an_export_over_the_upload_limit_is_logged_as_a_reference(tmp_path, monkeypatch):
    """ARTIFACT_UPLOAD_MAX_BYTES below the export's size: the artifact points at the export directory
    (file://) instead of carrying its files."""
    from sae_dist.train import logging as tlog

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(WandbRecorder(**kw)) or runs[-1])
    monkeypatch.setattr(tlog, "ARTIFACT_UPLOAD_MAX_BYTES", 1000)
    train_on_synthetic(tmp_path, SAEConfig(d_in=16, d_sae=64, k=4), tokens=512 * 2, batch_tokens=512, seed=1,
                       wandb_cfg={"mode": "offline"})
    (art,) = runs[0].artifacts
    sae_dir = (tmp_path / "run" / "sae").resolve()
    refs = {e.ref for e in art.manifest.entries.values()}
    assert refs == {f.as_uri() for f in sae_dir.iterdir() if f.is_file()}, refs
    assert (sae_dir / "sae_weights.safetensors").as_uri() in refs


def test_eval_json_goes_into_the_summary_of_the_same_run(tmp_path, monkeypatch):
    """eval.after_train: the run is reopened by the id in wandb_run_id.txt and eval.json's numbers land in its
    summary under eval/...; a directory without a wandb run is left alone."""
    from sae_dist.train.logging import add_eval_to_wandb_run

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(WandbRecorder(**kw)) or runs[-1])
    cfg = SAEConfig(d_in=16, d_sae=64, k=4)
    train_on_synthetic(tmp_path, cfg, tokens=512 * 4, batch_tokens=512, log_every_steps=2, seed=1,
                       wandb_cfg={"mode": "offline"})
    result = {"fvu": 0.25, "l0": 4.0, "model": "tiny", "downstream": {"ce_loss_score": 0.9, "note": "x"}}
    add_eval_to_wandb_run(tmp_path / "run", {"mode": "offline"}, result)
    first, again = runs
    assert again.init["id"] == first.init["id"] == (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    assert again.init["resume"] == "allow"
    assert again.summary == {"eval/fvu": 0.25, "eval/l0": 4.0, "eval/downstream/ce_loss_score": 0.9}
    add_eval_to_wandb_run(tmp_path / "elsewhere", {"mode": "offline"}, result)
    assert len(runs) == 2
