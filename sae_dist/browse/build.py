"""Build a static HTML feature browser for an exported SAE over an activation store.

Pipeline (`build_browser`):
1. scan the first `tokens` rows of the store's text (activations + token_ids + seq_index), encode them
   with the SAE in batches, keep the sparse (row, latent, value) triples of every firing;
2. latent statistics: density (fraction of scanned tokens where the latent is > 0), max and mean
   activation; pick the latents to write (the `latents_top` densest alive ones, `latents_random`
   random alive ones, and any `latent_ids`);
3. per written latent: top-activating contexts (one per sequence) and random activating ones,
   rebuilt from the stored token ids within each stored sequence; a histogram of its non-zero
   activations; top / bottom logit effects W_dec[i] @ W_U^T (optionally times the LM's final norm
   weight, i.e. through RMSNorm/LayerNorm's gain); an N2G explanation fitted on the first
   sequences of the scan and scored on the last ones (`sae_dist.eval.n2g`; Gao et al. 2024 sec. 4.4);
4. write `index.html` (a table sortable client-side: `index.html#sort=density&dir=desc`, keys
   latent, density, maxact, f1, precision, recall), `latents/<i>.html`, `style.css`, `browser.js`,
   and `browser.json` (summary + per-latent numbers + N2G metrics); with `neuronpedia` (default) the same
   latents as SAEDashboard's Neuronpedia batch files, `neuronpedia/batch-<n>.json` (`sae_dist.browse.neuronpedia`).
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sae_dist.browse.assets import BROWSER_JS, STYLE_CSS

__all__ = ["BrowseOptions", "ScanResult", "build_browser", "scan_store", "logit_effects", "final_norm_weight"]


@dataclass
class BrowseOptions:
    """Options of `build_browser` (conf/browse/default.yaml holds the same keys, commented).

    tokens: store rows scanned from the start (>= 1; capped at the store size). batch_tokens: rows
    per SAE encode. latents_top / latents_random: how many densest / random alive latents get a page;
    latent_ids: extra latents to write. top_contexts / random_contexts: examples per page.
    window_before / window_after: context tokens shown around the example token. logit_k: top and
    bottom tokens of the logit-effect table. logit_through_norm: multiply W_dec rows by the LM's
    final norm weight first. hist_bins: bins of the histograms. n2g_*: `sae_dist.eval.n2g.fit_n2g`
    options; n2g_heldout_fraction: last fraction of the scanned sequences used to score it.
    neuronpedia: also write the written latents in Neuronpedia's feature-dashboard format (SAEDashboard's
    batch-<n>.json files, `sae_dist.browse.neuronpedia`) under out_dir/neuronpedia/, with
    neuronpedia_sae_set as their sae_set. seed: random examples / random latents.
    """

    tokens: int = 200_000
    batch_tokens: int = 4096
    latents_top: int = 200
    latents_random: int = 50
    latent_ids: list = field(default_factory=list)
    top_contexts: int = 12
    random_contexts: int = 8
    window_before: int = 24
    window_after: int = 4
    logit_k: int = 10
    logit_through_norm: bool = True
    hist_bins: int = 30
    n2g_max_n: int = 4
    n2g_top: int = 20
    n2g_fire_frac: float = 0.0
    n2g_min_precision: float = 0.5
    n2g_min_count: int = 3
    n2g_heldout_fraction: float = 0.3
    neuronpedia: bool = True
    neuronpedia_sae_set: str = "sae-dist"
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the option, its value and the valid range."""
        ints = {"tokens": 1, "batch_tokens": 1, "latents_top": 0, "latents_random": 0, "top_contexts": 1,
                "random_contexts": 0, "window_before": 0, "window_after": 0, "logit_k": 1, "hist_bins": 2,
                "n2g_max_n": 1, "n2g_top": 1, "n2g_min_count": 1}
        for k, lo in ints.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"browse.{k}={v!r}; must be an integer >= {lo}")
        if not 0.0 < float(self.n2g_heldout_fraction) < 1.0:
            raise ValueError(f"browse.n2g_heldout_fraction={self.n2g_heldout_fraction!r}; must be in (0, 1)")
        if not 0.0 <= float(self.n2g_fire_frac) < 1.0:
            raise ValueError(f"browse.n2g_fire_frac={self.n2g_fire_frac!r}; must be in [0, 1)")
        if not isinstance(self.neuronpedia_sae_set, str) or not self.neuronpedia_sae_set.strip():
            raise ValueError(f"browse.neuronpedia_sae_set={self.neuronpedia_sae_set!r}; must be a non-empty name")
        if not 0.0 < float(self.n2g_min_precision) <= 1.0:
            raise ValueError(f"browse.n2g_min_precision={self.n2g_min_precision!r}; must be in (0, 1]")


# ----------------------------------------------------------------------------------------------
# scanning the store


