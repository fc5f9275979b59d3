"""Tree-structured sparse autoencoder (`sae=tree`): a TopK SAE (Gao et al. 2024) whose latents carry a
parent map (a forest), with a loss that asks a child latent to fire only where its parent fires.

Why. Features of LM activations are hierarchical ("dog" implies "animal"); a flat SAE trained for
sparsity then tends to absorb the parent into its children or split features (Chanin et al. 2024,
"A is for Absorption: Studying Feature Splitting and Absorption in Sparse Autoencoders",
arXiv:2409.14507; Bricken et al. 2023, "Towards Monosemanticity", feature splitting). Hierarchical
SAEs make the hierarchy explicit: in H-SAE (Muchane, Richardson, Park, Veitch 2025, "Incorporating
Hierarchical Semantics in Sparse Autoencoder Architectures", arXiv:2506.01197) a child latent lives in
a sub-autoencoder that is only evaluated where its parent is active; the "activation coverage"
condition of later tree SAEs (Nhat et al. 2026, "Tree SAE", arXiv:2605.07922, section 1) states the
same: a child should activate only when its parent does. In hierarchical sparse coding (Jenatton,
Mairal, Obozinski, Bach 2011, "Proximal Methods for Hierarchical Sparse Coding", JMLR 12, section 1
and 2) the tree-structured norm sum_g ||z_g|| over the groups g = {node and its descendants} selects
supports that are rooted subtrees: a node may be non-zero only if its ancestors are.

What. With z = TopK(W_enc^T (x - b_dec) + b_enc) (ReLU on the kept values) and a forest
`parents` [d_sae] (parent index, -1 for a root), the tree loss of a batch is the fraction of the
code's L1 mass that sits on latents whose parent is silent:

    L_tree = sum_b sum_{c: pa(c) >= 0} z_bc * 1[z_b,pa(c) = 0]  /  stopgrad(sum_b sum_c z_bc)

    L = NMSE (+ Multi-TopK) + auxk_coef * AuxK + tree_coef * L_tree.

It is zero exactly on codes whose support is closed under "parent of", i.e. a union of rooted paths
(Jenatton et al.'s allowed patterns; H-SAE's gating), and it leaves magnitudes alone where the
parent fires (a hinge on the magnitude, sum ReLU(z_c - z_p), would also force a child below its
parent, which has no reason to hold in activations: a strong "dog" with a weak "animal"). Its
gradient is an L1 push (tree_coef / sum z per unit) on the violating child values only, through the
kept TopK values (the fused encoder's backward on the kernel path). The normaliser makes L_tree a
dimensionless fraction in [0, 1] (logged as train/tree), independent of the activation scale.
It is computed from (values, indices) [B, k] with a per-token sort + searchsorted (O(B k log k), no
[B, d_sae] buffer).

Where the tree comes from (option `parents`):
  * a list of d_sae ints from the config (validated: length, range [-1, d_sae), no self-parent, no
    cycle, depth <= max_depth; ValueError naming the problem), used from the first step; or
  * null: built from co-activation statistics of the SAE's own kept latents. From step
    floor(build_start_frac * n_steps) on, every training step adds its tokens' fired latents
    (value > 0 among the TopK) to: fire counts f[c], and for each latent c a bounded table of its most
    frequent co-firing partners (Misra & Gries 1982, "Finding repeated elements", as a mergeable
    summary, Agarwal et al. 2012, "Mergeable Summaries", section 3: add the batch's exact pair counts,
    then subtract the (m+1)-th largest count of the row and keep the top m). Memory is
    d_sae * (16 m + 24) bytes (m = `partners`), never a d_sae x d_sae matrix; a table that would
    exceed `max_stats_mb` is refused at construction with the fix. The kept counts are LOWER bounds
    of the true counts, short by at most `count_deficit[c]` (the total subtracted from row c; 0 =
    exact, which holds whenever c had at most m distinct partners).
    After `build_tokens` tokens (or at the last training step, so a tree always exists at export),
    each latent c with f[c] >= min_fires gets the parent
        p* = argmax_p P^(p | c) = count(c, p) / f[c]  over partners p with f[p] > f[c]
    (ties: the less frequent p, i.e. the most specific superset, then the lower index), kept if
    P^(p* | c) >= min_cooccurrence, else c is a root. Because a parent fires strictly more often than
    its child, the map is acyclic (a forest); with the lower-bound counts an edge is only made when
    the TRUE P(p | c) >= min_cooccurrence. `max_depth` (optional) cuts deeper nodes into roots.
    Latents that fire equally often are never linked (they are duplicates, not a hierarchy).
    Under data parallelism the fired indices are all-gathered over dp, so every rank builds the
    same tree.
The tree loss acts once a tree exists (`tree_state` > 0).

State: every statistic is a persistent buffer updated in place (`parents`, `tree_state`,
`fire_count`, `partner_idx`, `partner_count`, `count_deficit`, `stat_tokens`, `built_step`), so
checkpoints resume exactly and the EMA copy carries the tree.

Export: cfg.json is the TopK one ("topk", k) plus "tree_file": "tree.json" and "tree_source";
`tree.json` next to the weights holds {"parents": [d_sae ints], "source": "config" |
"co-activation" | "none", ...} (`TreeSAE.tree_dict`); `load_tree` reads and validates it.
Not latent-sharded (tp = 1).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_dist.sae.base import TrainOutput
from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE

__all__ = ["TreeSAE", "TreeOptions", "check_parents", "forest_depths", "limit_depth", "tree_violation_loss",
           "merge_partner_counts_", "build_parents", "load_tree", "TREE_FILENAME", "TREE_SOURCES"]

TREE_FILENAME = "tree.json"
#: tree_state buffer value -> tree.json "source"
TREE_SOURCES = {0: "none", 1: "config", 2: "co-activation"}
#: pair entries (ordered co-firing pairs) aggregated before a merge into the partner table
_PAIR_BLOCK = 1 << 22


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class TreeOptions:
    """Options of `sae=tree` (module docstring for the method).

    parents: list of d_sae ints (parent latent, -1 = root) or None: build from co-activations.
    tree_coef: weight of L_tree (>= 0; 0 = tree built and exported, no loss). Default 0.1.
    build_start_frac: fraction of the training steps after which co-activations are counted, in
      [0, 1). Default 0.5 (the latents have settled by then).
    build_tokens: tokens counted before the tree is built (>= 1). Default 1_000_000.
    min_cooccurrence: minimum P(parent fires | child fires) of an edge, in (0, 1]. Default 0.5.
    min_fires: a latent that fired fewer times than this while counting stays a root (>= 1).
    max_depth: None, or the maximum number of ancestors of a latent (>= 1; 1 = two levels).
    partners: co-firing partners kept per latent (m of the Misra-Gries table, >= 1; capped at
      d_sae - 1). Exact counts for latents with at most m distinct partners. Default 64.
    max_stats_mb: refuse (ValueError) partner tables larger than this many MiB (> 0). Default 1024.
    Raises ValueError naming the option, the bad value and the valid range.
    """

    parents: list | None = None
    tree_coef: float = 0.1
    build_start_frac: float = 0.5
    build_tokens: int = 1_000_000
    min_cooccurrence: float = 0.5
    min_fires: int = 10
    max_depth: int | None = None
    partners: int = 64
    max_stats_mb: float = 1024.0

    def __post_init__(self) -> None:
        def num(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo}, {'inf)' if hi is None else str(hi) + (')' if hi_open else ']')}"
                raise ValueError(f"sae option {name}={v!r}; valid: a number in {rng}")

        num("tree_coef", 0, None)
        num("build_start_frac", 0, 1, hi_open=True)
        num("min_cooccurrence", 0, 1, lo_open=True)
        num("max_stats_mb", 0, None, lo_open=True)
        for name in ("build_tokens", "min_fires", "partners"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"sae option {name}={v!r}; valid: an int >= 1")
        if self.build_tokens >= 2**40:
            raise ValueError(f"sae option build_tokens={self.build_tokens}; valid: an int in [1, 2**40)")
        if self.max_depth is not None and (not _is_int(self.max_depth) or self.max_depth < 1):
            raise ValueError(f"sae option max_depth={self.max_depth!r}; valid: null or an int >= 1")
        if self.parents is not None:
            if isinstance(self.parents, (str, bytes)) or not hasattr(self.parents, "__iter__"):
                raise ValueError(f"sae option parents={self.parents!r}; valid: null or a list of d_sae ints")
            self.parents = list(self.parents)


# ---------------------------------------------------------------------------------------- forests
def _first_cycle(par: list[int], start: int) -> list[int]:
    """The cycle reached from `start` following par (a list with -1 roots)."""
    seen, node, order = {}, start, []
    while node >= 0 and node not in seen:
        seen[node] = len(order)
        order.append(node)
        node = par[node]
    return order[seen[node]:] + [node] if node >= 0 else []


def forest_depths(parents: torch.Tensor) -> torch.Tensor:
    """Number of ancestors of every latent of a parent map [n] int64 (-1 = root) -> int64 [n]
    (roots 0), by pointer jumping (O(n log n)). A latent on or below a cycle gets -1."""
    n = parents.numel()
    sentinel = n
    anc = torch.cat([torch.where(parents < 0, torch.full_like(parents, sentinel), parents),
                     parents.new_full((1,), sentinel)])
    dist = (anc != sentinel).long()
    dist[sentinel] = 0
    for _ in range(max(1, math.ceil(math.log2(n + 1))) + 1):
        dist = dist + dist[anc]
        anc = anc[anc]
    depth = dist[:n]
    return torch.where(anc[:n] == sentinel, depth, torch.full_like(depth, -1))


def check_parents(parents, d_sae: int, max_depth: int | None = None, name: str = "parents") -> torch.Tensor:
    """Validate a parent map and return it as int64 [d_sae] (-1 = root).

    Checks: a sequence (or 1-d integer tensor) of d_sae ints, each in [-1, d_sae), no latent its own
    parent, no cycle, and (when max_depth is given) at most max_depth ancestors per latent.
    Raises ValueError naming the option `name`, the problem and the valid range (for a cycle, its
    latents, e.g. "cycle 3 -> 7 -> 3").
    """
    if isinstance(parents, torch.Tensor):
        if parents.dim() != 1 or parents.dtype.is_floating_point or parents.dtype == torch.bool:
            raise ValueError(f"sae option {name}: a tensor must be 1-d of an integer dtype, got "
                             f"{parents.dtype} {tuple(parents.shape)}")
        vals = parents.tolist()
    else:
        if isinstance(parents, (str, bytes)) or not hasattr(parents, "__iter__"):
            raise ValueError(f"sae option {name}={parents!r}; valid: a list of d_sae={d_sae} ints in [-1, {d_sae})")
        vals = list(parents)
    if len(vals) != d_sae:
        raise ValueError(f"sae option {name} has {len(vals)} entries; valid: one per latent (d_sae={d_sae})")
    for i, v in enumerate(vals):
        if not _is_int(v):
            raise ValueError(f"sae option {name}[{i}]={v!r} is not an int; valid: ints in [-1, {d_sae})")
        if not -1 <= v < d_sae:
            raise ValueError(f"sae option {name}[{i}]={v} is out of range; valid: [-1, {d_sae}) (-1 = root)")
        if v == i:
            raise ValueError(f"sae option {name}[{i}]={v}: latent {i} cannot be its own parent (a cycle)")
    t = torch.tensor(vals, dtype=torch.int64)
    depth = forest_depths(t)
    bad = (depth < 0).nonzero().flatten()
    if bad.numel():
        cyc = _first_cycle(vals, int(bad[0]))
        shown = " -> ".join(str(c) for c in cyc[:12]) + (" -> ..." if len(cyc) > 12 else "")
        raise ValueError(f"sae option {name} is not a forest: it has a cycle {shown}; every latent must reach "
                         "a root (-1) by following parents")
    if max_depth is not None and int(depth.max()) > max_depth:
        i = int(depth.argmax())
        raise ValueError(f"sae option {name}: latent {i} has {int(depth[i])} ancestors > max_depth={max_depth}; "
                         "give a shallower tree or raise max_depth")
    return t


def limit_depth(parents: torch.Tensor, max_depth: int | None) -> torch.Tensor:
    """A copy of the forest `parents` [n] int64 where every latent with more than `max_depth`
    ancestors is cut loose: repeatedly, the latents at depth max_depth + 1 become roots (their
    subtrees move up with them). None: unchanged copy."""
    out = parents.clone()
    if max_depth is None:
        return out
    while True:
        depth = forest_depths(out)
        cut = depth == max_depth + 1
        if not bool(cut.any()):
            return out
        out[cut] = -1


# ---------------------------------------------------------------------------------------- tree loss
def tree_violation_loss(values: torch.Tensor, indices: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """L_tree of the module docstring: the fraction of the code's L1 mass on latents whose parent is silent.

    values [B, k] float (ReLU'd kept TopK values; a latent is active where its value > 0),
    indices [B, k] int64 in [0, d_sae) (distinct per row), parents [d_sae] int64 (-1 = root).
    Returns a 0-d float32 tensor in [0, 1], differentiable in `values`:
      sum_{b,j} values[b,j] * 1[parents[i_bj] >= 0 and parents[i_bj] not active in row b]
      / stopgrad(sum_{b,j} values[b,j])        (0 when every value is 0).
    Cost O(B k log k) (sort + searchsorted per row), no [B, d_sae] buffer.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [B, k]")
    v = values.float()
    n = parents.numel()
    active = v > 0
    key = torch.where(active, indices, torch.full_like(indices, n))  # silent entries never match a parent
    skey = key.sort(dim=1).values
    par = parents[indices]
    q = par.clamp_min(0)
    pos = torch.searchsorted(skey, q).clamp_max(indices.shape[1] - 1)
    parent_on = skey.gather(1, pos) == q
    viol = active & (par >= 0) & ~parent_on
    num = (v * viol).sum()
    den = v.detach().sum()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), num * 0.0)


