"""`sae-plot`: the training curves of train_log.jsonl files as PNGs, one line per run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_dist.eval.plot import CURVES, OPTIONAL_CURVES, find_runs, training_curves


def _write_log(run, rng, steps: int, drop_dead_at: int | None = None, eval_every: int = 0) -> list[dict]:
    """A train_log.jsonl as sae-train writes it: a record per step, and with eval_every a held-out evaluation
    record (eval/...) after every eval_every-th step's, whose train record then has the density summary."""
    run.mkdir(parents=True)
    recs = []
    for s in range(1, steps + 1):
        r = {"step": s, "tokens": 4096 * s, "train/loss": float(rng.uniform(0.1, 1)),
             "train/fvu": float(rng.uniform(0.1, 1)), "train/l0": float(rng.uniform(1, 64)),
             "train/dead_fraction": float(rng.uniform(0, 0.2))}
        if s == drop_dead_at:
            del r["train/dead_fraction"]
        recs.append(r)
        if eval_every and s % eval_every == 0:
            r["train/mean_log10_feature_density"] = float(rng.uniform(-6, -1))
            recs.append({"step": s, "tokens": 4096 * s, "eval/ce_loss_score": float(rng.uniform(0.5, 1)),
                         "eval/kl_div": float(rng.uniform(0.01, 1))})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_sae_plot_draws_every_curve_of_every_run(tmp_path, console_script):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(0)
    a = _write_log(tmp_path / "grid" / "0_n64_k4", rng, 12, drop_dead_at=5)
    b = _write_log(tmp_path / "grid" / "1_n64_k8", rng, 7, eval_every=3)
    runs = find_runs([tmp_path / "grid"])
    assert [r.name for r in runs] == ["0_n64_k4", "1_n64_k8"]
    for run, recs in zip(runs, (a, b), strict=True):
        curves = training_curves(run)
        for stem, key, _label, _log in CURVES + OPTIONAL_CURVES:
            want = [(r["tokens"], r[key]) for r in recs if key in r]
            assert list(zip(*curves[stem], strict=True)) == want
    assert len(training_curves(runs[1])["ce_loss_score"][0]) == 2 and not training_curves(runs[0])["kl_div"][0]
    curves = training_curves(runs[0])
    assert len(curves["dead_fraction"][0]) == 11 and len(training_curves(runs[1])["l0"][0]) == 7
    proc = console_script("sae-plot", str(tmp_path / "grid"), "--out", str(tmp_path / "png"))
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s)" in proc.stdout
    for stem, *_ in CURVES + OPTIONAL_CURVES:  # the optional ones: run 1 has them
        img = mpimg.imread(tmp_path / "png" / f"{stem}.png")
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas
    proc = console_script("sae-plot", str(tmp_path / "grid" / "1_n64_k8"))  # default --out: <run>/plots
    assert proc.returncode == 0 and (tmp_path / "grid" / "1_n64_k8" / "plots" / "kl_div.png").is_file()
    proc = console_script("sae-plot", str(tmp_path / "grid" / "0_n64_k4"))  # no eval records: no such PNG
    assert proc.returncode == 0 and (tmp_path / "grid" / "0_n64_k4" / "plots" / "fvu.png").is_file()
    assert not (tmp_path / "grid" / "0_n64_k4" / "plots" / "kl_div.png").exists()


def test_a_directory_without_runs_is_refused_by_name(tmp_path, console_script):
    (tmp_path / "empty").mkdir()
    proc = console_script("sae-plot", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "empty: no train_log.jsonl in it or below it" in proc.stderr
    with pytest.raises(FileNotFoundError):
        find_runs([tmp_path / "missing"])
