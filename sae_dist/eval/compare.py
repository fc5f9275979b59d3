"""Compare trained SAEs of several architectures: the sparsity-reconstruction frontier (FVU against
L0), dead latents and the downstream CE loss score, as a markdown table, a JSON file and a PNG plot.

This is the comparison of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section 5 /
figure 2: TopK against ReLU and ProLU at equal sparsity) and of the papers each architecture comes
from (JumpReLU, BatchTopK, Matryoshka ...): for a fixed number of latents, the architecture whose
points lie lower on the FVU-L0 plane reconstructs better at the same sparsity.

Input: run directories, each with `eval.json` (sae-eval / `sae-train eval.after_train=true`) and the
exported `sae/cfg.json` + `sae/training_state.json` (sae-train). Typically the subdirectories of one
or more Hydra multirun sweeps (`launch/compare_architectures.sh`).

    python -m sae_dist.eval.compare runs/compare --out docs/architectures.md \
        --plot docs/architectures_frontier.png --json docs/architectures.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["collect_runs", "pareto_front", "markdown_table", "plot_frontier", "main"]

#: The option that sets each architecture's sparsity, shown in the table's "setting" column.
SPARSITY_OPTIONS = ("k", "l1_coef", "l0_coef", "target_l0")


def _setting(sae_cfg: dict) -> str:
    opts = sae_cfg.get("options") or {}
    parts = []
    if sae_cfg.get("k") is not None:
        parts.append(f"k={sae_cfg['k']}")
    for name in SPARSITY_OPTIONS[1:]:
        if opts.get(name) is not None:
            parts.append(f"{name}={opts[name]:g}" if isinstance(opts[name], (int, float)) else f"{name}={opts[name]}")
    return ", ".join(parts) or "-"


def collect_runs(roots: list[str | Path]) -> list[dict]:
    """One row per run directory found under `roots` (searched recursively for eval.json).

    Row keys: run (path), architecture (the sae= name), exported (cfg.json's architecture), setting
    (the sparsity option), d_sae, l0, fvu, fvu_normalized_inputs, normalized_mse,
    dead_fraction, ce_loss_score, ce_loss_delta, kl_div, tokens_trained. Runs without
    sae/training_state.json are skipped with a message on stderr. Sorted by architecture then L0.
    ValueError when no run is found.
    """
    rows = []
    for root in roots:
        for ev in sorted(Path(root).rglob("eval.json")):
            run = ev.parent
            state_f = run / "sae" / "training_state.json"
            if not state_f.is_file():
                print(f"compare: skipping {run} (no sae/training_state.json)", file=sys.stderr)
                continue
            e = json.loads(ev.read_text())
            state = json.loads(state_f.read_text())
            sae_cfg = state.get("sae_cfg", {})
            cfg_json = json.loads((run / "sae" / "cfg.json").read_text())
            rows.append({
                "run": str(run),
                "architecture": sae_cfg.get("architecture", "topk"),
                "exported": cfg_json.get("architecture"),
                "setting": _setting(sae_cfg),
                "d_sae": e.get("d_sae"),
                "l0": e.get("l0"),
                "fvu": e.get("fvu"),
                "fvu_normalized_inputs": e.get("fvu_normalized_inputs"),
                "normalized_mse": e.get("normalized_mse"),
                "dead_fraction": e.get("dead_fraction"),
                "ce_loss_score": e.get("ce_loss_score"),
                "ce_loss_delta": e.get("ce_loss_delta"),
                "kl_div": e.get("kl_div"),
                "tokens_trained": e.get("tokens_trained"),
            })
    if not rows:
        raise ValueError(f"no run with eval.json found under {[str(r) for r in roots]}")
    rows.sort(key=lambda r: (r["architecture"], r["l0"] if r["l0"] is not None else math.inf))
    return rows


def pareto_front(rows: list[dict], x: str = "l0", y: str = "fvu") -> set[int]:
    """Indices of the rows on the lower-left Pareto front of (x, y): no other row has x' <= x and
    y' <= y with one strictly smaller."""
    front = set()
    for i, a in enumerate(rows):
        dominated = any(
            b[x] <= a[x] and b[y] <= a[y] and (b[x] < a[x] or b[y] < a[y])
            for j, b in enumerate(rows) if j != i
        )
        if not dominated:
            front.add(i)
    return front


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table; rows on the FVU-L0 Pareto front are marked with *."""
    front = pareto_front(rows)
    head = ("| architecture | setting | exported as | L0 | FVU | FVU (normalised inputs) | dead fraction "
            "| CE loss score | delta CE | KL | front |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            f"| {r['architecture']} | {r['setting']} | {r['exported']} | {_f(r['l0'], '.1f')} | {_f(r['fvu'])} "
            f"| {_f(r['fvu_normalized_inputs'])} | {_f(r['dead_fraction'], '.3f')} | {_f(r['ce_loss_score'])} "
            f"| {_f(r['ce_loss_delta'])} | {_f(r['kl_div'])} | {'*' if i in front else ''} |"
        )
    return head + "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG of FVU against L0 (log x), one line per architecture (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    archs = sorted({r["architecture"] for r in rows})
    markers = "osD^v<>pPX*h"
    for i, a in enumerate(archs):
        pts = sorted((r for r in rows if r["architecture"] == a and r["l0"]), key=lambda r: r["l0"])
        if not pts:
            continue
        for ax, key in zip(axes, ("fvu", "ce_loss_score"), strict=True):
            ax.plot([p["l0"] for p in pts], [p[key] for p in pts], marker=markers[i % len(markers)], label=a)
    axes[0].set_ylabel("FVU (eval, raw activations)")
    axes[1].set_ylabel("CE loss score")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, eval)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m sae_dist.eval.compare ROOT [ROOT ...] [--out MD] [--plot PNG] [--json JSON]."""
    ap = argparse.ArgumentParser(prog="python -m sae_dist.eval.compare", description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", help="directories searched recursively for run dirs with eval.json")
    ap.add_argument("--out", help="write the markdown table here (default: print it)")
    ap.add_argument("--plot", help="write the FVU/CE-vs-L0 PNG here")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--title", default="", help="plot title")
    a = ap.parse_args(argv)
    rows = collect_runs(a.roots)
    table = markdown_table(rows)
    if a.out:
        Path(a.out).write_text(table)
    else:
        print(table)
    if a.plot:
        plot_frontier(rows, a.plot, a.title)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