# ---------------------------------------------------------------------------------------- co-activations
def _mg_merge_(partner_idx, partner_count, count_deficit, keys, counts) -> None:
    """Merge exact pair counts (keys = c * n + p, int64 [E] unique, counts int64 [E]) into the
    Misra-Gries tables in place: add, then per row subtract the (m+1)-th largest count and keep the
    top m positive ones (Agarwal et al. 2012, section 3)."""
    n, m = partner_idx.shape
    has = partner_idx >= 0
    rows = torch.arange(n, device=keys.device).unsqueeze(1).expand(n, m)[has]
    all_keys = torch.cat([rows * n + partner_idx[has], keys])
    all_cnt = torch.cat([partner_count[has], counts])
    uk, inv = torch.unique(all_keys, return_inverse=True)
    cnt = torch.zeros(uk.numel(), dtype=torch.int64, device=keys.device).scatter_add_(0, inv, all_cnt)
    cc, pp = uk // n, uk % n
    order = torch.argsort(-cnt, stable=True)              # count descending ...
    order = order[torch.argsort(cc[order], stable=True)]  # ... within rows ascending
    cc, pp, cnt = cc[order], pp[order], cnt[order]
    per_row = torch.bincount(cc, minlength=n)
    start = per_row.cumsum(0) - per_row
    rank = torch.arange(cc.numel(), device=keys.device) - start[cc]
    thr = torch.zeros(n, dtype=torch.int64, device=keys.device)
    at = rank == m
    thr[cc[at]] = cnt[at]
    keep = rank < m
    cc, pp, cnt, rank = cc[keep], pp[keep], cnt[keep] - thr[cc[keep]], rank[keep]
    pos = cnt > 0
    count_deficit.add_(thr)
    partner_idx.fill_(-1)
    partner_count.zero_()
    partner_idx[cc[pos], rank[pos]] = pp[pos]
    partner_count[cc[pos], rank[pos]] = cnt[pos]


