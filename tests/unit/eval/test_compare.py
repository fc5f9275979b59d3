"""`sae_dist.eval.compare` (the architecture comparison of docs/architectures.md) on run directories
laid out as sae-train writes them, with fresh random metrics: the rows, the Pareto front against a
brute-force check, the markdown table, the JSON and the PNG. The launch script:
tests/integration/eval/test_compare_script.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_dist.eval.compare import collect_runs, main, pareto_front


def _fake_run(root: Path, i: int, arch: str, exported: str, l0: float, fvu: float, options: dict, k):
    run = root / f"{i}_{arch}"
    (run / "sae").mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({
        "l0": l0, "fvu": fvu, "fvu_normalized_inputs": fvu * 2, "normalized_mse": fvu, "dead_fraction": 0.01 * i,
        "ce_loss_score": 1 - fvu, "ce_loss_delta": fvu, "kl_div": fvu / 2, "d_sae": 64,
        "tokens_trained": 1000}))
    (run / "sae" / "training_state.json").write_text(json.dumps(
        {"sae_cfg": {"architecture": arch, "k": k, "options": options}}))
    (run / "sae" / "cfg.json").write_text(json.dumps({"architecture": exported}))
    return run


def test_rows_front_table_plot(tmp_path):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    pts = torch.rand(9, 2, generator=g).tolist()
    archs = [("topk", "topk", {}, 8), ("relu", "standard", {"l1_coef": 0.5}, None),
             ("jumprelu", "jumprelu", {"target_l0": 16}, None)]
    for i, (l0, fvu) in enumerate(pts):
        a, e, o, k = archs[i % 3]
        _fake_run(tmp_path / "sweep", i, a, e, 1 + 100 * l0, fvu, o, k)
    (tmp_path / "sweep" / "broken").mkdir()
    (tmp_path / "sweep" / "broken" / "eval.json").write_text("{}")  # no training state: skipped
    rows = collect_runs([tmp_path / "sweep"])
    assert len(rows) == 9
    assert {r["setting"] for r in rows} == {"k=8", "l1_coef=0.5", "target_l0=16"}
    assert {(r["architecture"], r["exported"]) for r in rows} == {(a, e) for a, e, _, _ in archs}
    front = pareto_front(rows)
    for i, r in enumerate(rows):  # brute force: on the front iff no other point is at least as good in both
        better = [s for s in rows if s is not r and s["l0"] <= r["l0"] and s["fvu"] <= r["fvu"]]
        assert (i in front) == (not better)
    out, png, js = tmp_path / "t.md", tmp_path / "p.png", tmp_path / "r.json"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--plot", str(png), "--json", str(js)]) == 0
    lines = out.read_text().strip().splitlines()
    assert len(lines) == 2 + 9 and sum(line.endswith("| * |") for line in lines) == len(front)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(js.read_text()) == rows


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no run with eval.json"):
        collect_runs([tmp_path])


