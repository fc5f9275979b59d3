"""Training metrics sinks: `out_dir/train_log.jsonl` (always) and Weights & Biases (optional).

wandb runs offline (`mode="offline"`, files under `out_dir/wandb`) when no API key is configured
(neither `WANDB_API_KEY` nor a netrc entry for api.wandb.ai), so a laptop run never touches the
network; `wandb_cfg` = {"project", "mode", "group", "name", "enabled"} overrides.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import uuid
from pathlib import Path

__all__ = ["JsonlLogger", "WandbLogger", "wandb_has_api_key", "truncate_jsonl", "saelens_metrics", "saelens_term_name",
           "saelens_eval_metrics", "FEATURE_DENSITY_PLOT", "MEAN_LOG10_KEY", "BELOW_KEYS", "flat_scalars",
           "add_eval_to_wandb_run"]


class JsonlLogger:
    """Append one JSON object per logged step to `path` (flushed each line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Keep only records with record["step"] <= max_step (used when resuming from a checkpoint so
    that steps logged after it by a killed run are not duplicated). Drops a torn last line."""
    p = Path(path)
    if not p.exists():
        return
    keep = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", -1)) <= max_step:
            keep.append(line)
    tmp = p.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, p)


def wandb_has_api_key() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc (or $NETRC) has an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def saelens_term_name(name: str) -> str:
    """SAELens' wandb name of an architecture's extra logged term `name` (`saelens_metrics`)."""
    if name.endswith("_coef"):
        return f"details/{name.removesuffix('_coef')}_coefficient"
    return f"losses/{name}" if name.endswith("_loss") else f"losses/{name}_loss"


#: train_log.jsonl key of a feature-density window's mean over latents of log10(f + 1e-10) (sae_dist.train.density)
MEAN_LOG10_KEY = "train/mean_log10_feature_density"
#: train_log.jsonl keys of the counts of latents with f below each threshold (sae_dist.train.density)
BELOW_KEYS = {"train/latents_density_below_1e-5": 1e-5, "train/latents_density_below_1e-6": 1e-6}
#: train_log.jsonl keys that wandb gets under SAELens' name (or, for tokens_per_s, a name in its scheme)
_SAELENS_NAMES = {"train/loss": "losses/overall_loss", "train/fvu": "losses/mse_loss",
                  "train/auxk_loss": "losses/auxiliary_reconstruction_loss", "train/l0": "metrics/l0",
                  "train/lr": "details/current_learning_rate", "train/tokens_per_s": "details/tokens_per_s",
                  MEAN_LOG10_KEY: "metrics/mean_log10_feature_sparsity",
                  **{key: key.replace("train/latents_density_", "sparsity/") for key in BELOW_KEYS}}
#: SAELens' wandb name of the histogram of a feature-density window's log10 frequencies (sae_dist.train.density)
FEATURE_DENSITY_PLOT = "plots/feature_density_line_chart"
#: train_log.jsonl keys that wandb gets as a derived value (`saelens_metrics`)
_DERIVED = ("train/dead_fraction", "train/multi_topk_fvu")


def saelens_metrics(m: dict, tokens: int, d_sae: int) -> dict:
    """The step metrics `m` (the `train/...` keys of `train_log.jsonl`) under the names SAELens' trainer logs
    to wandb, so that dashboards built for SAELens runs read ours (docs/reference.md#wandb).

    Renamed (`_SAELENS_NAMES`): losses/overall_loss = train/loss; losses/mse_loss = train/fvu (the
    reconstruction term of the loss: the normalized MSE of Gao et al. 2024, eq. 1, which is the fvu);
    losses/auxiliary_reconstruction_loss = train/auxk_loss; metrics/l0 = train/l0;
    details/current_learning_rate = train/lr; details/tokens_per_s (ours: SAELens has no such name); at the
    end of a feature-density window (sae_dist.train.density) metrics/mean_log10_feature_sparsity =
    train/mean_log10_feature_density, sparsity/below_1e-5 / below_1e-6 = train/latents_density_below_1e-5 / 1e-6.
    Derived: metrics/explained_variance = 1 - train/fvu (SAELens' definition, 1 - sum ||x - x_hat||^2 /
    sum ||x - mean x||^2 over the batch); sparsity/dead_features = the count of dead latents
    (train/dead_fraction * d_sae); details/n_training_samples = tokens (activation rows);
    metrics/multi_topk_explained_variance = 1 - train/multi_topk_fvu (ours). An architecture's extra terms
    train/<name> follow SAELens' pattern (`saelens_term_name`)."""
    out = {_SAELENS_NAMES[k]: v for k, v in m.items() if k in _SAELENS_NAMES}
    out.update({"metrics/explained_variance": 1.0 - m["train/fvu"], "details/n_training_samples": int(tokens),
                "sparsity/dead_features": round(m["train/dead_fraction"] * d_sae)})
    if "train/multi_topk_fvu" in m:
        out["metrics/multi_topk_explained_variance"] = 1.0 - m["train/multi_topk_fvu"]
    for key, v in m.items():
        if key.startswith("train/") and key not in _SAELENS_NAMES and key not in _DERIVED:
            out[saelens_term_name(key.removeprefix("train/"))] = v
    return out


def saelens_eval_metrics(m: dict) -> dict:
    """`downstream_loss`'s dict `m` under the names SAELens' in-training evaluator gives wandb (its `run_evals`
    groups; wandb shows them as e.g. model_performance_preservation.ce_loss_score):
    model_performance_preservation: ce_loss_score, ce_loss_with_sae (= ce_loss_sae), ce_loss_without_sae
    (= ce_loss_clean), ce_loss_with_ablation (= ce_loss_zero_ablation); model_behavior_preservation:
    kl_div_with_sae (= kl_div), kl_div_with_ablation (= kl_div_zero_ablation) and kl_div_score =
    (kl_div_with_ablation - kl_div_with_sae) / kl_div_with_ablation (NaN when the ablation's KL is 0)."""
    kl_abl = m["kl_div_zero_ablation"]
    return {
        "model_performance_preservation": {
            "ce_loss_score": m["ce_loss_score"], "ce_loss_with_sae": m["ce_loss_sae"],
            "ce_loss_without_sae": m["ce_loss_clean"], "ce_loss_with_ablation": m["ce_loss_zero_ablation"]},
        "model_behavior_preservation": {
            "kl_div_score": (kl_abl - m["kl_div"]) / kl_abl if kl_abl != 0 else math.nan,
            "kl_div_with_sae": m["kl_div"], "kl_div_with_ablation": kl_abl},
    }


#: exports up to this size are uploaded as wandb artifacts; larger ones are logged as references
ARTIFACT_UPLOAD_MAX_BYTES = 2 * 2**30


class WandbLogger:
    """Thin wandb wrapper; no-op when disabled. Logs metric dicts (and histograms) at the training step."""

    def __init__(self, out_dir: str | os.PathLike, wandb_cfg: dict | None, config: dict):
        cfg = dict(wandb_cfg or {})
        self.run = None
        if not cfg.get("enabled", True):
            return
        mode = cfg.get("mode") or os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if wandb_has_api_key() else "offline"
        if mode == "disabled":
            return
        import wandb

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.get("project", "sae-dist"),
            entity=cfg.get("entity"),
            tags=list(cfg.get("tags") or []) or None,
            group=cfg.get("group"),
            name=cfg.get("name"),
            mode=mode,
            dir=str(out),
            id=run_id,
            resume="allow",
            reinit="create_new",  # several runs open at once in a shared sweep (sae_dist.train.trainer.train_grid)
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict, step: int, histograms: dict | None = None) -> None:
        """Log scalar `metrics` at `step`, and each 1-D CPU tensor of `histograms` ({name: values}) as a
        wandb.Histogram of its values (wandb's default 64 bins over their range)."""
        if self.run is not None:
            if histograms:
                import wandb

                metrics = {**metrics, **{k: wandb.Histogram(v.numpy()) for k, v in histograms.items()}}
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def log_sae(self, sae_dir: str | os.PathLike, name: str) -> None:
        """The exported SAE directory as a wandb artifact of type "model" named `name` (characters other than
        letters, digits, "-", "_" and "." become "-"); offline runs keep it with the run for `wandb sync`.
        The files are not copied to a staging area (the export is final); an export over
        ARTIFACT_UPLOAD_MAX_BYTES is logged as a reference to its directory (file://, no upload, no checksum
        pass over the weights): a 16M-latent SAE is hundreds of GB."""
        if self.run is not None:
            import wandb

            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type="model",
                                 description="sae-dist export (SAELens layout)")
            size = sum(f.stat().st_size for f in Path(sae_dir).iterdir() if f.is_file())
            if size > ARTIFACT_UPLOAD_MAX_BYTES:
                art.add_reference(Path(sae_dir).resolve().as_uri(), checksum=False)
            else:
                art.add_dir(str(sae_dir), policy="immutable")
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def flat_scalars(d: dict, prefix: str) -> dict:
    """{prefix/key[/subkey...]: value} of the int, float and bool leaves of nested dict `d` (e.g. eval.json
    for a wandb run summary)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}/{k}"))
        elif isinstance(v, (int, float, bool)):
            out[f"{prefix}/{k}"] = v
    return out


def add_eval_to_wandb_run(out_dir: str | os.PathLike, wandb_cfg: dict | None, eval_result: dict) -> None:
    """Reopen the wandb run of `out_dir` (its wandb_run_id.txt) and put `eval_result` (eval.json) into its
    summary under eval/...; nothing when wandb is off or the run directory has no wandb run."""
    if not (Path(out_dir) / "wandb_run_id.txt").exists():
        return
    wb = WandbLogger(out_dir, wandb_cfg, config=None)
    try:
        wb.summary(flat_scalars(eval_result, "eval"))
    finally:
        wb.finish()
