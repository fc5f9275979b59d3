"""`sae-browse`'s scan in Neuronpedia's feature-dashboard format, the files SAEDashboard's Neuronpedia runner
writes (docs/formats.md#saedashboard--neuronpedia).

SAEDashboard (github.com/jbloomAus/SAEDashboard, `sae_dashboard.neuronpedia.neuronpedia_runner`) writes one JSON
file per batch of latents, `batch-<n>.json`, each `NeuronpediaDashboardBatch.to_dict()` (model_id, layer,
sae_set, sae_id_suffix, features); every feature is `NeuronpediaDashboardFeature.to_dict()` and every example
`NeuronpediaDashboardActivation.to_dict()` (`sae_dashboard.neuronpedia.neuronpedia_dashboard`). The files load
with `NeuronpediaDashboardBatch(**json.load(f))` and are what Neuronpedia imports. We write the same keys, from
the scan of `sae_dist.browse.build.build_browser`, for the latents the browser writes pages for:

* activations: the page's top-activating examples (one per stored sequence; bin_min -1, bin_max the latent's
  max activation, bin_contains -1: SAEDashboard's "TOP ACTIVATIONS" group), then its random activating examples
  (drawn uniformly from the firing tokens: bin_min 0, bin_max the max, bin_contains 1.0, the interval that holds
  every firing). Each example is its whole stored sequence (BOS excluded, as SAEDashboard's converter drops it):
  tokens (each id decoded alone), the latent's activation at every token, qualifying_token_index the example
  token's index;
* frac_nonzero: the density over the scanned tokens; freq_hist_data_bar_values / _heights: the page's histogram
  of the non-zero activations (bin centres, counts);
* pos_str / pos_values, neg_str / neg_values: the page's top / bottom logit effects (empty without an LM);
* n_prompts_total / n_tokens_in_prompt: sequences scanned and their stored length; dataset: the store's.
Values are rounded to 3 decimals as SAEDashboard's converter rounds them. The logit histogram, neuron
alignment, correlated neurons / features and decoder-weight fields are left empty (the scan does not compute
them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from sae_dist.browse.build import histogram, latent_acts

__all__ = ["NEURONPEDIA_DIR", "FEATURES_PER_BATCH", "neuronpedia_feature", "write_neuronpedia"]

#: the folder of the batch files, under the browser's out_dir
NEURONPEDIA_DIR = "neuronpedia"
#: latents per batch file: SAEDashboard's NeuronpediaRunnerConfig.n_features_at_a_time default
FEATURES_PER_BATCH = 128
#: the keys of NeuronpediaDashboardFeature.to_dict() the scan has no values for
_EMPTY_LISTS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist", "vector")


def _r3(values) -> list[float]:
    """Rounded to 3 decimals, as SAEDashboard's FeatureProcessor.round_list does."""
    return [round(float(v), 3) for v in np.asarray(values, np.float64).ravel()]


def _example(scan, lat_rows, lat_vals, row: int, decode: Callable[[int], str], bins: tuple) -> dict:
    """NeuronpediaDashboardActivation.to_dict() of the stored sequence holding scan row `row`."""
    s = int(scan.seq_of(np.asarray([row]))[0])
    rows = np.arange(int(scan.seq_start[s]), int(scan.seq_start[s + 1]))
    return {"bin_min": bins[0], "bin_max": bins[1], "bin_contains": bins[2],
            "tokens": [decode(int(t)) for t in scan.token_ids[rows]],
            "values": _r3(latent_acts(lat_rows, lat_vals, rows)), "qualifying_token_index": int(row - rows[0])}


def neuronpedia_feature(rec: dict, scan, lat_rows: np.ndarray, lat_vals: np.ndarray, top_rows, random_rows,
                        decode: Callable[[int], str], hist_bins: int, dataset: str | None) -> dict:
    """NeuronpediaDashboardFeature.to_dict() of one latent (the module docstring says what each key holds).

    rec: the latent's browser.json record (`_latent_record`: latent, density, max_act, logits_pos / _neg as
    (token id, effect) pairs). scan: the `ScanResult`; lat_rows int64 / lat_vals float32: the scan rows where the
    latent fires and its values there (sorted by row); top_rows / random_rows: the page's examples (scan rows).
    decode: token id -> text. hist_bins: bins of the activation histogram. dataset: the store's, or None.
    """
    heights, centres = [], []
    if len(lat_vals):
        counts, edges = histogram(lat_vals, hist_bins)
        heights, centres = [int(c) for c in counts], _r3((edges[:-1] + edges[1:]) / 2)
    vmax = round(float(rec["max_act"]), 3)
    top, rnd = (-1.0, vmax, -1.0), (0.0, vmax, 1.0)
    pos, neg = rec.get("logits_pos", []), rec.get("logits_neg", [])
    return {
        "feature_index": int(rec["latent"]),
        **{key: [] for key in _EMPTY_LISTS},
        "neg_str": [decode(t) for t, _ in neg], "neg_values": _r3([v for _, v in neg]),
        "pos_str": [decode(t) for t, _ in pos], "pos_values": _r3([v for _, v in pos]),
        "frac_nonzero": float(rec["density"]),
        "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": heights,
        "n_prompts_total": int(len(scan.seq_start) - 1),
        "n_tokens_in_prompt": scan.longest_seq,
        "dataset": dataset or "",
        "activations": [_example(scan, lat_rows, lat_vals, int(r), decode, top) for r in top_rows]
        + [_example(scan, lat_rows, lat_vals, int(r), decode, rnd) for r in random_rows],
    }


def write_neuronpedia(out_dir: str | Path, features: list[dict], *, model_id: str | None, layer: int,
                      sae_set: str) -> list[Path]:
    """Write `features` (`neuronpedia_feature` dicts, in order) as out_dir/batch-0.json, batch-1.json, ... of
    FEATURES_PER_BATCH features each (NeuronpediaDashboardBatch.to_dict(): model_id, layer, sae_set,
    sae_id_suffix None, features); batch files left by an earlier run in out_dir are removed first. Returns
    the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("batch-*.json"):
        old.unlink()
    paths = []
    for b, start in enumerate(range(0, len(features), FEATURES_PER_BATCH)):
        batch = {"model_id": model_id or "", "layer": int(layer), "sae_set": sae_set, "sae_id_suffix": None,
                 "features": features[start:start + FEATURES_PER_BATCH]}
        path = out / f"batch-{b}.json"
        path.write_text(json.dumps(batch), encoding="utf-8")
        paths.append(path)
    return paths