@dataclass
class ScanResult:
    """Sparse latent activations over the scanned store rows.

    n_tokens: rows scanned. token_ids int64 [n_tokens]; seq_start int64 [n_seq + 1]: row offsets of the
    stored sequences within the scan (rows of one sequence are contiguous). rows int64 [nnz],
    latents int64 [nnz], values float32 [nnz]: every (row, latent, activation > 0), sorted by latent
    then row. d_sae: the SAE width.
    """

    n_tokens: int
    token_ids: np.ndarray
    seq_start: np.ndarray
    rows: np.ndarray
    latents: np.ndarray
    values: np.ndarray
    d_sae: int

    def latent_slice(self, i: int) -> slice:
        """Slice of rows/values belonging to latent i."""
        lo, hi = np.searchsorted(self.latents, [i, i + 1])
        return slice(int(lo), int(hi))

    def seq_of(self, rows: np.ndarray) -> np.ndarray:
        """Sequence index (within the scan) of each row."""
        return np.searchsorted(self.seq_start, rows, side="right") - 1

    @cached_property
    def longest_seq(self) -> int:
        """Rows of the longest scanned sequence (0 when none); computed once."""
        return int(np.diff(self.seq_start).max()) if len(self.seq_start) > 1 else 0


def _check_store(g, store_path, sae) -> None:
    d_in = int(g["activations"].shape[1])
    if d_in != int(sae.d_in):
        raise ValueError(f"the activation store {str(store_path)!r} has d_in={d_in} but the SAE has "
                         f"d_in={int(sae.d_in)}: use the store harvested at the SAE's hook "
                         f"(cfg.json hook_name) with the same model")
    if "token_ids" not in g:
        raise ValueError(f"the activation store {str(store_path)!r} has no token_ids array, so contexts cannot "
                         f"be shown: sae-browse needs a store harvested from text (sae-harvest), or one written "
                         f"with write_store(..., token_ids=...)")


