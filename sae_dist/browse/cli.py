"""`sae-browse`: Hydra console script writing the static feature browser.

    sae-browse sae_path=runs/demo/sae store.path=runs/demo/activations.zarr run_dir=/tmp/b \
        browse.tokens=100000 browse.latents_top=100

Options: sae_dist.config.BrowseConfig (`browse.*`; `sae-browse --help-config` lists them), plus
`sae_path`, `store.path`, `model` (the LM whose tokenizer decodes the stored token ids and whose
unembedding gives the logit effects), `device`, `seed`. Output: `browse.out_dir` (default ${run_dir}/browser).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from sae_dist.cli import apply_sae_provenance, hydra_app, load_configured_lm, resolve_device

__all__ = ["main", "run_browse", "browse_options"]


def browse_options(cfg: DictConfig):
    """BrowseOptions from the `browse` group (+ the root `seed`), validated (sae_dist.config.browse_config);
    a config without a `browse` node gets BrowseConfig's defaults."""
    from sae_dist.config import browse_config

    return browse_config(cfg)


def run_browse(cfg: DictConfig, lm=None, progress: bool = True) -> dict:
    """Build the browser described by cfg (see the module docstring); returns build_browser's summary.

    lm: optional already loaded (model, tokenizer). FileNotFoundError for a missing SAE export;
    ValueError for bad options, a store whose d_in != the SAE's d_in, or a store without token_ids.
    """
    from sae_dist.browse.build import build_browser
    from sae_dist.config import BrowseConfig, node_object
    from sae_dist.sae.export import load_sae
    from sae_dist.sae.formats import read_sae_cfg
    from sae_dist.sae.hub import resolve_sae_path
    from sae_dist.store import open_store, read_attrs

    opts = browse_options(cfg)
    device = resolve_device(cfg.device)
    sae_path = resolve_sae_path(cfg.sae_path)  # hf://ORG/REPO/...: the hub's local copy
    sae = load_sae(sae_path, device=device)
    store_path = str(cfg.store.path)
    attrs = read_attrs(open_store(store_path))
    sae_cfg = read_sae_cfg(sae_path)  # ours or a SAELens save (hook_name under "metadata")
    if lm is None:  # the LM decodes the store's token ids: the store's model unless the command names one
        apply_sae_provenance(cfg, {"model_name": attrs.get("model") or sae_cfg.get("model_name")}, "sae-browse",
                             "the store's attributes")
    model, tokenizer = lm if lm is not None else load_configured_lm(cfg, device)
    sae_info = {k: sae_cfg.get(k) for k in ("architecture", "d_in", "d_sae", "k", "hook_name", "model_name")}
    sae_info["path"] = str(sae_path)
    store_info = {"path": store_path, "model": attrs.get("model"), "hook_name": attrs.get("hook_name"),
                  "n_tokens": attrs.get("n_tokens"), "dataset": attrs.get("dataset")}
    out_dir = Path(node_object(cfg.get("browse"), BrowseConfig).out_dir)
    t0 = time.perf_counter()
    summary = build_browser(sae, store_path, out_dir, tokenizer=tokenizer, lm=model, opts=opts, device=device,
                            progress=progress, sae_info=sae_info, store_info=store_info)
    summary["out_dir"] = str(out_dir)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


@hydra_app
def main(cfg: DictConfig) -> None:
    """sae-browse: SAE + activation store -> static HTML feature browser (browse.out_dir/index.html)."""
    summary = run_browse(cfg)
    keys = ("tokens_scanned", "alive", "latents_written", "n2g_precision", "n2g_recall", "n2g_f1", "n2g_latents",
            "wall_s")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2, default=str))
    print(f"wrote {Path(summary['out_dir']) / 'index.html'}")


if __name__ == "__main__":
    main()
