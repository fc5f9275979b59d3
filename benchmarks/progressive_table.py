#!/usr/bin/env python
"""Progressive recovery (Gao et al. 2024 sec. 5.3) of several SAEs: a markdown table and an L0-fvu plot
from the `progressive` entries of their eval.json files (`sae-eval ... eval.progressive=true`).

    .venv/bin/python benchmarks/progressive_table.py TopK=/tmp/progressive/topk/eval.json \\
        Multi-TopK=/tmp/progressive/multi/eval.json --png docs/progressive.png

Each argument is LABEL=PATH. Two tables (fvu on normalised inputs, the paper's normalised MSE; fvu on
raw activations), one row per k' of the TopK curve and, per SAE, the fvu at TopK(k') and at the
one-threshold JumpReLU calibrated to the L0 TopK(k') had (with its theta), then how far the measured
L0s are from k' and from the targets. --png needs matplotlib. docs/evaluation.md#progressive-recovery
has the measured numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(arg: str) -> tuple[str, dict]:
    """LABEL=PATH -> (label, the eval.json's progressive dict); SystemExit naming a bad argument."""
    label, sep, path = arg.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"argument {arg!r}: expected LABEL=PATH/eval.json")
    prog = json.loads(Path(path).read_text()).get("progressive")
    if not prog:
        raise SystemExit(f"{path} has no progressive entry: rerun sae-eval with eval.progressive=true")
    return label, prog


def table(runs: list[tuple[str, dict]], metric: str = "fvu_normalized_inputs") -> str:
    """Markdown table: k' | per run: `metric` at TopK(k') and at the fixed threshold of the same target L0,
    and that threshold's theta. `l0_note` says how far the measured L0s are from their targets."""
    head = ["k'"] + [f"{lab} {col}" for lab, _ in runs for col in ("TopK", "fixed threshold", "theta")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted({p["k"] for _, prog in runs for p in prog["topk"]}):
        row = [str(k)]
        for _, prog in runs:
            i = next((j for j, p in enumerate(prog["topk"]) if p["k"] == k), None)
            if i is None:
                row += [""] * 3
                continue
            t, h = prog["topk"][i], prog["threshold"][i]
            row += [f"{t[metric]:.4f}", f"{h[metric]:.4f}", f"{h['theta']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def l0_note(runs: list[tuple[str, dict]]) -> str:
    """The largest |L0 - k'| of the TopK points and |L0 - target_l0| of the threshold points."""
    dk = max(abs(p["l0"] - p["k"]) for _, prog in runs for p in prog["topk"])
    dt = max(abs(p["l0"] - p["target_l0"]) for _, prog in runs for p in prog["threshold"])
    return f"max |L0 - k'| (TopK) = {dk:.3g}; max |L0 - target L0| (fixed threshold) = {dt:.3g}"


def plot(runs: list[tuple[str, dict]], png: str) -> None:
    """L0 (log2) against fvu on normalised inputs (log), TopK(k') solid, fixed threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (label, prog) in enumerate(runs):
        color = f"C{i}"
        for key, style, name in (("topk", "o-", "TopK(k')"), ("threshold", "s--", "fixed threshold")):
            pts = prog[key]
            ax.plot([p["l0"] for p in pts], [p["fvu_normalized_inputs"] for p in pts], style, color=color,
                    label=f"{label}: {name}", markersize=4)
        ax.axvline(prog["k_train"], color="grey", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("normalised MSE (fvu on normalised inputs)")
    ax.set_title("Progressive recovery (Gao et al. 2024 sec. 5.3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=PATH/eval.json")
    p.add_argument("--png", help="write the plot here (needs matplotlib)")
    args = p.parse_args()
    runs = [_load(a) for a in args.runs]
    print("fvu on normalised inputs (the paper's normalised MSE):\n" + table(runs))
    print("\nfvu on raw activations:\n" + table(runs, "fvu"))
    print("\n" + l0_note(runs))
    if args.png:
        plot(runs, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
