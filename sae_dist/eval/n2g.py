"""N2G n-gram explanations of SAE latents and their precision / recall on held-out text.

Method: Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section 4.4 (Explainability),
after Foote et al. 2023, "Neuron to Graph" (N2G). An explanation of a latent is a small set of
n-grams of token ids (some positions possibly wildcards); it predicts "the latent fires at token t"
whenever one of its n-grams matches the context ending AT t. It is scored on held-out tokens by
the precision and recall of that binary prediction against the latent actually firing.

The original N2G re-runs the model on truncated / padded contexts to find, for each top-activating
example, the shortest suffix ending at the max-activating token that still makes the latent fire.
Here there is no model in the loop (pure text, so it runs on a stored activation dump), and
"still fires when the rest of the context is removed" is approximated EMPIRICALLY on the fit
tokens:

* the latent "fires" at a token when its activation is > fire_frac * (its max activation on the fit
  tokens); fire_frac = 0 means activation > 0 (every TopK selection).
* for every one of the latent's top `n_top` activating tokens (one per context), candidate
  patterns are the suffixes of lengths n = 1 .. max_n ending at that token, and (if `wildcards`)
  the same suffixes with ONE interior token replaced by a wildcard (`WILDCARD` = -1; the first and
  last tokens are never wildcards: a leading wildcard is the shorter suffix, the last token is the
  one being predicted);
* a pattern's fit precision = (# fit tokens where it matches AND the latent fires) /
  (# fit tokens where it matches), its support = # matches; it "still fires without the rest of
  the context" when precision >= min_precision and support >= min_count;
* per top example the SHORTEST passing n is taken; among passing patterns of that length, the
  one explaining the most firing tokens (ties: no wildcard first). Examples with no passing
  pattern up to max_n contribute nothing (the latent may end with an empty explanation);
* the chosen n-grams form a trie (stored as a list of tuples); an n-gram made redundant by a more
  general one already in the set (a suffix of it, or with a wildcard where it has a token) is
  pruned, since the prediction is the union of matches.

Token ids < 0 in the inputs are padding (ragged contexts): they never match and their
activations are ignored, both in fitting and in scoring.

Scoring (`score_n2g`): on held-out contexts, TP / FP / FN of prediction vs firing (firing uses the
absolute threshold fixed at fit time). precision = TP / (TP + FP), defined as 0 when the
explanation never predicts (an empty or never-matching explanation explains nothing); recall =
TP / (TP + FN); F1 = 2PR / (P + R) (0 when P + R = 0). A latent is SCORED when it fires at least
once on the held-out tokens (otherwise recall is undefined). `n2g_metrics` averages over scored
latents and gives the eval.json keys `n2g_precision`, `n2g_recall`, `n2g_f1`, `n2g_latents`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["WILDCARD", "N2GExplanation", "N2GScore", "fit_n2g", "score_n2g", "n2g_metrics",
           "n2g_metrics_from_codes", "summarize_scores", "ngram_matches"]

WILDCARD = -1
_NO_TOKEN = -2  # window positions before the start of a context / padding: never equal to an n-gram entry


# ----------------------------------------------------------------------------------------------
# data classes


@dataclass
class N2GExplanation:
    """N2G explanation of one latent.

    latent: the latent's index in the SAE (d_sae numbering). ngrams: tuples of token ids (ints;
    `WILDCARD` = -1 matches any token), each predicting "fires" at the token where it ends.
    ngram_precision / ngram_support: fit-set precision and number of matches of each n-gram.
    threshold: absolute activation above which the latent counts as firing (fire_frac x max_act;
    0.0 means > 0). max_act: the latent's max activation on the fit tokens; fit_fires: how many fit
    tokens fired; n_examples / n_explained: top examples used / explained by a passing n-gram.
    text: human-readable form (filled when fit with a `decode` function).
    """

    latent: int
    ngrams: list[tuple[int, ...]] = field(default_factory=list)
    ngram_precision: list[float] = field(default_factory=list)
    ngram_support: list[int] = field(default_factory=list)
    threshold: float = 0.0
    max_act: float = 0.0
    fit_fires: int = 0
    n_examples: int = 0
    n_explained: int = 0
    text: str = ""

    def describe(self, decode: Callable[[int], str] | None = None, max_ngrams: int = 8) -> str:
        """Readable explanation, e.g. `"foo" "bar"  |  "x" * "y"`; decode: token id -> text."""
        if not self.ngrams:
            return "(no n-gram explanation)"
        dec = decode or (lambda t: str(t))
        parts = []
        for g in self.ngrams[:max_ngrams]:
            parts.append(" ".join("*" if t == WILDCARD else repr(dec(int(t))) for t in g))
        more = len(self.ngrams) - max_ngrams
        return "  |  ".join(parts) + (f"  |  (+{more} more)" if more > 0 else "")

    def to_dict(self) -> dict:
        """JSON-ready dict (n-grams as lists of ints)."""
        return {"latent": self.latent, "ngrams": [list(g) for g in self.ngrams],
                "ngram_precision": self.ngram_precision, "ngram_support": self.ngram_support,
                "threshold": self.threshold, "max_act": self.max_act, "fit_fires": self.fit_fires,
                "n_examples": self.n_examples, "n_explained": self.n_explained, "text": self.text}


@dataclass
class N2GScore:
    """Held-out score of one explanation: counts of tokens (tp, fp, fn), precision, recall, f1
    (definitions in the module docstring); scored: the latent fired at least once held out."""

    latent: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    scored: bool


# ----------------------------------------------------------------------------------------------
# n-gram windows


def _as_np_tokens(token_ids) -> np.ndarray:
    t = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    if t.ndim != 2:
        raise ValueError(f"token_ids must be 2-D [N_ctx, T], got shape {list(t.shape)}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {t.dtype}")
    return t.astype(np.int64)


def _as_np_acts(acts, shape) -> np.ndarray:
    a = acts.detach().float().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts, np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[:2] != tuple(shape):
        raise ValueError(f"acts must be [N_ctx, T, L] with [N_ctx, T] = {list(shape)} (token_ids' shape), "
                         f"got {list(a.shape)}")
    return a


def _windows(tok: np.ndarray, n: int, wild: int | None) -> np.ndarray:
    """[N_ctx*T, n] int64: the n tokens ending at every position (row-major over [N_ctx, T]);
    positions before the context start or padding -> _NO_TOKEN; column `wild` -> WILDCARD."""
    c, t = tok.shape
    padded = np.full((c, t + n - 1), _NO_TOKEN, np.int64)
    padded[:, n - 1:] = np.where(tok < 0, _NO_TOKEN, tok)
    w = np.stack([padded[:, j: j + t] for j in range(n)], axis=-1).reshape(c * t, n)
    if wild is not None:
        w = w.copy()
        w[:, wild] = np.where((w[:, wild] == _NO_TOKEN), _NO_TOKEN, WILDCARD)
    return w


def _patterns(max_n: int, wildcards: bool) -> list[tuple[int, int | None]]:
    """(n, wildcard column or None) in order of increasing n, plain before wildcarded."""
    out = []
    for n in range(1, max_n + 1):
        out.append((n, None))
        if wildcards:
            out.extend((n, j) for j in range(1, n - 1))
    return out


def _pattern_of(g: Sequence[int]) -> tuple[int, int | None]:
    wild = [j for j, x in enumerate(g) if x == WILDCARD]
    if len(wild) > 1 or (wild and (wild[0] == 0 or wild[0] == len(g) - 1)):
        raise ValueError(f"n-gram {tuple(g)}: at most one wildcard, at an interior position")
    return len(g), (wild[0] if wild else None)


def ngram_matches(token_ids, ngrams: Sequence[Sequence[int]]) -> np.ndarray:
    """Where any of `ngrams` matches the context ending at each token.

    token_ids: int [N_ctx, T] (ids < 0 = padding); ngrams: token-id tuples (`WILDCARD` = -1 at
    most once, at an interior position). Returns bool numpy array [N_ctx, T].
    """
    tok = _as_np_tokens(token_ids)
    out = np.zeros(tok.size, bool)
    by_pat: dict[tuple[int, int | None], list[tuple[int, ...]]] = {}
    for g in ngrams:
        by_pat.setdefault(_pattern_of(g), []).append(tuple(int(x) for x in g))
    for (n, wild), gs in by_pat.items():
        w = _windows(tok, n, wild)
        pat = np.asarray(gs, np.int64).reshape(-1, n)
        _, inv = np.unique(np.concatenate([pat, w]), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        hit = np.zeros(int(inv.max()) + 1, bool)
        hit[inv[: len(gs)]] = True
        out |= hit[inv[len(gs):]]
    return out.reshape(tok.shape)


# ----------------------------------------------------------------------------------------------
# fit


def _generalizes(h: tuple[int, ...], g: tuple[int, ...]) -> bool:
    """True when n-gram h matches wherever g matches (h aligned at the end of g)."""
    if len(h) > len(g) or h == g:
        return False
    # strict=False: h may be shorter than g; only h's positions (aligned at g's end) are compared
    return all(a == WILDCARD or a == b for a, b in zip(h[::-1], g[::-1], strict=False))


def fit_n2g(
    token_ids, acts, *, latent_ids: Sequence[int] | None = None, max_n: int = 4, n_top: int = 20,
    fire_frac: float = 0.0, min_precision: float = 0.5, min_count: int = 3, wildcards: bool = True,
    decode: Callable[[int], str] | None = None,
) -> list[N2GExplanation]:
    """Fit an N2G n-gram explanation per latent (Gao et al. 2024 sec. 4.4; Foote et al. 2023).

    Args:
      token_ids: LongTensor / int array [N_ctx, T]: the fit contexts' token ids (< 0 = padding).
      acts: FloatTensor / float array [N_ctx, T, L] (or [N_ctx, T] for one latent): activations of
        the L latents at every token (any float dtype; read as float32).
      latent_ids: the L latents' indices in the SAE (default 0..L-1), recorded in the explanations.
      max_n: longest n-gram (>= 1). n_top: top-activating examples per latent (>= 1), one per context.
      fire_frac: firing threshold as a fraction of the latent's max fit activation, in [0, 1)
        (0: activation > 0). min_precision in (0, 1]: fit precision an n-gram needs to be kept.
      min_count: fit matches an n-gram needs (>= 1). wildcards: also try one interior wildcard.
      decode: optional token id -> str, used to fill `N2GExplanation.text`.
    Returns: L explanations, in the order of the latents (empty ones for never-firing latents).
    Raises: ValueError for bad shapes or options (naming the option, value and valid range).
    Memory: one [N_ctx*T, n] int64 window array per pattern; acts is converted to one float32 copy.
    """
    _check_fit_options(max_n, n_top, fire_frac, min_precision, min_count)
    tok = _as_np_tokens(token_ids)
    a = _as_np_acts(acts, tok.shape)
    n_lat = a.shape[-1]
    ids = list(range(n_lat)) if latent_ids is None else [int(i) for i in latent_ids]
    if len(ids) != n_lat:
        raise ValueError(f"latent_ids has {len(ids)} entries but acts has L={n_lat} latents")
    valid = (tok >= 0).reshape(-1)
    flat = a.reshape(-1, n_lat)
    groups = _pattern_groups(tok, _patterns(max_n, wildcards))
    out = []
    for j, lat in enumerate(ids):
        col = np.where(valid, flat[:, j], -np.inf)
        out.append(_fit_latent(col, tok, lat, groups, n_top, fire_frac, min_precision, min_count, decode))
    return out


def _check_fit_options(max_n: int, n_top: int, fire_frac: float, min_precision: float, min_count: int) -> None:
    """ValueError naming the first `fit_n2g` option out of range, its value and the valid range."""
    if not (isinstance(max_n, int) and max_n >= 1):
        raise ValueError(f"max_n={max_n!r}; must be an int >= 1")
    if not (isinstance(n_top, int) and n_top >= 1):
        raise ValueError(f"n_top={n_top!r}; must be an int >= 1")
    if not (0.0 <= fire_frac < 1.0):
        raise ValueError(f"fire_frac={fire_frac!r}; must be in [0, 1)")
    if not (0.0 < min_precision <= 1.0):
        raise ValueError(f"min_precision={min_precision!r}; must be in (0, 1]")
    if not (isinstance(min_count, int) and min_count >= 1):
        raise ValueError(f"min_count={min_count!r}; must be an int >= 1")


_Groups = dict[tuple[int, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _pattern_groups(tok: np.ndarray, pats: list[tuple[int, int | None]]) -> _Groups:
    """For every pattern (n, wildcard position), in the order of `pats`: (the [N_ctx*T, n] int64
    windows ending at each position, each position's group id (exact: np.unique over the window
    rows; -1 where the window leaves the context), the int64 count of positions per group id)."""
    groups: _Groups = {}
    for p in pats:
        w = _windows(tok, *p)
        ok = (w != _NO_TOKEN).all(axis=1)
        _, inv = np.unique(w, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        inv = np.where(ok, inv, -1)
        count = np.bincount(inv[ok], minlength=int(inv.max()) + 1)
        groups[p] = (w, inv, count)
    return groups


def _fit_latent(col: np.ndarray, tok: np.ndarray, lat: int, groups: _Groups, n_top: int, fire_frac: float,
                min_precision: float, min_count: int, decode: Callable[[int], str] | None) -> N2GExplanation:
    """One latent's explanation from its float32 activations `col` [N_ctx*T] (-inf at padding): for
    each of its top examples the best n-gram ending there (`_best_ngram`), then the redundant ones
    pruned; its text filled by `decode` when given. An empty explanation (no text) when the latent
    never fires (max activation <= 0)."""
    max_act = float(col.max()) if col.size else 0.0
    if not np.isfinite(max_act) or max_act <= 0:
        return N2GExplanation(latent=lat, max_act=max(0.0, max_act) if np.isfinite(max_act) else 0.0)
    thr = float(fire_frac * max_act)
    fire = col > thr
    fired_pos = np.flatnonzero(fire)
    # top examples: best token per context, then the n_top best contexts
    per_ctx = col.reshape(tok.shape)
    best_t = per_ctx.argmax(axis=1)
    best_v = per_ctx[np.arange(tok.shape[0]), best_t]
    order = np.argsort(-best_v, kind="stable")
    tops = [int(c) * tok.shape[1] + int(best_t[c]) for c in order[:n_top] if best_v[c] > thr]
    chosen: dict[tuple[int, ...], tuple[float, int]] = {}
    n_explained = 0
    fires_cache: dict[tuple[int, int | None], np.ndarray] = {}
    for pos in tops:
        best = _best_ngram(pos, groups, fired_pos, fires_cache, min_precision, min_count)
        if best is not None:
            n_explained += 1
            chosen[best[3]] = (best[4], best[5])
    # prune n-grams made redundant by a more general chosen one; shortest first
    grams = sorted(chosen, key=lambda g: (len(g), g))
    kept = [g for g in grams if not any(_generalizes(h, g) for h in grams)]
    e = N2GExplanation(latent=lat, ngrams=kept, ngram_precision=[chosen[g][0] for g in kept],
                       ngram_support=[chosen[g][1] for g in kept], threshold=thr, max_act=max_act,
                       fit_fires=int(fire.sum()), n_examples=len(tops), n_explained=n_explained)
    if decode is not None:
        e.text = e.describe(decode)
    return e


def _best_ngram(pos: int, groups: _Groups, fired_pos: np.ndarray, fires_cache: dict, min_precision: float,
                min_count: int) -> tuple | None:
    """The best n-gram ending at flat position `pos` among the patterns of `groups` (shortest, then
    most fit fires, then without wildcard) with >= min_count matches and fit precision >=
    min_precision: (n, -fires, has_wild, gram, precision, support), or None. `fires_cache` holds each
    pattern's fire count per group id (filled on first use)."""
    best = None
    for p, (w, inv, count) in groups.items():
        if best is not None and p[0] > best[0]:
            break
        g_id = inv[pos]
        if g_id < 0 or count[g_id] < min_count:
            continue
        if p not in fires_cache:
            fires_cache[p] = np.bincount(inv[fired_pos][inv[fired_pos] >= 0], minlength=len(count))
        nf = int(fires_cache[p][g_id])
        prec = nf / int(count[g_id])
        if prec < min_precision:
            continue
        cand = (p[0], -nf, p[1] is not None, tuple(int(x) for x in w[pos]), prec, int(count[g_id]))
        if best is None or cand[:3] < best[:3]:
            best = cand
    return best


