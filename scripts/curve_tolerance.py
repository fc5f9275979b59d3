#!/usr/bin/env python
"""A CPU measurement behind `make gpu-check`'s training-curve tolerance (`CheckSizes.curve_rtol`;
docs/gpu-check.md, "Why 1 %"): how far rounding and two planted defects move the logged fvu curve.

    .venv/bin/python scripts/curve_tolerance.py --work /tmp/curves            # every run, then the table
    .venv/bin/python scripts/curve_tolerance.py --work /tmp/curves --run bf16  # one run (e.g. in parallel)

Runs the trainer (`sae_dist.train.trainer.train`, torch path) on gpu-check's synthetic store at the full
check's training shape (d_in, k, batch, steps, dead_tokens of `gpu_check.FULL`) with --n latents:
  fp32         float32 throughout
  bf16         bf16 autocast, forced on the CPU (the trainer enables it on CUDA only)
  bf16_halfaux bf16 with sae.auxk_coef halved (a subtle defect)
  bf16_noaux   bf16 without AuxK (a gross defect)
then compares them as the check does (`gpu_check.compare_curves`) and prints one JSON line per pair.
9 (no AuxK) to 27 minutes per run at n=8192 on one core of the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from sae_dist import gpu_check as gc

RUNS = ("fp32", "bf16", "bf16_halfaux", "bf16_noaux")
PAIRS = (("bf16", "fp32"), ("bf16_halfaux", "bf16"), ("bf16_noaux", "bf16"))


class _CPUBf16Autocast(torch.autocast):
    """torch.autocast whose bf16 contexts are on for the CPU too (the trainer asks for them on CUDA only)."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == "cpu" and dtype == torch.bfloat16:
            enabled = True
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


def train_one(work: Path, run: str, n: int, steps: int) -> None:
    """One run of RUNS into work/run_<run> (the store is written first if missing)."""
    from sae_dist.sae import SAEConfig
    from sae_dist.train import TrainerConfig
    from sae_dist.train.trainer import train

    s = gc.FULL
    store = work / "store.zarr"
    if not store.exists():
        gc.write_synthetic_store(str(store), s.d_in, s.store_tokens, s.store_features, s.store_p_active, 0)
    coef = SAEConfig(d_in=s.d_in, d_sae=n, k=s.train_k).auxk_coef
    coef = {"bf16_halfaux": coef / 2, "bf16_noaux": 0.0}.get(run, coef)
    plain = torch.autocast
    if run.startswith("bf16"):
        torch.autocast = _CPUBf16Autocast
    try:
        train(store_path=store, out_dir=work / f"run_{run}", seed=0, progress=True,
              sae_cfg=SAEConfig(d_in=s.d_in, d_sae=n, k=s.train_k, dead_tokens=s.train_dead_tokens,
                                kernel_backend="torch", auxk_coef=coef),
              trainer_cfg=TrainerConfig(tokens=steps * s.train_batch, batch_tokens=s.train_batch,
                                        keep_checkpoints=0, log_every_steps=s.train_log_every, eval_every_steps=0),
              wandb_cfg={"enabled": False})
    finally:
        torch.autocast = plain


def _finished_log(run_dir: Path, steps: int) -> list[dict] | None:
    """run_dir's train_log.jsonl records when the run reached step `steps`, else None."""
    recs = gc._read_jsonl(run_dir / "train_log.jsonl")  # [] when absent
    return recs if any(r.get("step") == steps for r in recs) else None


def compare(work: Path, steps: int) -> list[dict]:
    """`compare_curves` of each pair of PAIRS whose two runs are complete, as gpu-check calls it."""
    s, out = gc.FULL, []
    for a, b in PAIRS:
        la, lb = (_finished_log(work / f"run_{r}", steps) for r in (a, b))
        if la and lb:
            cmp = gc.compare_curves(la, lb, window=s.curve_window, rtol=s.curve_rtol,
                                    skip_steps=max(1, int(s.curve_skip_frac * steps)))
            out.append({"a": a, "b": b, **cmp})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the store and the runs")
    p.add_argument("--run", choices=RUNS, help="train only this run, then compare what exists")
    p.add_argument("--n", type=int, default=8192, help="latents (default 8192; the GPU check trains 2^16)")
    p.add_argument("--steps", type=int, default=gc.FULL.train_steps, help="training steps (default: the check's)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    for run in (args.run,) if args.run else RUNS:
        if _finished_log(args.work / f"run_{run}", args.steps) is None:
            shutil.rmtree(args.work / f"run_{run}", ignore_errors=True)  # an interrupted run starts over
            train_one(args.work, run, args.n, args.steps)
    for rec in compare(args.work, args.steps):
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
