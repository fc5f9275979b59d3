"""`python -m sae_dist.bench_stream` on the tiny LM at a toy size (in this process: the command line's own
part is `main`'s argument check): one record whose ratios are the ratios of its wall times; bad sizes are
one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_dist import bench_stream


def test_bench_stream_prints_one_record(tiny_lm_dir, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    try:
        assert bench_stream.main(["--tokens", "1260", "--d-sae", "64", "--k", "2", "--batch", "252", "--buffer",
                                  "504", "--points", "2", "--threads", "1", "--model", tiny_lm_dir]) == 0
    finally:
        torch.set_num_threads(threads)
    (line,) = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(line)
    assert rec["model"] == tiny_lm_dir and rec["tokens"] == 1260 and rec["grid_k"] == [2, 4]
    assert all(rec[k] > 0 for k in ("harvest_s", "train_s", "stream_s", "grid_s", "separate_s"))
    # the record rounds the ratio to 4 decimals (5e-5 at most) and the times to 6
    assert math.isclose(rec["stream_over_sum"], rec["stream_s"] / (rec["harvest_s"] + rec["train_s"]), rel_tol=1e-3,
                        abs_tol=5e-5)
    assert 0 < rec["heldout_fvu_store"] < 2 and 0 < rec["heldout_fvu_stream"] < 2
    assert math.isclose(rec["grid_over_separate"], rec["grid_s"] / rec["separate_s"], rel_tol=1e-3, abs_tol=5e-5)


def test_bench_stream_quality_mode_compares_store_and_stream_per_seed(tiny_lm_dir, capsys, monkeypatch):
    """--quality-seeds 2: two held-out fvu per source (different seeds train different SAEs) and the ratio
    of their means, without the timing mode's stages."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    args = ["--tokens", "1260", "--d-sae", "64", "--k", "2", "--batch", "252", "--buffer", "504", "--threads", "1",
            "--model", tiny_lm_dir]
    try:
        assert bench_stream.main([*args, "--quality-seeds", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    (line,) = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(line)
    assert rec["seeds"] == 2 and len(rec["heldout_fvu_store"]) == len(rec["heldout_fvu_stream"]) == 2
    assert rec["heldout_fvu_store"][0] != rec["heldout_fvu_store"][1]
    assert rec["mean_store"] == pytest.approx(sum(rec["heldout_fvu_store"]) / 2, abs=1e-5)
    assert rec["stream_over_store"] == pytest.approx(rec["mean_stream"] / rec["mean_store"], rel=1e-3)
    assert 0.5 < rec["stream_over_store"] < 2 and "harvest_s" not in rec and "grid_s" not in rec


def test_bench_stream_bad_sizes_are_one_line():
    with pytest.raises(SystemExit, match=r"--batch <= --tokens"):
        bench_stream.main(["--tokens", "100", "--batch", "200"])
    with pytest.raises(SystemExit, match=r"--points=0"):
        bench_stream.main(["--points", "0"])
