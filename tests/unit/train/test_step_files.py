"""docs/internals.md "One training step, file by file" lists the files one training step passes through:
trace the function calls of one ordinary step (batch, losses with AuxK active, engine step) of a real run
and compare the files they land in with that list (issue 16: at most 8 files)."""

import re
import sys
from pathlib import Path

import torch

import sae_dist.train.trainer as trainer_mod
from sae_dist.sae import SAEConfig
from sae_dist.store import write_store
from sae_dist.train import TrainerConfig

ROOT = Path(__file__).resolve().parents[3]
TRACED_STEP = 6


def _documented_files() -> list[str]:
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("## One training step, file by file", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `(sae_dist/[\w/]+\.py)`", section, flags=re.M)


def test_one_step_passes_through_the_documented_files(tmp_path, monkeypatch):
    seen: dict[str, set] = {}
    package = Path(trainer_mod.__file__).resolve().parents[1]  # sae_dist/

    def profile(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            for base, prefix in ((str(package), "sae_dist"), (str(ROOT / "kernels"), "sae_dist/kernels"),
                                 (str(ROOT / "sae_dist"), "sae_dist")):
                if f.startswith(base + "/"):
                    seen.setdefault(prefix + f[len(base):], set()).add(frame.f_code.co_name)
                    break

    next_batch, train_step = trainer_mod._next_batch, trainer_mod._train_step
    dead = []

    def traced_next(it, run, store_path):
        if run.step == TRACED_STEP:
            dead.append(int(run.tracker.dead_mask().sum()))
            sys.setprofile(profile)
        return next_batch(it, run, store_path)

    def traced_step(run, x):
        try:
            return train_step(run, x)
        finally:
            sys.setprofile(None)

    monkeypatch.setattr(trainer_mod, "_next_batch", traced_next)
    monkeypatch.setattr(trainer_mod, "_train_step", traced_step)
    g = torch.Generator().manual_seed(0)
    write_store(tmp_path / "s.zarr", torch.randn(8192, 32, generator=g), attrs={"hook_name": "h", "model": "m"})
    trainer_mod.train(store_path=tmp_path / "s.zarr", out_dir=tmp_path / "run", seed=0, progress=False,
                      sae_cfg=SAEConfig(d_in=32, d_sae=2048, k=4, dead_tokens=1024),
                      trainer_cfg=TrainerConfig(tokens=10 * 512, batch_tokens=512, keep_checkpoints=0,
                                                log_every_steps=1000),
                      wandb_cfg={"enabled": False})
    assert dead and dead[0] > 0, "AuxK must be active in the traced step"
    assert "decode_aux" in seen["sae_dist/kernels/sparse_decode.py"]
    documented = _documented_files()
    assert len(documented) <= 8
    assert sorted(seen) == sorted(documented), {f: sorted(names) for f, names in seen.items()}
