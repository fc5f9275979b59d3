"""`python -m sae_dist.bench_harvest` on the tiny LM at a toy size: one JSON line whose ratio is its two
medians' ratio; the deepest hook is the one the forward reaches last; a bad hook name is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sae_dist.bench_harvest import deepest_hook


def test_deepest_hook_is_the_last_one_the_forward_reaches(lm):
    model, _ = lm
    assert deepest_hook(model, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]) == "blocks.1.hook_resid_pre"
    assert deepest_hook(model, ["blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"]) == "blocks.1.hook_mlp_out"
    assert deepest_hook(model, ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"]) == "blocks.2.hook_resid_post"


def test_bench_harvest_prints_one_record(tiny_lm_dir, capsys):
    """main() in this process (the command line's own part is its argument parsing)."""
    from sae_dist.bench_harvest import main

    threads = torch.get_num_threads()
    try:
        assert main(["--tokens", "252", "--repeats", "1", "--threads", "1", "--model", tiny_lm_dir, "--hooks",
                     "blocks.0.hook_resid_post,blocks.1.hook_mlp_out"]) == 0
    finally:
        torch.set_num_threads(threads)
    (line,) = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(line)
    assert rec["deepest"] == "blocks.1.hook_mlp_out" and rec["tokens"] == 252 and rec["model"] == tiny_lm_dir
    assert rec["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert rec["single_s"] > 0 and rec["multi_s"] > 0 and rec["threads"] == 1
    assert math.isclose(rec["multi_over_single"], rec["multi_s"] / rec["single_s"], rel_tol=1e-3)


def test_bench_harvest_passes_the_shard_size(tiny_lm_dir, capsys, monkeypatch):
    """--seqs-per-shard reaches every timed harvest (9 sequences of 63 rows in shards of 8: two shards, so the
    background writer overlaps the LM) and is recorded; one that is not a multiple of 8 is a one-line error."""
    import sae_dist.harvest.harvester as harvester
    from sae_dist.bench_harvest import main

    real, seen = harvester.harvest, []

    def recording(**kw):
        seen.append(kw.get("seqs_per_shard"))
        return real(**kw)

    monkeypatch.setattr(harvester, "harvest", recording)
    assert main(["--tokens", "567", "--repeats", "1", "--model", tiny_lm_dir, "--hooks", "blocks.0.hook_resid_post",
                 "--seqs-per-shard", "8"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["seqs_per_shard"] == 8 and rec["device"] == "cpu" and rec["dtype"] == "float32"
    assert seen == [8, 8, 8]  # the warm-up, the deepest hook alone, all hooks
    with pytest.raises(SystemExit) as e:
        main(["--tokens", "567", "--model", tiny_lm_dir, "--hooks", "blocks.0.hook_resid_post",
              "--seqs-per-shard", "12"])
    assert "seqs_per_shard" in str(e.value.code) and "\n" not in str(e.value.code)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available here"):
            main(["--device", "cuda", "--model", tiny_lm_dir])


def test_bench_harvest_bad_hook_is_one_line(tiny_lm_dir, capsys):
    """A bad hook name ends the program with SystemExit and a one-line message naming it (the interpreter
    prints that message, no traceback), before any output; main() runs in this process."""
    from sae_dist.bench_harvest import main

    with pytest.raises(SystemExit) as e:
        main(["--tokens", "252", "--model", tiny_lm_dir, "--hooks", "blocks.99.hook_mlp_out"])
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and "blocks.99.hook_mlp_out" in msg, msg
    assert capsys.readouterr().out == ""
