"""Trainer runs that take another process, on synthetic stores made from a known sparse dictionary: a run
that learns, exports and reruns as a no-op with wandb's offline run files (written by wandb's service
process, `wandb-core`), and a real SIGKILL of a training process (forked from the forkserver) then a
resume that reproduces the uninterrupted run exactly. The in-process trainer tests:
tests/unit/train/test_trainer.py."""

import json

import pytest
import torch
from helpers.train import offline_one_thread, sparse_dictionary_data, synthetic_store, train_log
from safetensors.torch import load_file

import sae_dist
from sae_dist.sae import SAEConfig
from sae_dist.train import TrainerConfig, train


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # never touch the network; small matmuls are faster single-threaded on a shared 2-core box
    yield from offline_one_thread(monkeypatch)


def test_trainer_learns_exports_and_is_idempotent(tmp_path, capsys):
    x = sparse_dictionary_data()
    store = synthetic_store(tmp_path, x)
    out = tmp_path / "run"
    sae_cfg = SAEConfig(d_in=32, d_sae=128, k=4, dead_tokens=4096, normalize="layer_norm")
    tcfg = TrainerConfig(tokens=256 * 200, batch_tokens=256, lr=5e-3, log_every_steps=20,
                         checkpoint_every_steps=100, prefetch=1)
    res = train(store_path=store, out_dir=out, sae_cfg=sae_cfg, trainer_cfg=tcfg, progress=False,
                wandb_cfg={"project": "test"})
    log = train_log(out)
    assert [r["step"] for r in log] == list(range(20, 201, 20))
    assert log[0]["train/fvu"] > log[-1]["train/fvu"]
    assert res["metrics"]["train/fvu"] < 0.3
    for key in ("train/loss", "train/fvu", "train/auxk_loss", "train/l0",
                "train/dead_fraction", "train/lr", "train/tokens_per_s", "tokens"):
        assert key in log[-1]
    assert log[-1]["train/l0"] <= 4
    # export: raw activations in, fvu of the loaded SAE matches training quality
    sae = sae_dist.load_sae(out / "sae")
    with torch.no_grad():
        xh = sae(x[:4096]).double()
    xd = x[:4096].double()
    fvu = float(((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert fvu < 0.3
    w = load_file(str(out / "sae" / "sae_weights.safetensors"))
    torch.testing.assert_close(w["W_dec"].norm(dim=-1), torch.ones(128))
    cfg = json.loads((out / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.0.hook_resid_post" and cfg["model_name"] == "synthetic"
    st = json.loads((out / "sae" / "training_state.json").read_text())
    assert st["tokens_trained"] == 256 * 200 and st["d_sae"] == 128 and st["k"] == 4
    # the contract's window: 10M tokens, or the whole run when shorter (51200 tokens here)
    assert 0.0 <= st["dead_fraction"] <= 1.0
    assert "whole run" in st["dead_fraction_window"] and str(256 * 200) in st["dead_fraction_window"]
    assert st["final_metrics"]["train/fvu"] == res["metrics"]["train/fvu"]
    # wandb offline run files under out_dir/wandb
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    # checkpoints: keep 2, atomically named
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000100", "step_00000200"]
    # rerun: no-op that says so
    capsys.readouterr()
    res2 = train(store_path=store, out_dir=out, sae_cfg=sae_cfg, trainer_cfg=tcfg, progress=False,
                 wandb_cfg={"enabled": False})
    assert res2["already_finished"] and "already finished" in capsys.readouterr().err
    assert len(train_log(out)) == len(log)


def _train_to_be_killed(a: dict) -> None:
    """The training that test_sigkill_then_resume_matches_uninterrupted_run kills (in its own process)."""
    torch.set_num_threads(1)
    train(store_path=a["store"], out_dir=a["out"], sae_cfg=SAEConfig(**a["sae"]),
          trainer_cfg=TrainerConfig(**a["trainer"]), seed=1, progress=False, wandb_cfg={"enabled": False})


@pytest.mark.usefixtures("worker_forkserver")
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly inside a checkpoint save) then a resume
    reproduces the uninterrupted run's losses and final weights exactly."""
    import multiprocessing
    import os
    import signal
    import time

    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=4096))
    sae_kw = dict(d_in=32, d_sae=128, k=4, dead_tokens=256, normalize="layer_norm")
    tr_kw = dict(tokens=128 * 400, batch_tokens=128, lr=3e-3, checkpoint_every_steps=5,
                 keep_checkpoints=2, log_every_steps=1)
    killed = tmp_path / "killed"
    args = {"store": str(store), "out": str(killed), "sae": sae_kw, "trainer": tr_kw}
    # a process of its own, forked from the forkserver that has imported torch and sae_dist (conftest.py)
    proc = multiprocessing.get_context("forkserver").Process(target=_train_to_be_killed, args=(args,))
    proc.start()
    log = killed / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.is_alive():
        if log.exists() and len(log.read_text().splitlines()) >= 23:
            break
        time.sleep(0.05)
    assert proc.is_alive(), "the training process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    n_before = len(train_log(killed))
    assert 23 <= n_before < 400
    kw = dict(store_path=store, seed=1, progress=False, wandb_cfg={"enabled": False})
    train(out_dir=killed, sae_cfg=SAEConfig(**sae_kw), trainer_cfg=TrainerConfig(**tr_kw), **kw)
    ref = tmp_path / "ref"
    train(out_dir=ref, sae_cfg=SAEConfig(**sae_kw), trainer_cfg=TrainerConfig(**tr_kw), **kw)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    assert strip(train_log(killed)) == strip(train_log(ref))
    wk = load_file(str(killed / "sae" / "sae_weights.safetensors"))
    wr = load_file(str(ref / "sae" / "sae_weights.safetensors"))
    for name in wr:
        assert torch.equal(wk[name], wr[name]), name