def _text_order(g, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `n` rows of a store's text: (scan position of each store row to read, -1 for rows beyond the
    scan; token_ids [n] and seq_index [n] in text order). A store in text order reads its first n rows; one
    with a shuffled row_order reads whole shards and sorts them by (seq_index, position): with
    "shuffled_in_shard" that is the text's first n rows, with "shuffled_global" the first shards' sequences
    (spread over the whole text by the harvest's permutation), each whole and in text order."""
    from sae_dist.store.layout import chunk_grid

    tok_all, has_seq = g["token_ids"], "seq_index" in g
    if dict(g.attrs).get("row_order", "text") == "text" or not has_seq or "position" not in g:
        seq = np.asarray(g["seq_index"][:n]) if has_seq else np.zeros(n, np.int64)
        return np.arange(n), np.asarray(tok_all[:n], dtype=np.int64), seq
    shard = chunk_grid(g["activations"])[1]
    n_read = min(int(g["activations"].shape[0]), -(-n // shard) * shard)
    seq, pos = np.asarray(g["seq_index"][:n_read]), np.asarray(g["position"][:n_read])
    order = np.lexsort((pos, seq))
    rank = np.empty(n_read, np.int64)
    rank[order] = np.arange(n_read)
    tok = np.asarray(tok_all[:n_read], dtype=np.int64)[order[:n]]
    return np.where(rank < n, rank, -1), tok, seq[order[:n]]


@torch.no_grad()
def scan_store(sae, store_path, *, tokens: int, batch_tokens: int = 4096, device: str = "cpu",
               progress: bool = True) -> ScanResult:
    """Encode the first `tokens` rows of an activation store's text with `sae` and keep every firing.

    sae: an exported SAE (`sae_dist.load_sae`; raw activations in). store_path: a store with
    token_ids (seq_index optional: without it the scan is treated as one sequence). A store whose rows are
    shuffled (row_order "shuffled_in_shard" or "shuffled_global") is read by whole shards and put in text
    order (by seq_index, position): with "shuffled_global" the scan covers the first shards' sequences, a
    sample of the whole text, rather than its beginning.
    Returns a ScanResult. ValueError when the store's d_in != the SAE's d_in (naming both) or the
    store has no token_ids (contexts cannot be shown).
    """
    from tqdm.auto import tqdm

    from sae_dist.store import open_store

    g = open_store(store_path)
    _check_store(g, store_path, sae)
    acts = g["activations"]
    n = min(int(tokens), int(acts.shape[0]))
    scan_pos, tok, seq = _text_order(g, n)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    seq_start = np.r_[starts, n].astype(np.int64)
    rows_l, lat_l, val_l = [], [], []
    sparse = hasattr(sae, "encode_sparse")
    bar = tqdm(total=len(scan_pos), desc="encode", unit="tok", disable=not progress)
    for i in range(0, len(scan_pos), batch_tokens):
        j = min(len(scan_pos), i + batch_tokens)
        x = torch.from_numpy(np.asarray(acts[i:j]).astype(np.float32)).to(device)
        where = torch.from_numpy(scan_pos[i:j]).to(device)  # scan position of each row, -1: not scanned
        if sparse:
            v, idx = sae.encode_sparse(x)
            r = where.unsqueeze(1).expand_as(idx)
            keep = (v > 0) & (r >= 0)
            rows_l.append(r[keep].cpu().numpy())
            lat_l.append(idx[keep].cpu().numpy())
            val_l.append(v[keep].float().cpu().numpy())
        else:
            z = sae.encode(x)
            r, c = torch.nonzero((z > 0) & (where >= 0).unsqueeze(1), as_tuple=True)
            rows_l.append(where[r].cpu().numpy())
            lat_l.append(c.cpu().numpy())
            val_l.append(z[r, c].float().cpu().numpy())
        bar.update(j - i)
    bar.close()
    rows = np.concatenate(rows_l).astype(np.int64) if rows_l else np.zeros(0, np.int64)
    lats = np.concatenate(lat_l).astype(np.int64) if lat_l else np.zeros(0, np.int64)
    vals = np.concatenate(val_l).astype(np.float32) if val_l else np.zeros(0, np.float32)
    order = np.lexsort((rows, lats))
    return ScanResult(n_tokens=n, token_ids=tok, seq_start=seq_start, rows=rows[order], latents=lats[order],
                      values=vals[order], d_sae=int(sae.d_sae))


# ----------------------------------------------------------------------------------------------
# logit effects


def final_norm_weight(lm) -> torch.Tensor | None:
    """The gain vector [d_model] of the LM's final norm (Llama/Mistral/Qwen `model.norm`, GPT-2 `ln_f`,
    GPT-NeoX `final_layer_norm`, OPT `final_layer_norm`), or None if not found."""
    base = getattr(lm, "base_model", lm)
    for path in ("norm", "final_layernorm", "final_layer_norm", "ln_f", "decoder.final_layer_norm"):
        m = base
        for part in path.split("."):
            m = getattr(m, part, None)
        w = getattr(m, "weight", None) if m is not None else None
        if isinstance(w, torch.Tensor) and w.ndim == 1:
            return w.detach()
    return None


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, k: int, norm_weight: torch.Tensor | None = None,
                  chunk: int = 256):
    """Top / bottom direct logit effects of decoder rows (the "logit lens" of a latent).

    W_dec: [L, d_model] decoder rows of the latents; W_U: [V, d_model] unembedding (LM head weight);
    norm_weight: optional [d_model] final-norm gain, applied as W_dec * norm_weight (the norm's scale
    on a direction; its per-token 1/rms factor is positive and does not change the ranking).
    Returns (top_vals [L, k], top_ids [L, k] int64, bot_vals [L, k], bot_ids [L, k]) float32 / int64
    on the CPU: the k largest and k smallest entries of (W_dec * g) @ W_U^T, in order.
    """
    k = min(int(k), int(W_U.shape[0]))
    W_U = W_U.float()
    outs = ([], [], [], [])
    for i in range(0, W_dec.shape[0], chunk):
        d = W_dec[i:i + chunk].float().to(W_U.device)
        if norm_weight is not None:
            d = d * norm_weight.float().to(W_U.device)
        e = d @ W_U.T
        tv, ti = e.topk(k, dim=-1)
        bv, bi = e.topk(k, dim=-1, largest=False)
        for lst, t in zip(outs, (tv, ti, bv, bi), strict=True):
            lst.append(t.cpu())
    if not outs[0]:
        z = torch.zeros(0, k)
        return z, z.long(), z, z.long()
    return tuple(torch.cat(x) for x in outs)


# ----------------------------------------------------------------------------------------------
# HTML helpers


class _Decoder:
    """Token id -> display text (cached); newlines / tabs shown as visible symbols."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def raw(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            if self.tok is None:
                s = f"<{i}>"
            else:
                try:
                    s = self.tok.decode([i])
                except Exception:
                    s = f"<{i}>"
            self.cache[i] = s
        return self.cache[i]

    def show(self, i: int, visible_spaces: bool = False) -> str:
        """Display text; visible_spaces: a token made only of spaces is shown as middle dots."""
        s = self.raw(i)
        s = s.replace("\r", "\u21b5").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"
        if visible_spaces and s.strip(" ") == "":
            s = "\u00b7" * len(s)
        return s


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v, spec=".3f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64 [bins], edges float64 [bins + 1]) of the finite `values` over `bins` equal bins from their
    min to their max (the max counted in the last bin; a single value v: the range v - 0.5 .. v + 0.5), as the
    pages' histograms and the Neuronpedia export show them. ValueError when no value is finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("histogram of no finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.histogram(v, bins=bins, range=(lo, hi))


def _hist_svg(values: np.ndarray, bins: int, *, title: str, xlabel: str, log_x: bool = False,
              highlight: float | None = None, width: int = 420, height: int = 150) -> str:
    """Inline SVG bar histogram (class "hist") of `values`; highlight: x value whose bin is darker."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    pad_l, pad_b, pad_t = 34, 26, 16
    w, h = width - pad_l - 6, height - pad_b - pad_t
    parts = [f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{_esc(title)}</title>',
             f'<text x="{pad_l}" y="11">{_esc(title)}</text>']
    if v.size == 0:
        parts.append(f'<text x="{pad_l}" y="{pad_t + h / 2}">no data</text></svg>')
        return "".join(parts)
    counts, edges = histogram(v, bins)
    lo, hi = float(edges[0]), float(edges[-1])
    cmax = max(1, int(counts.max()))
    bw = w / bins
    hl_bin = None
    if highlight is not None and np.isfinite(highlight):
        hl_bin = int(min(bins - 1, max(0, np.searchsorted(edges, highlight, side="right") - 1)))
    for b, c in enumerate(counts):
        bh = h * c / cmax
        cls = "bar hl" if b == hl_bin else "bar"
        lab = (f"10^{edges[b]:.2f}..10^{edges[b + 1]:.2f}" if log_x else f"{edges[b]:.3g}..{edges[b + 1]:.3g}")
        parts.append(f'<rect class="{cls}" x="{pad_l + b * bw:.1f}" y="{pad_t + h - bh:.1f}" '
                     f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"><title>{_esc(lab)}: {int(c)}</title></rect>')
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#999"/>')
    parts.append(f'<text x="2" y="{pad_t + 8}">{cmax}</text><text x="2" y="{pad_t + h}">0</text>')
    fl = (lambda x: f"1e{x:.1f}") if log_x else (lambda x: f"{x:.3g}")
    parts.append(f'<text x="{pad_l}" y="{height - 12}">{_esc(fl(lo))}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{height - 12}" text-anchor="end">{_esc(fl(hi))}</text>')
    parts.append(f'<text x="{pad_l + w / 2}" y="{height - 2}" text-anchor="middle">{_esc(xlabel)}</text></svg>')
    return "".join(parts)


def _page(title: str, body: str, css: str = "style.css", js: str | None = None) -> str:
    script = f'<script src="{js}"></script>' if js else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="stylesheet" href="{css}"></head><body>\n{body}\n{script}</body></html>\n')


def latent_acts(lat_rows: np.ndarray, lat_vals: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A latent's activation [len(rows)] float32 at scan `rows`, given where it fires: `lat_rows` int64 (sorted)
    and `lat_vals` (a `ScanResult.latent_slice` of rows / values); 0 where it does not fire."""
    pos = np.searchsorted(lat_rows, rows)
    pos_c = np.minimum(pos, max(len(lat_rows) - 1, 0))
    hit = (pos < len(lat_rows)) & (lat_rows[pos_c] == rows) if len(lat_rows) else np.zeros(len(rows), bool)
    return np.where(hit, lat_vals[pos_c] if len(lat_vals) else 0.0, 0.0).astype(np.float32)


def _ctx_html(scan: ScanResult, dec: _Decoder, row: int, lat_rows: np.ndarray, lat_vals: np.ndarray,
              vmax: float, before: int, after: int) -> str:
    """One context line: tokens of the window around `row` within its sequence, highlighted."""
    s = int(scan.seq_of(np.asarray([row]))[0])
    a, b = max(int(scan.seq_start[s]), row - before), min(int(scan.seq_start[s + 1]), row + after + 1)
    rng = np.arange(a, b)
    acts = latent_acts(lat_rows, lat_vals, rng)
    spans = []
    for r, v in zip(rng, acts, strict=True):
        t = dec.show(scan.token_ids[r], visible_spaces=v > 0)
        cls = "tok"
        style = ""
        if v > 0:
            alpha = 0.12 + 0.78 * min(1.0, v / vmax) if vmax > 0 else 0.9
            style = f' style="background-color: rgba(240, 120, 30, {alpha:.2f})"'
            cls += " act"
        if r == row:
            cls += " max"
        spans.append(f'<span class="{cls}"{style} title="{_esc(repr(dec.raw(scan.token_ids[r])))}: '
                     f'{v:.4g}" data-act="{v:.6g}">{_esc(t)}</span>')
    val = float(acts[row - a])
    k = row - a  # the example token starts the right half (key-word-in-context layout)
    return (f'<div class="ctx"><span class="a">{val:.3g}</span><span class="l"><span class="in">'
            f'{"".join(spans[:k])}</span></span><span class="r">{"".join(spans[k:])}</span></div>')


def _ngram_html(g: Sequence[int], dec: _Decoder) -> str:
    from sae_dist.eval.n2g import WILDCARD

    return "".join('<span class="chip wild">*</span>' if t == WILDCARD else
                   f'<span class="chip">{_esc(dec.show(t, visible_spaces=True))}</span>' for t in g)


# ----------------------------------------------------------------------------------------------
# main entry


def _select_latents(density: np.ndarray, opts: BrowseOptions) -> list[int]:
    d_sae = len(density)
    alive = np.flatnonzero(density > 0)
    bad = [i for i in opts.latent_ids if not (0 <= int(i) < d_sae)]
    if bad:
        raise ValueError(f"browse.latent_ids={list(opts.latent_ids)}: {bad} outside [0, {d_sae}) (d_sae={d_sae})")
    by_density = alive[np.argsort(-density[alive], kind="stable")]
    chosen = set(int(i) for i in by_density[: opts.latents_top])
    rest = np.array(sorted(set(alive.tolist()) - chosen), np.int64)
    rng = np.random.default_rng(opts.seed)
    if len(rest) and opts.latents_random:
        chosen |= set(int(i) for i in rng.choice(rest, size=min(len(rest), opts.latents_random), replace=False))
    chosen |= set(int(i) for i in opts.latent_ids)
    return sorted(chosen)


def _n2g(scan: ScanResult, sel: list[int], opts: BrowseOptions, decode: Callable[[int], str], progress: bool):
    """Explanations + held-out scores for the selected latents (contexts = the stored sequences)."""
    from tqdm.auto import tqdm

    from sae_dist.eval.n2g import fit_n2g, score_n2g

    n_seq = len(scan.seq_start) - 1
    lens = np.diff(scan.seq_start)
    T = int(lens.max()) if n_seq else 0
    if n_seq < 2:
        return {}, {}
    tok = np.full((n_seq, T), -1, np.int64)
    seq_of_row = np.repeat(np.arange(n_seq), lens)
    off = np.arange(scan.n_tokens) - scan.seq_start[seq_of_row]
    tok[seq_of_row, off] = scan.token_ids
    n_ho = max(1, int(math.ceil(opts.n2g_heldout_fraction * n_seq)))
    n_fit = n_seq - n_ho
    expl, scores = {}, {}
    chunk = 64
    for c0 in tqdm(range(0, len(sel), chunk), desc="n2g", unit="chunk", disable=not progress):
        ids = sel[c0:c0 + chunk]
        acts = np.zeros((n_seq, T, len(ids)), np.float32)
        for j, i in enumerate(ids):
            sl = scan.latent_slice(i)
            r = scan.rows[sl]
            acts[seq_of_row[r], off[r], j] = scan.values[sl]
        ex = fit_n2g(tok[:n_fit], acts[:n_fit], latent_ids=ids, max_n=opts.n2g_max_n, n_top=opts.n2g_top,
                     fire_frac=float(opts.n2g_fire_frac), min_precision=float(opts.n2g_min_precision),
                     min_count=opts.n2g_min_count, decode=decode)
        sc = score_n2g(ex, tok[n_fit:], acts[n_fit:])
        for e, s in zip(ex, sc, strict=True):
            expl[e.latent], scores[e.latent] = e, s
    return expl, scores


def build_browser(sae, store_path, out_dir, *, tokenizer=None, lm=None, opts: BrowseOptions | None = None,
                  device: str = "cpu", progress: bool = True, sae_info: dict | None = None,
                  store_info: dict | None = None) -> dict:
    """Write the static feature browser of `sae` over the store at `store_path` into `out_dir`.

    sae: exported SAE (`sae_dist.load_sae`, on `device`). tokenizer: decodes token ids (None: ids are
    shown). lm: the causal LM for logit effects (its output embedding [V, d_model] and final norm);
    None: no logit tables. opts: BrowseOptions. sae_info / store_info: shown in the page header.
    Returns the summary dict also written to out_dir/browser.json (n2g_precision / n2g_recall /
    n2g_f1 / n2g_latents over the written latents, counts, timings).
    Raises ValueError (bad option; store d_in != SAE d_in; store without token_ids).
    """
    from sae_dist.eval.n2g import summarize_scores

    opts = opts or BrowseOptions()
    opts.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    scan = scan_store(sae, store_path, tokens=opts.tokens, batch_tokens=opts.batch_tokens, device=device,
                      progress=progress)
    t_scan = time.perf_counter() - t0
    fires = np.bincount(scan.latents, minlength=scan.d_sae)
    density = fires / max(1, scan.n_tokens)
    sel = _select_latents(density, opts)
    dec = _Decoder(tokenizer)

    expl, scores = _n2g(scan, sel, opts, dec.show, progress)
    t_n2g = time.perf_counter() - t0 - t_scan

    logits = _logit_tables(sae, lm, sel, opts)
    sae_info = dict(sae_info or {})
    store_info = dict(store_info or {})
    records, examples = _write_latent_pages(out, scan, sel, fires, density, expl, scores, logits, dec, opts,
                                            sae_info, progress)
    np_files = _write_neuronpedia(out, scan, records, examples, dec, opts, sae_info, store_info)
    summary = {
        "sae": sae_info, "store": store_info, "tokens_scanned": scan.n_tokens, "d_sae": scan.d_sae,
        "alive": int((fires > 0).sum()), "dead_in_scan": int((fires == 0).sum()),
        "latents_written": len(sel), **summarize_scores([scores[i] for i in sel if i in scores]),
        "seconds": {"scan": t_scan, "n2g": t_n2g, "total": time.perf_counter() - t0},
        "options": asdict(opts), "neuronpedia_files": np_files,
    }
    (out / "style.css").write_text(STYLE_CSS, encoding="utf-8")
    (out / "browser.js").write_text(BROWSER_JS, encoding="utf-8")
    (out / "index.html").write_text(_page("SAE feature browser", _index_body(summary, records, density, dec)),
                                    encoding="utf-8")
    summary["seconds"]["total"] = time.perf_counter() - t0
    (out / "browser.json").write_text(json.dumps({**summary, "latents": records}, indent=1, default=str))
    return summary


def _write_neuronpedia(out: Path, scan: ScanResult, records: list[dict], examples: list, dec: _Decoder,
                       opts: BrowseOptions, sae_info: dict, store_info: dict) -> list[str]:
    """With opts.neuronpedia, out/neuronpedia/batch-<n>.json of the written latents (their `records` and the
    pages' (top rows, random rows) `examples`, in `sel` order); returns those paths relative to `out`. None
    (a notice on stderr) when the hook names no block, which Neuronpedia's `layer` needs."""
    if not opts.neuronpedia:
        return []
    from sae_dist.browse.neuronpedia import NEURONPEDIA_DIR, neuronpedia_feature, write_neuronpedia
    from sae_dist.sae.sae_files import hook_layer

    hook = sae_info.get("hook_name") or store_info.get("hook_name")
    if hook_layer(hook) is None:  # Neuronpedia files a dashboard under a block; a wrong layer 0 would mislead
        print(f"sae-browse: Neuronpedia files not written: hook_name={hook!r} names no block "
              "(blocks.<L>.<hook>)", file=sys.stderr)
        return []
    features = []
    for rec, (top_rows, rnd) in zip(records, examples, strict=True):
        sl = scan.latent_slice(rec["latent"])
        features.append(neuronpedia_feature(rec, scan, scan.rows[sl], scan.values[sl], top_rows, rnd, dec.raw,
                                            opts.hist_bins, store_info.get("dataset")))
    paths = write_neuronpedia(out / NEURONPEDIA_DIR, features, model_id=store_info.get("model") or
                              sae_info.get("model_name"), layer=hook_layer(hook), sae_set=opts.neuronpedia_sae_set)
    return [str(p.relative_to(out)) for p in paths]


def _logit_tables(sae, lm, sel: list[int], opts: BrowseOptions):
    """`logit_effects` of the selected latents' decoder rows through `lm`'s unembedding (and its final norm
    weight when opts.logit_through_norm), or None without an LM or a selection."""
    if lm is None or not sel:
        return None
    W_U = lm.get_output_embeddings().weight.detach()
    g = final_norm_weight(lm) if opts.logit_through_norm else None
    W_dec = sae.W_dec.detach()[torch.as_tensor(sel, device=sae.W_dec.device)]
    return logit_effects(W_dec.to(W_U.device), W_U, opts.logit_k, g)


def _context_rows(scan: ScanResult, lr: np.ndarray, lv: np.ndarray, opts: BrowseOptions,
                  rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """(top rows, random rows) shown for a latent firing at scan rows `lr` with values `lv` (sorted by row):
    the top opts.top_contexts rows by value, one per sequence; then up to opts.random_contexts other firing
    rows drawn with `rng`, sorted by decreasing value."""
    order = np.argsort(-lv, kind="stable")
    seqs = scan.seq_of(lr[order])
    _, first = np.unique(seqs, return_index=True)
    top_rows = lr[order[np.sort(first)][: opts.top_contexts]]
    others = np.setdiff1d(lr, top_rows)
    rnd = rng.choice(others, size=min(len(others), opts.random_contexts), replace=False) if len(others) else []
    rnd = sorted(rnd, key=lambda r: -float(lv[np.searchsorted(lr, r)]))
    return top_rows, rnd


def _latent_record(i: int, fires: np.ndarray, density: np.ndarray, lv: np.ndarray, e, s, logits,
                   pos_in_sel: int) -> dict:
    """browser.json's record of latent `i` (values `lv` where it fires; N2G explanation `e` and score `s`, or
    None; `logits` from `_logit_tables`, row pos_in_sel, or None)."""
    rec = {"latent": i, "density": float(density[i]), "fires": int(fires[i]),
           "max_act": float(lv.max()) if len(lv) else 0.0,
           "mean_act": float(lv.mean()) if len(lv) else 0.0,
           "n2g": e.to_dict() if e else None,
           "n2g_precision": s.precision if s and s.scored else None,
           "n2g_recall": s.recall if s and s.scored else None,
           "n2g_f1": s.f1 if s and s.scored else None}
    if logits is not None:
        tv, ti, bv, bi = (x[pos_in_sel] for x in logits)
        rec["logits_pos"] = [(int(a), float(b)) for a, b in zip(ti, tv, strict=True)]
        rec["logits_neg"] = [(int(a), float(b)) for a, b in zip(bi, bv, strict=True)]
    return rec


def _write_latent_pages(out: Path, scan: ScanResult, sel: list[int], fires, density, expl, scores, logits,
                        dec: _Decoder, opts: BrowseOptions, sae_info: dict,
                        progress: bool) -> tuple[list[dict], list]:
    """Write out/latents/<i>.html for every selected latent (linked to its neighbours in `sel`); returns their
    records (`_latent_record`) and their examples (top rows, random rows; `_context_rows`), both in `sel` order.
    The random contexts are drawn from one generator seeded opts.seed + 1, latent after latent."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(opts.seed + 1)
    records, examples = [], []
    for pos_in_sel, i in enumerate(tqdm(sel, desc="pages", unit="latent", disable=not progress)):
        sl = scan.latent_slice(i)
        lr, lv = scan.rows[sl], scan.values[sl]
        top_rows, rnd = _context_rows(scan, lr, lv, opts, rng)
        e, s = expl.get(i), scores.get(i)
        rec = _latent_record(i, fires, density, lv, e, s, logits, pos_in_sel)
        records.append(rec)
        examples.append((top_rows, rnd))
        prev_i = sel[pos_in_sel - 1] if pos_in_sel > 0 else None
        next_i = sel[pos_in_sel + 1] if pos_in_sel + 1 < len(sel) else None
        body = _latent_body(rec, e, s, scan, dec, lr, lv, top_rows, rnd, opts, prev_i, next_i, sae_info)
        (out / "latents" / f"{i}.html").write_text(_page(f"latent {i}", body, css="../style.css"), encoding="utf-8")
    return records, examples


# ----------------------------------------------------------------------------------------------
# page bodies


def _cards(items) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>' for k, v in items
    ) + "</div>"


def _index_body(summary: dict, records: list[dict], density: np.ndarray, dec: _Decoder) -> str:
    sae, store = summary["sae"], summary["store"]
    title = f"{sae.get('architecture', 'SAE')} SAE, d_sae={summary['d_sae']:,}"
    meta = " &middot; ".join(f"{_esc(k)} <b>{_esc(v)}</b>" for k, v in (
        ("model", store.get("model") or sae.get("model_name")),
        ("hook", sae.get("hook_name") or store.get("hook_name")),
        ("d_in", sae.get("d_in")), ("k", sae.get("k")), ("SAE", sae.get("path")), ("store", store.get("path")),
    ) if v is not None)
    cards = _cards([
        ("tokens scanned", f"{summary['tokens_scanned']:,}"),
        ("alive latents", f"{summary['alive']:,}"),
        ("no fire in scan", f"{summary['dead_in_scan']:,}"),
        ("latents written", f"{summary['latents_written']:,}"),
        ("N2G precision", _fmt(summary.get("n2g_precision"))),
        ("N2G recall", _fmt(summary.get("n2g_recall"))),
        ("N2G F1", _fmt(summary.get("n2g_f1"))),
    ])
    alive = density[density > 0]
    hist = _hist_svg(np.log10(alive), 40, title=f"latent density, {len(alive):,} alive latents",
                     xlabel="log10 (fraction of tokens where the latent fires)", log_x=True, width=620, height=170)
    head = ('<thead><tr><th data-key="latent">latent</th><th data-key="density">density</th>'
            '<th data-key="maxact">max act</th><th data-key="f1">N2G F1</th><th data-key="precision">precision</th>'
            '<th data-key="recall">recall</th><th>N2G explanation</th><th>top logits</th></tr></thead>')
    rows = []
    for r in records:
        e = r["n2g"]
        if e and e["ngrams"]:
            expl = '<span class="sep">|</span>'.join(_ngram_html(g, dec) for g in e["ngrams"][:6])
            if len(e["ngrams"]) > 6:
                expl += f' <span class="muted">+{len(e["ngrams"]) - 6}</span>'
        else:
            expl = '<span class="muted">none</span>'
        lg = " ".join(f'<span class="chip">{_esc(dec.show(t, visible_spaces=True))}</span>'
                      for t, _ in r.get("logits_pos", [])[:3])

        def num(v):
            return "nan" if v is None else f"{v:.6g}"

        rows.append(
            f'<tr data-latent="{r["latent"]}" data-density="{num(r["density"])}" data-maxact="{num(r["max_act"])}" '
            f'data-f1="{num(r["n2g_f1"])}" data-precision="{num(r["n2g_precision"])}" '
            f'data-recall="{num(r["n2g_recall"])}"><td><a href="latents/{r["latent"]}.html">{r["latent"]}</a></td>'
            f'<td class="num">{r["density"] * 100:.3f}%</td><td class="num">{r["max_act"]:.3g}</td>'
            f'<td class="num">{_fmt(r["n2g_f1"], ".2f")}</td><td class="num">{_fmt(r["n2g_precision"], ".2f")}</td>'
            f'<td class="num">{_fmt(r["n2g_recall"], ".2f")}</td><td class="expl">{expl}</td>'
            f'<td class="lg">{lg}</td></tr>')
    return (f'<h1>{_esc(title)}</h1><div class="meta">{meta}</div>{cards}'
            f'<div class="row">{hist}<div class="muted" style="max-width:520px;margin-top:14px">'
            f'Density: fraction of the {summary["tokens_scanned"]:,} scanned tokens on which a latent fires. '
            f'N2G (Gao et al. 2024, sec. 4.4): n-gram explanations fitted on the first sequences of the scan, '
            f'precision / recall of "fires" on the held-out last sequences; means over written latents that '
            f'fire there. Click a column header to sort (or open <code>index.html#sort=f1&amp;dir=desc</code>).'
            f'</div></div><h2>Latents</h2><table class="index" id="latents">{head}<tbody>{"".join(rows)}'
            f'</tbody></table>'
            '<script src="browser.js"></script>')


def _latent_body(rec, e, s, scan, dec, lr, lv, top_rows, rnd, opts, prev_i, next_i, sae_info) -> str:
    i = rec["latent"]
    nav = ['<a href="../index.html">index</a>']
    if prev_i is not None:
        nav.insert(0, f'<a href="{prev_i}.html">&larr; {prev_i}</a>')
    if next_i is not None:
        nav.append(f'<a href="{next_i}.html">{next_i} &rarr;</a>')
    cards = _cards([
        ("density", f"{rec['density'] * 100:.4f}%"), ("fires in scan", f"{rec['fires']:,}"),
        ("max activation", f"{rec['max_act']:.4g}"), ("mean when firing", f"{rec['mean_act']:.4g}"),
        ("N2G precision", _fmt(rec["n2g_precision"], ".2f")), ("N2G recall", _fmt(rec["n2g_recall"], ".2f")),
        ("N2G F1", _fmt(rec["n2g_f1"], ".2f")),
    ])
    # N2G
    if e is not None and e.ngrams:
        grams = "".join(f'<div class="ngram">{_ngram_html(g, dec)} <span class="muted">fit precision '
                        f'{p:.2f}, {n} matches</span></div>'
                        for g, p, n in zip(e.ngrams, e.ngram_precision, e.ngram_support, strict=True))
    else:
        grams = '<div class="muted">no n-gram passed (the latent is not explained by a short token pattern)</div>'
    if s is not None and s.scored:
        sc = (f'held out: precision <b>{s.precision:.3f}</b>, recall <b>{s.recall:.3f}</b>, F1 <b>{s.f1:.3f}</b> '
              f'(TP {s.tp}, FP {s.fp}, FN {s.fn})')
    else:
        sc = "not scored (the latent does not fire in the held-out sequences)"
    n2g = (f'<div id="n2g"><h2>N2G explanation</h2>{grams}<div class="muted" style="margin-top:4px">{sc}; '
           f'fires = activation &gt; {e.threshold if e else 0:.3g}</div></div>')
    # logits
    if "logits_pos" in rec:
        def rows(items, cls):
            return "".join(f'<tr data-token-id="{t}"><td><span class="chip">'
                           f'{_esc(dec.show(t, visible_spaces=True))}</span></td>'
                           f'<td class="v {cls}">{v:+.3f}</td></tr>' for t, v in items)
        lg = ('<div><h2>Logit effects</h2><div class="row">'
              '<table class="logits" id="logits-pos"><tr><th>top positive</th><th></th></tr>'
              f'{rows(rec["logits_pos"], "pos")}</table>'
              '<table class="logits" id="logits-neg"><tr><th>top negative</th><th></th></tr>'
              f'{rows(rec["logits_neg"], "neg")}</table>'
              '</div><div class="muted">W_dec[i] &middot; W_U<sup>T</sup>'
              f'{" through the final norm weight" if opts.logit_through_norm else ""}</div></div>')
    else:
        lg = '<div><h2>Logit effects</h2><div class="muted">no LM given</div></div>'
    hist = _hist_svg(lv, opts.hist_bins, title=f"activations when firing ({rec['fires']:,} tokens)",
                     xlabel="activation")
    vmax = rec["max_act"]
    top = "".join(_ctx_html(scan, dec, int(r), lr, lv, vmax, opts.window_before, opts.window_after) for r in top_rows)
    rnd_html = "".join(_ctx_html(scan, dec, int(r), lr, lv, vmax, opts.window_before, opts.window_after) for r in rnd)
    return (f'<div class="nav">{" &middot; ".join(nav)}</div><h1>Latent {i}</h1>'
            f'<div class="meta">{_esc(sae_info.get("hook_name", ""))} &middot; '
            f'{_esc(sae_info.get("model_name", ""))}</div>'
            f'{cards}<div class="row"><div>{n2g}<div id="hist"><h2>Activation histogram</h2>{hist}</div></div>'
            f'{lg}</div>'
            f'<h2>Top activations</h2><div id="top">{top}</div>'
            f'<h2>Random activating examples</h2><div id="random">{rnd_html or "<div class=muted>none</div>"}</div>')
