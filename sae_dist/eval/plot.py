"""`sae-plot RUN_DIR [RUN_DIR ...]`: the training curves of runs without wandb, from their `train_log.jsonl`.

Draws the curves a wandb dashboard shows (loss, fvu, L0 and dead-latent fraction against training tokens)
into one PNG each, `loss.png`, `fvu.png`, `l0.png` and `dead_fraction.png`, with one line per run, and, when
some run logged them, the held-out evaluation's CE loss score and KL (`ce_loss_score.png`, `kl_div.png`;
`trainer.eval_every_steps`) and the feature-density windows' mean log10 density (`feature_density.png`;
`trainer.feature_density_every_steps`). A
directory without `train_log.jsonl` of its own contributes every run below it (a grid's or a multirun's
points). Output: `--out` (default `<first RUN_DIR>/plots`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sae_dist.train.logging import MEAN_LOG10_KEY

__all__ = ["CURVES", "OPTIONAL_CURVES", "find_runs", "training_curves", "plot_training_curves", "main"]

#: (file stem, train_log.jsonl key, y-axis label, log scale) of each PNG
CURVES = (
    ("loss", "train/loss", "training loss", True),
    ("fvu", "train/fvu", "fvu (fraction of variance unexplained)", True),
    ("l0", "train/l0", "L0 (non-zero latents per token)", False),
    ("dead_fraction", "train/dead_fraction", "dead-latent fraction", False),
)
#: curves drawn only when some run has their key (records written every few hundred or thousand steps)
OPTIONAL_CURVES = (
    ("ce_loss_score", "eval/ce_loss_score", "held-out CE loss score (SAE spliced in)", False),
    ("kl_div", "eval/kl_div", "held-out KL(clean || SAE spliced in), nats/token", True),
    ("feature_density", MEAN_LOG10_KEY, "mean log10 feature density (window)", False),
)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories (holding `train_log.jsonl`) that `paths` name or contain, in path order.
    FileNotFoundError naming a path that is neither."""
    runs: list[Path] = []
    for p in map(Path, paths):
        found = [p] if (p / "train_log.jsonl").is_file() else sorted(f.parent for f in p.rglob("train_log.jsonl"))
        if not found:
            raise FileNotFoundError(f"{p}: no train_log.jsonl in it or below it (sae-train writes one per run)")
        runs += found
    return runs


def training_curves(run: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{file stem of CURVES and OPTIONAL_CURVES: (tokens, values)} from a run's `train_log.jsonl` (records lacking
    a key skipped)."""
    records = [json.loads(line) for line in Path(run, "train_log.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for stem, key, _label, _log in CURVES + OPTIONAL_CURVES:
        pts = [(r["tokens"], r[key]) for r in records if key in r and "tokens" in r]
        out[stem] = ([t for t, _ in pts], [v for _, v in pts])
    return out


def plot_training_curves(runs: list[Path], out_dir: str | Path) -> list[Path]:
    """One PNG per CURVES entry in `out_dir`, and per OPTIONAL_CURVES entry that some run has points of, one line
    per run (labelled by its path relative to the runs' common parent); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = [training_curves(r) for r in runs]
    labels = _labels(runs)
    paths = []
    drawn = [c for c in OPTIONAL_CURVES if any(curve[c[0]][0] for curve in curves)]
    for stem, _key, label, log in CURVES + tuple(drawn):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for lab, c in zip(labels, curves, strict=True):
            ax.plot(*c[stem], label=lab, marker="." if len(c[stem][0]) < 30 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(out_dir / f"{stem}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _labels(runs: list[Path]) -> list[str]:
    resolved = [r.resolve() for r in runs]
    if len(resolved) == 1:
        return [resolved[0].name]
    root = Path(os.path.commonpath(resolved))
    return [str(r.relative_to(root)) or r.name for r in resolved]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sae-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run directories (or directories holding several runs)")
    p.add_argument("--out", default=None, help="output directory (default: <first RUN_DIR>/plots)")
    args = p.parse_args(argv)
    try:
        runs = find_runs(args.run_dirs)
    except FileNotFoundError as e:
        p.error(str(e))
    paths = plot_training_curves(runs, args.out or Path(args.run_dirs[0]) / "plots")
    print(f"sae-plot: {len(runs)} run(s) -> " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
