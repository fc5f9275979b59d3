"""scripts/curve_tolerance.py, the CPU measurement behind gpu-check's curve tolerance: its forced CPU bf16
autocast, which runs it resumes, and the pairs it compares (training replaced by planted logs here; the
real runs take 9 to 27 minutes each, docs/gpu-check.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sae_dist import gpu_check as gc

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "curve_tolerance.py"
#: Planted fvu curves: run -> constant factor on one base curve, so every smoothed ratio is exact.
FACTORS = {"fp32": 1.0, "bf16": 1.001, "bf16_halfaux": 1.006, "bf16_noaux": 1.03}


def _script():
    spec = importlib.util.spec_from_file_location("curve_tolerance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_log(run_dir: Path, factor: float, last_step: int, every: int = 10) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": t, "train/fvu": factor * (0.2 + 1.0 / t)}) for t in range(every, last_step + 1, every)]
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n")


def test_cpu_bf16_autocast_is_on_for_the_cpu():
    """The trainer asks for autocast with enabled=False off CUDA; the script's subclass turns bf16 on
    for the CPU and leaves every other request as asked."""
    m = _script()
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    with m._CPUBf16Autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert (a @ a).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert (a @ a).dtype == torch.float32
    with m._CPUBf16Autocast("cpu", dtype=torch.float16, enabled=False):
        assert (a @ a).dtype == torch.float32


def test_main_trains_only_missing_runs_and_compares_every_pair(tmp_path, monkeypatch, capsys):
    """A complete run is kept, an interrupted one is removed and trained again; the printed deviations
    are the planted factors' ratios, and only the pair without AuxK exceeds the check's 1 %."""
    m = _script()
    steps = 100
    _write_log(tmp_path / "run_fp32", FACTORS["fp32"], steps)
    _write_log(tmp_path / "run_bf16_noaux", 5.0, steps // 2)  # interrupted at step 50
    (tmp_path / "run_bf16_noaux" / "stale.bin").write_bytes(b"x")
    trained = []

    def fake_train(work, run, n, steps_):
        assert not (work / f"run_{run}").exists()  # an interrupted run starts over from nothing
        trained.append((run, n, steps_))
        _write_log(work / f"run_{run}", FACTORS[run], steps_)

    monkeypatch.setattr(m, "train_one", fake_train)
    assert m.main(["--work", str(tmp_path), "--steps", str(steps), "--n", "64"]) == 0
    assert trained == [(r, 64, steps) for r in ("bf16", "bf16_halfaux", "bf16_noaux")]
    recs = {(r["a"], r["b"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(recs) == set(m.PAIRS)
    for (a, b), r in recs.items():
        want = FACTORS[a] / FACTORS[b] - 1
        assert r["max_rel_dev"] == pytest.approx(want, rel=1e-9)
        assert r["max_rel_dev_raw"] == pytest.approx(want, rel=1e-9)
        assert r["ok"] == (want <= gc.FULL.curve_rtol) and r["rtol"] == gc.FULL.curve_rtol
    assert [pair for pair, r in recs.items() if not r["ok"]] == [("bf16_noaux", "bf16")]


def test_compare_skips_incomplete_pairs(tmp_path):
    """Only pairs whose two runs reached the last step are compared."""
    m = _script()
    _write_log(tmp_path / "run_bf16", FACTORS["bf16"], 100)
    _write_log(tmp_path / "run_fp32", FACTORS["fp32"], 90)
    _write_log(tmp_path / "run_bf16_halfaux", FACTORS["bf16_halfaux"], 100)
    assert [(r["a"], r["b"]) for r in m.compare(tmp_path, 100)] == [("bf16_halfaux", "bf16")]
    assert m._finished_log(tmp_path / "run_fp32", 100) is None
    assert len(m._finished_log(tmp_path / "run_fp32", 90)) == 9