@torch.no_grad()
def merge_partner_counts_(fire_count: torch.Tensor, partner_idx: torch.Tensor, partner_count: torch.Tensor,
                          count_deficit: torch.Tensor, indices: torch.Tensor, fired: torch.Tensor) -> None:
    """Add one batch of fired latents to the co-activation statistics, in place.

    fire_count int64 [n]: tokens on which each latent fired.
    partner_idx int64 [n, m] (-1 = empty), partner_count int64 [n, m]: for each latent c, its kept
      co-firing partners p and count(c, p) = tokens on which both fired, as a Misra-Gries summary
      (lower bounds of the true counts, each short by at most count_deficit[c]; exact while row c has
      seen at most m distinct partners).
    count_deficit int64 [n]: total count subtracted from each row by the pruning.
    indices [B, k] int64: a token's kept latents (distinct per row); fired [B, k] bool: which fired.
    Pairs are formed per block of tokens (at most 2^22 ordered pairs) and merged into the tables once
    the accumulated distinct pairs exceed that bound, then at the end.
    """
    n, m = partner_idx.shape
    idx = torch.where(fired, indices, torch.full_like(indices, -1))
    on = idx[fired]
    fire_count.add_(torch.bincount(on, minlength=n))
    B, k = idx.shape
    if m == 0 or k < 2 or on.numel() == 0:
        return
    block = max(1, _PAIR_BLOCK // (k * k))
    pend_k = pend_c = None
    for s in range(0, B, block):
        blk = idx[s:s + block]
        c = blk.unsqueeze(2).expand(-1, k, k)
        p = blk.unsqueeze(1).expand(-1, k, k)
        ok = (c >= 0) & (p >= 0) & (c != p)
        keys = c[ok] * n + p[ok]
        if keys.numel() == 0:
            continue
        uk, cnt = torch.unique(keys, return_counts=True)
        if pend_k is not None:
            uk, inv = torch.unique(torch.cat([pend_k, uk]), return_inverse=True)
            cnt = torch.zeros(uk.numel(), dtype=torch.int64, device=uk.device).scatter_add_(
                0, inv, torch.cat([pend_c, cnt]))
        pend_k, pend_c = uk, cnt
        if pend_k.numel() > _PAIR_BLOCK:
            _mg_merge_(partner_idx, partner_count, count_deficit, pend_k, pend_c)
            pend_k = pend_c = None
    if pend_k is not None:
        _mg_merge_(partner_idx, partner_count, count_deficit, pend_k, pend_c)


@torch.no_grad()
def build_parents(fire_count: torch.Tensor, partner_idx: torch.Tensor, partner_count: torch.Tensor, *,
                  min_cooccurrence: float, min_fires: int = 1, max_depth: int | None = None):
    """The forest of the module docstring from co-activation statistics (`merge_partner_counts_`).

    For each latent c with fire_count[c] >= min_fires: among its kept partners p with
    fire_count[p] > fire_count[c], the p maximising count(c, p) (ties: smaller fire_count[p], then
    smaller index); the edge c -> p is kept when count(c, p) / fire_count[c] >= min_cooccurrence.
    Then `limit_depth(max_depth)`.
    Returns (parents int64 [n] (-1 = root), prob float64 [n]: the estimated P(parent | c) of each
    edge, NaN for roots). The result is a forest (parents fire strictly more often).
    """
    n, m = partner_idx.shape
    dev = fire_count.device
    parents = torch.full((n,), -1, dtype=torch.int64, device=dev)
    prob = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    if m == 0:
        return parents, prob
    f = fire_count
    valid = partner_idx >= 0
    pidx = partner_idx.clamp_min(0)
    fp = f[pidx]
    elig = valid & (fp > f.unsqueeze(1)) & (f.unsqueeze(1) >= min_fires) & (partner_count > 0)
    cnt = torch.where(elig, partner_count, torch.full_like(partner_count, -1))
    best = cnt.max(dim=1).values
    tie = elig & (cnt == best.unsqueeze(1))
    key2 = torch.where(tie, fp * n + pidx, torch.full_like(fp, torch.iinfo(torch.int64).max))
    j = key2.argmin(dim=1)
    cand = pidx.gather(1, j.unsqueeze(1)).squeeze(1)
    p_hat = best.double() / f.double().clamp_min(1)
    ok = (best > 0) & (p_hat >= min_cooccurrence)
    parents = torch.where(ok, cand, parents)
    prob = torch.where(ok, p_hat, prob)
    parents = limit_depth(parents, max_depth)
    prob = torch.where(parents >= 0, prob, torch.full_like(prob, float("nan")))
    return parents, prob


# ---------------------------------------------------------------------------------------- the SAE
class TreeSAE(TopKSAE):
    """Tree-structured TopK SAE (`sae=tree`, module docstring).

    Args: cfg (SAEConfig with k; cfg.options -> TreeOptions), device, generator (tied init).
    Buffers (persistent, updated in place): parents int64 [d_sae]; tree_state int64 [] (0 no tree
      yet, 1 from the config, 2 built from co-activations); built_step int64 [] (-1 until built);
      stat_tokens int64 []; and, when the tree is to be built (option parents null), fire_count int64
      [d_sae], partner_idx / partner_count int64 [d_sae, m], count_deficit int64 [d_sae] with
      m = min(partners, d_sae - 1) (shape [0] / [d_sae, 0] otherwise).
    Inference / export: TopK (cfg.json "topk" with k) + tree.json. Not latent-sharded.
    Raises ValueError for bad options, a bad `parents` list, or partner tables over max_stats_mb.
    """

    architecture = "tree"
    export_architecture = "topk"
    shardable = False
    uses_k = True
    Options = TreeOptions

    def __init__(self, cfg: SAEConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__(cfg, device=device, generator=generator)
        o, n = self.opts, cfg.d_sae
        given = o.parents is not None
        m = 0 if given else min(o.partners, n - 1)
        nbytes = (n * (16 * m + 24)) if not given else 0
        if nbytes > o.max_stats_mb * 2**20:
            raise ValueError(
                f"sae=tree: the co-activation tables need {nbytes / 2**20:.0f} MiB (d_sae={n} x "
                f"(16 * partners={m} + 24) bytes) > max_stats_mb={o.max_stats_mb}; lower sae.partners, raise "
                "sae.max_stats_mb, or give the tree in sae.parents"
            )
        i64 = dict(dtype=torch.int64, device=device)
        self.register_buffer("parents", torch.full((n,), -1, **i64))
        self.register_buffer("tree_state", torch.zeros((), **i64))
        self.register_buffer("built_step", torch.full((), -1, **i64))
        self.register_buffer("stat_tokens", torch.zeros((), **i64))
        self.register_buffer("fire_count", torch.zeros((0 if given else n,), **i64))
        self.register_buffer("partner_idx", torch.full((0 if given else n, m), -1, **i64))
        self.register_buffer("partner_count", torch.zeros((0 if given else n, m), **i64))
        self.register_buffer("count_deficit", torch.zeros((0 if given else n,), **i64))
        if given:
            self.parents.copy_(check_parents(o.parents, n, o.max_depth))
            self.tree_state.fill_(1)
        self._step, self._n_steps = 0, None

    # ------------------------------------------------------------------ schedule
    def set_progress(self, step: int, n_steps: int) -> None:
        """Record the trainer's step: counting starts at floor(build_start_frac * n_steps) and the tree
        is built at the latest on the last step (n_steps - 1). Without calls (direct use) counting
        starts at once and the tree is built after build_tokens tokens."""
        self._step, self._n_steps = int(step), int(n_steps)

    @property
    def has_tree(self) -> bool:
        return int(self.tree_state) > 0

    def build_start_step(self) -> int:
        """First step whose tokens are counted (0 before `set_progress`)."""
        return 0 if self._n_steps is None else int(self.opts.build_start_frac * self._n_steps)

    # ------------------------------------------------------------------ co-activations
    @torch.no_grad()
    def update_statistics_(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Count one batch (values, indices [B, k] of the kept latents; fired = value > 0) into the
        co-activation buffers, all-gathered over dp (`self.comm`), and build the tree
        once build_tokens tokens are counted or at the last step. No-op when a tree exists."""
        if self.has_tree:
            return
        fired = values.detach() > 0
        indices, fired = self.comm.gather_over_dp(indices), self.comm.gather_over_dp(fired)
        merge_partner_counts_(self.fire_count, self.partner_idx, self.partner_count, self.count_deficit,
                              indices, fired)
        self.stat_tokens.add_(indices.shape[0])
        last = self._n_steps is not None and self._step >= self._n_steps - 1
        if int(self.stat_tokens) >= self.opts.build_tokens or last:
            self.build_tree_()

    @torch.no_grad()
    def build_tree_(self) -> None:
        """Build `parents` from the counted statistics now (`build_parents`) and mark the tree built."""
        o = self.opts
        parents, _ = build_parents(self.fire_count, self.partner_idx, self.partner_count,
                                   min_cooccurrence=o.min_cooccurrence, min_fires=o.min_fires,
                                   max_depth=o.max_depth)
        self.parents.copy_(parents)
        self.tree_state.fill_(2)
        self.built_step.fill_(self._step)

    # ------------------------------------------------------------------ training
    def training_step_losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> TrainOutput:
        """Losses of one batch x [B, d_in] (normalised): TopK's NMSE (+ Multi-TopK) + auxk_coef * AuxK
        + tree_coef * L_tree (`tree_violation_loss`, once a tree exists). In training mode, from
        `build_start_step` on and until the tree is built, the batch's fired latents are counted
        (`update_statistics_`) first, so a tree built on this step already acts on it.
        terms: "tree" (L_tree, 0 before a tree exists) and "tree_edges" (latents with a parent)."""
        res = super().training_step_losses(x, dead_mask)  # TopK's losses; values still attached
        vals, idx = res.values, res.indices
        if self.training and not self.has_tree and self._step >= self.build_start_step():
            self.update_statistics_(vals.detach(), idx)
        if self.has_tree:
            tree = tree_violation_loss(vals, idx, self.parents)
            if self.opts.tree_coef > 0:
                res.loss = res.loss + self.opts.tree_coef * tree
        else:
            tree = res.x_hat.new_zeros((), dtype=torch.float32)
        res.values = vals.detach()
        res.terms = {"tree": tree.detach().float(), "tree_edges": (self.parents >= 0).sum().float()}
        return res

    # ------------------------------------------------------------------ export
    def tree_dict(self) -> dict:
        """The JSON object written as tree.json: {"format", "d_sae", "parents" [d_sae ints, -1 = root],
        "source" ("config" | "co-activation" | "none"), "n_edges", "max_depth" (longest chain of
        ancestors), and for a built tree "parent_probability" (estimated P(parent fires | child fires)
        per latent, null for roots), "max_probability_error" (largest count_deficit / fire_count over
        the children: 0 = exact counts), "tokens_counted", "built_at_step", "min_cooccurrence",
        "min_fires", "partners"}."""
        parents = self.parents.detach().cpu()
        state = int(self.tree_state)
        out = {"format": "sae_dist.tree/1", "d_sae": int(parents.numel()), "parents": parents.tolist(),
               "source": TREE_SOURCES[state], "n_edges": int((parents >= 0).sum()),
               "max_depth": int(forest_depths(parents).max()) if parents.numel() else 0}
        if state == 2:
            f = self.fire_count.cpu()
            child = parents >= 0
            cnt = torch.zeros_like(f)
            if child.any():
                rows = child.nonzero().flatten()
                hit = self.partner_idx.cpu()[rows] == parents[rows].unsqueeze(1)
                cnt[rows] = (self.partner_count.cpu()[rows] * hit).sum(1)
            prob = cnt.double() / f.double().clamp_min(1)
            err = self.count_deficit.cpu().double() / f.double().clamp_min(1)
            out.update(parent_probability=[round(float(p), 6) if c else None
                                           for p, c in zip(prob, child, strict=True)],
                       max_probability_error=float(err[child].max()) if child.any() else 0.0,
                       tokens_counted=int(self.stat_tokens), built_at_step=int(self.built_step),
                       min_cooccurrence=self.opts.min_cooccurrence, min_fires=self.opts.min_fires,
                       partners=int(self.partner_idx.shape[1]))
        return out

    def export_cfg(self) -> dict:
        """TopK's cfg.json fields ("topk", k) plus "tree_file": "tree.json" and "tree_source"."""
        out = super().export_cfg()
        out.update(tree_file=TREE_FILENAME, tree_source=TREE_SOURCES[int(self.tree_state)])
        return out

    def export_files(self) -> dict[str, object]:
        """{"tree.json": `tree_dict()`} (latent indices are those of the exported weights)."""
        return {TREE_FILENAME: self.tree_dict()}


def load_tree(path: str | os.PathLike) -> dict:
    """Read an exported tree: `path` is an SAE directory (holding tree.json) or the file itself.
    Returns the JSON object with "parents" as a validated int64 tensor [d_sae] (`check_parents`).
    FileNotFoundError when missing; ValueError when the parents are not a forest of d_sae latents."""
    p = Path(path)
    if p.is_dir():
        p = p / TREE_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"no {TREE_FILENAME} at {str(path)!r} (written by sae-train with sae=tree)")
    obj = json.loads(p.read_text())
    obj["parents"] = check_parents(obj["parents"], int(obj.get("d_sae", len(obj["parents"]))), name=f"{p}: parents")
    return obj