# ----------------------------------------------------------------------------------------------
# score


def score_n2g(explanations: Sequence[N2GExplanation], token_ids_heldout, acts_heldout) -> list[N2GScore]:
    """Held-out precision / recall / F1 of each explanation (Gao et al. 2024 sec. 4.4).

    explanations: from `fit_n2g`, one per column of acts_heldout (same order).
    token_ids_heldout: int [M_ctx, T'] (< 0 = padding); acts_heldout: float [M_ctx, T', L].
    Prediction at token t: some n-gram of the explanation matches the context ending at t.
    Firing: activation > explanation.threshold (fixed at fit time). Returns one N2GScore per latent
    (definitions in the module docstring). ValueError if L != len(explanations) or shapes differ.
    """
    tok = _as_np_tokens(token_ids_heldout)
    a = _as_np_acts(acts_heldout, tok.shape)
    if a.shape[-1] != len(explanations):
        raise ValueError(f"acts_heldout has L={a.shape[-1]} latents but {len(explanations)} explanations were given")
    valid = tok >= 0
    cache: dict[tuple, np.ndarray] = {}
    out = []
    for j, e in enumerate(explanations):
        fire = (a[..., j] > e.threshold) & valid
        key = tuple(e.ngrams)
        if key not in cache:
            cache[key] = ngram_matches(tok, e.ngrams) if e.ngrams else np.zeros(tok.shape, bool)
        pred = cache[key] & valid
        tp = int((pred & fire).sum())
        fp = int((pred & ~fire).sum())
        fn = int((~pred & fire).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out.append(N2GScore(latent=e.latent, tp=tp, fp=fp, fn=fn, precision=prec, recall=rec, f1=f1,
                            scored=tp + fn > 0))
    return out


def summarize_scores(scores: Sequence[N2GScore]) -> dict:
    """eval.json keys from per-latent scores: `n2g_precision`, `n2g_recall`, `n2g_f1` (means over
    scored latents; None when none is scored) and `n2g_latents` (the number of scored latents)."""
    s = [x for x in scores if x.scored]
    if not s:
        return {"n2g_precision": None, "n2g_recall": None, "n2g_f1": None, "n2g_latents": 0}
    return {"n2g_precision": float(np.mean([x.precision for x in s])),
            "n2g_recall": float(np.mean([x.recall for x in s])),
            "n2g_f1": float(np.mean([x.f1 for x in s])),
            "n2g_latents": len(s)}


def n2g_metrics(token_ids, acts, *, heldout_fraction: float = 0.5, latent_ids: Sequence[int] | None = None,
                **fit_kw) -> dict:
    """Fit N2G on the first (1 - heldout_fraction) contexts, score on the rest, summarise.

    token_ids: int [N_ctx, T]; acts: float [N_ctx, T, L] (choose L latents, e.g. a random sample of
    alive ones: the dense array is N_ctx*T*L floats). heldout_fraction in (0, 1); the split is by
    context (whole rows), the held-out contexts being the last ceil(fraction * N_ctx) rows.
    fit_kw: `fit_n2g` options. Returns `summarize_scores` keys: n2g_precision, n2g_recall, n2g_f1,
    n2g_latents. ValueError for a bad fraction or fewer than 2 contexts.
    """
    if not (0.0 < heldout_fraction < 1.0):
        raise ValueError(f"heldout_fraction={heldout_fraction!r}; must be in (0, 1)")
    n = int(token_ids.shape[0])
    n_ho = int(np.ceil(heldout_fraction * n))
    if n < 2 or n_ho >= n:
        raise ValueError(f"n2g_metrics needs at least 2 contexts to split (got N_ctx={n}, "
                         f"heldout_fraction={heldout_fraction})")
    expl = fit_n2g(token_ids[: n - n_ho], acts[: n - n_ho], latent_ids=latent_ids, **fit_kw)
    return summarize_scores(score_n2g(expl, token_ids[n - n_ho:], acts[n - n_ho:]))


def n2g_metrics_from_codes(token_ids, codes, *, n_sampled: int = 64, seed: int = 0,
                           heldout_fraction: float = 0.5, **fit_kw) -> dict:
    """N2G precision / recall (Gao et al. 2024 sec. 4.4) of a random sample of the latents that fire.

    token_ids: int [N_ctx, T]: the contexts whose tokens were encoded, row-major (token row
      c * T + t of `codes` is context c, position t). codes: `sae_dist.eval.metrics.LatentCodes`
      holding those N_ctx * T tokens' non-zero activations. n_sampled: latents drawn (seeded by
      `seed`, without replacement) among those firing at least once in the FIT contexts (the first
      N_ctx - ceil(heldout_fraction * N_ctx)); all of them when fewer fire. fit_kw: `fit_n2g` options.
    Returns `n2g_metrics`' keys plus `n2g_latents_sampled` (sorted latent ids) and `n2g_heldout_contexts`.
    ValueError when codes do not hold N_ctx * T tokens, n_sampled < 1, or the split is impossible.
    """
    tok = _as_np_tokens(token_ids)
    n_ctx, T = tok.shape
    if codes.n_tokens != n_ctx * T:
        raise ValueError(f"codes hold {codes.n_tokens} tokens but token_ids has {n_ctx} x {T} = {n_ctx * T}")
    if int(n_sampled) < 1:
        raise ValueError(f"n_sampled={n_sampled!r}; must be >= 1")
    if not (0.0 < heldout_fraction < 1.0):
        raise ValueError(f"heldout_fraction={heldout_fraction!r}; must be in (0, 1)")
    n_ho = int(np.ceil(heldout_fraction * n_ctx))
    if n_ctx < 2 or n_ho >= n_ctx:
        raise ValueError(f"N2G needs at least 2 contexts to split (got N_ctx={n_ctx}, "
                         f"heldout_fraction={heldout_fraction})")
    rows, lat, val = (t.numpy() for t in codes.tensors())
    fit_rows = rows < (n_ctx - n_ho) * T
    alive = np.unique(lat[fit_rows])
    rng = np.random.default_rng(int(seed))
    sel = np.sort(rng.choice(alive, size=min(int(n_sampled), len(alive)), replace=False)) if len(alive) else alive
    out_extra = {"n2g_latents_sampled": [int(i) for i in sel], "n2g_heldout_contexts": n_ho}
    if not len(sel):
        return {**summarize_scores([]), **out_extra}
    col = np.full(codes.d_sae, -1, np.int64)
    col[sel] = np.arange(len(sel))
    keep = col[lat] >= 0
    acts = np.zeros((n_ctx * T, len(sel)), np.float32)
    acts[rows[keep], col[lat[keep]]] = val[keep]
    res = n2g_metrics(tok, acts.reshape(n_ctx, T, len(sel)), heldout_fraction=heldout_fraction,
                      latent_ids=[int(i) for i in sel], **fit_kw)
    return {**res, **out_extra}
