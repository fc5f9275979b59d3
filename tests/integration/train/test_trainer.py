"""Trainer on synthetic stores made from a known sparse dictionary: learning, export, exact resume,
errors, wandb offline files."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sae_dist
from sae_dist.sae import SAEConfig
from sae_dist.store import write_store
from sae_dist.train import TrainerConfig, train


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # never touch the network; small matmuls are faster single-threaded on a shared 2-core box
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sparse_dictionary_data(n_tokens=16384, d=32, n_feat=64, k_true=3, seed=None):
    """x = sum of k_true random unit dictionary atoms with magnitudes in [0.5, 2.5] + offset + noise."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    D = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1)
    idx = torch.argsort(torch.rand(n_tokens, n_feat, generator=g), dim=-1)[:, :k_true]
    vals = torch.rand(n_tokens, k_true, generator=g) * 2 + 0.5
    x = (vals[..., None] * D[idx]).sum(1)
    return (x + 0.01 * torch.randn(n_tokens, d, generator=g) + 0.3 * torch.randn(d, generator=g)).float()


def _store(tmp_path, x, name="store"):
    return write_store(tmp_path / name, x.numpy(), attrs={"model": "synthetic", "hook": "blocks.0.hook_resid_post",
                                                        "ctx_len": 64, "dataset": "synthetic"},
                       chunk_tokens=512, shard_tokens=2048)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_trainer_learns_exports_and_is_idempotent(tmp_path, capsys):
    x = _sparse_dictionary_data()
    store = _store(tmp_path, x)
    out = tmp_path / "run"
    sae_cfg = SAEConfig(d_in=32, n_latents=128, k=4, dead_tokens=4096, normalize="layer_norm")
    tcfg = TrainerConfig(tokens=256 * 200, batch_tokens=256, lr=5e-3, log_every_steps=20,
                         checkpoint_every_steps=100, prefetch=1)
    res = train(store_path=store, out_dir=out, sae_cfg=sae_cfg, trainer_cfg=tcfg, progress=False,
                wandb_cfg={"project": "test"})
    log = _log(out)
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
    assert st["tokens_trained"] == 256 * 200 and st["n_latents"] == 128 and st["k"] == 4
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
    assert len(_log(out)) == len(log)


def _resume_cfgs(max_steps=None):
    sae_cfg = SAEConfig(d_in=32, n_latents=256, k=4, dead_tokens=128, normalize="scalar",
                        multi_topk=True, multi_topk_factor=2)
    tcfg = TrainerConfig(tokens=128 * 30, batch_tokens=128, lr=4e-3, warmup_steps=3, lr_decay_frac=0.3,
                         ema=True, ema_decay=0.9, grad_clip_norm=1.0, checkpoint_every_steps=8,
                         keep_checkpoints=2, log_every_steps=1, max_steps=max_steps, prefetch=2)
    return sae_cfg, tcfg


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=3000))  # several epochs too
    kw = dict(store_path=store, progress=False, seed=3, wandb_cfg={"enabled": False})
    a = tmp_path / "a"
    train(out_dir=a, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs()[1], **kw)
    b = tmp_path / "b"
    r1 = train(out_dir=b, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs(max_steps=19)[1], **kw)
    assert r1["stopped_early"] and r1["steps"] == 19 and not (b / "sae").exists()
    assert len(_log(b)) == 19  # logged past the last checkpoint (16): those lines get replaced
    # a save killed midway leaves a temporary directory and/or a step directory without DCP's
    # .metadata: both must be ignored, resume starts from step 16
    (b / "checkpoints" / ".tmp_step_00000024").mkdir()
    (b / "checkpoints" / ".tmp_step_00000024" / "__0_0.distcp").write_bytes(b"torn")
    (b / "checkpoints" / "step_00000024").mkdir()
    r2 = train(out_dir=b, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs()[1], **kw)
    assert not r2["stopped_early"] and r2["steps"] == 30

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    la, lb = strip(_log(a)), strip(_log(b))
    assert [r["step"] for r in lb] == list(range(1, 31))
    assert la == lb  # bit-for-bit equal losses, lr, l0, dead fraction
    assert any(r["train/auxk_loss"] > 0 for r in la)  # AuxK active in the compared window
    wa = load_file(str(a / "sae" / "sae_weights.safetensors"))
    wb = load_file(str(b / "sae" / "sae_weights.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(wa[name], wb[name]), name
    sa = json.loads((a / "sae" / "training_state.json").read_text())
    sb = json.loads((b / "sae" / "training_state.json").read_text())
    assert sa["dead_fraction"] == sb["dead_fraction"]


def test_d_model_mismatch_and_nan_batch(tmp_path, monkeypatch):
    store = _store(tmp_path, torch.randn(2048, 24))
    with pytest.raises(ValueError, match="store d_model 24 != SAE d_in 32"):
        train(store_path=store, out_dir=tmp_path / "r", sae_cfg=SAEConfig(d_in=32, n_latents=64, k=4),
              trainer_cfg=TrainerConfig(tokens=1024, batch_tokens=256), progress=False,
              wandb_cfg={"enabled": False})

    # a NaN written into the store behind write_store's back: the reader's check names the rows,
    # the trainer names the step
    import zarr

    bad = torch.randn(2048, 24)
    nan_store = _store(tmp_path, bad, name="nan_store")
    zarr.open_group(nan_store, mode="r+")["activations"][1500, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch of step \d+"):
        train(store_path=nan_store, out_dir=tmp_path / "n0",
              sae_cfg=SAEConfig(d_in=24, n_latents=64, k=4, b_pre_init="zeros"),
              trainer_cfg=TrainerConfig(tokens=2048, batch_tokens=256), progress=False,
              wandb_cfg={"enabled": False})
    with pytest.raises(FloatingPointError, match="b_pre sample"):
        train(store_path=nan_store, out_dir=tmp_path / "n1", sae_cfg=SAEConfig(d_in=24, n_latents=64, k=4),
              trainer_cfg=TrainerConfig(tokens=2048, batch_tokens=256, b_pre_sample_tokens=2048),
              progress=False, wandb_cfg={"enabled": False})

    # a store that yields a NaN batch at the third step (the real reader refuses NaN itself)
    class NaNStore:
        d_model, attrs, scale = 24, {}, None

        def __init__(self, *a, **k):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            x = torch.randn(256, 24)
            if self.i == 3:  # main store: steps 0, 1 fine, step 2 NaN (the b_pre sampler reads 1 batch)
                x[5, 3] = float("nan")
            return x

        def state_dict(self):
            return {}

    import sae_dist.train.trainer as tr

    stores = iter([NaNStore(), NaNStore()])
    monkeypatch.setattr(tr, "_open_store", lambda *a, **k: next(stores))
    with pytest.raises(FloatingPointError, match="step 2"):
        train(store_path=store, out_dir=tmp_path / "n", sae_cfg=SAEConfig(d_in=24, n_latents=64, k=4),
              trainer_cfg=TrainerConfig(tokens=256 * 10, batch_tokens=256, b_pre_sample_tokens=256),
              progress=False, wandb_cfg={"enabled": False})


def test_trainer_config_validation():
    with pytest.raises(ValueError, match="lr_decay_frac=2"):
        TrainerConfig(tokens=10, lr_decay_frac=2)
    # the paper's 2e-4 / sqrt(n / 2^14) (Appendix A.3) times clip(sqrt(24000 / steps), 1, 12), by hand
    assert np.isclose(sae_dist.train.default_lr(2**14, 24_000), 2e-4)
    assert np.isclose(sae_dist.train.default_lr(2**16, 10**6), 1e-4)
    assert np.isclose(sae_dist.train.default_lr(2**14, 6_000), 4e-4)
    assert np.isclose(sae_dist.train.default_lr(8192, 195), 2e-4 / np.sqrt(0.5) * np.sqrt(24_000 / 195))
    assert np.isclose(sae_dist.train.default_lr(8192, 10), 12 * 2e-4 / np.sqrt(0.5))
    with pytest.raises(ValueError, match="n_latents must be > 0, got 0"):
        sae_dist.train.default_lr(0, 100)
    with pytest.raises(ValueError, match="n_steps must be > 0, got 0"):
        sae_dist.train.default_lr(1024, 0)
    lr = [sae_dist.train.lr_at_step(s, 10, 1.0, warmup_steps=2, decay_frac=0.4) for s in range(10)]
    np.testing.assert_allclose(lr, [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])


def test_default_lr_is_the_budget_rule_and_is_announced(tmp_path, capsys):
    """trainer.lr=null trains at 2e-4 / sqrt(n / 2^14) * clip(sqrt(24000 / steps), 1, 12) (after the
    warm-up), computed here by hand, and says so on stderr."""
    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=4096, seed=0))
    tcfg = TrainerConfig(tokens=256 * 400, batch_tokens=256, warmup_steps=2, log_every_steps=100,
                         keep_checkpoints=0)
    train(store_path=store, out_dir=tmp_path / "run", sae_cfg=SAEConfig(d_in=32, n_latents=64, k=4),
          trainer_cfg=tcfg, progress=False, wandb_cfg={"enabled": False})
    expected = 2e-4 / np.sqrt(64 / 2**14) * np.sqrt(24_000 / 400)  # 7.75x: inside the clip
    assert [r["train/lr"] for r in _log(tmp_path / "run")] == pytest.approx([expected] * 4)
    err = capsys.readouterr().err
    assert f"lr {expected:.3g}" in err and "x 7.75 for a 400-step run" in err, err


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

    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=4096))
    sae_kw = dict(d_in=32, n_latents=128, k=4, dead_tokens=256, normalize="layer_norm")
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
    n_before = len(_log(killed))
    assert 23 <= n_before < 400
    kw = dict(store_path=store, seed=1, progress=False, wandb_cfg={"enabled": False})
    train(out_dir=killed, sae_cfg=SAEConfig(**sae_kw), trainer_cfg=TrainerConfig(**tr_kw), **kw)
    ref = tmp_path / "ref"
    train(out_dir=ref, sae_cfg=SAEConfig(**sae_kw), trainer_cfg=TrainerConfig(**tr_kw), **kw)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    assert strip(_log(killed)) == strip(_log(ref))
    wk = load_file(str(killed / "sae" / "sae_weights.safetensors"))
    wr = load_file(str(ref / "sae" / "sae_weights.safetensors"))
    for name in wr:
        assert torch.equal(wk[name], wr[name]), name


def test_resume_with_a_changed_configuration_names_what_changed(tmp_path):
    """Checkpoints made with n_latents=128 are not silently resumed with n_latents=64."""
    x = _sparse_dictionary_data(n_tokens=4096)
    store = _store(tmp_path, x)
    out = tmp_path / "run"
    tcfg = TrainerConfig(tokens=256 * 20, batch_tokens=256, checkpoint_every_steps=5, max_steps=6,
                         warmup_steps=0)
    train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, n_latents=128, k=4), trainer_cfg=tcfg,
          progress=False, wandb_cfg={"enabled": False})
    with pytest.raises(ValueError, match=r"n_latents: recorded 128 != now 64"):
        train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, n_latents=64, k=4), trainer_cfg=tcfg,
              progress=False, wandb_cfg={"enabled": False})


def test_auxk_first_activation_is_logged_and_an_unreachable_threshold_warned(tmp_path, capsys):
    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=8192, seed=5))
    kw = dict(store_path=store, progress=False, wandb_cfg={"enabled": False})
    out = tmp_path / "run"
    train(out_dir=out, sae_cfg=SAEConfig(d_in=32, n_latents=512, k=4, dead_tokens=1024),
          trainer_cfg=TrainerConfig(tokens=256 * 40, batch_tokens=256, lr=5e-3, log_every_steps=2), **kw)
    err = capsys.readouterr().err
    st = json.loads((out / "sae" / "training_state.json").read_text())
    first = next(r["step"] for r in _log(out) if r["train/auxk_loss"] > 0)  # logged every 2 steps
    assert st["auxk_active_from_step"] == first
    assert f"AuxK active from step {first} ({first * 256} tokens)" in err and "warning" not in err
    # a dead threshold the run cannot reach: said up front, and AuxK indeed never runs
    out2 = tmp_path / "run2"
    train(out_dir=out2, sae_cfg=SAEConfig(d_in=32, n_latents=512, k=4, dead_tokens=10_000_000),
          trainer_cfg=TrainerConfig(tokens=256 * 8, batch_tokens=256, log_every_steps=1), **kw)
    err = capsys.readouterr().err
    assert "sae.dead_tokens=10000000 >= the run's 2048 tokens" in err and "AuxK active" not in err
    assert all(r["train/auxk_loss"] == 0 for r in _log(out2))
    assert json.loads((out2 / "sae" / "training_state.json").read_text())["auxk_active_from_step"] is None


def test_dead_tokens_default_is_a_tenth_of_the_run_capped_at_the_papers_10m(tmp_path):
    from sae_dist.sae.config import resolve_dead_tokens

    assert resolve_dead_tokens(None, 1_600_000) == 160_000
    assert resolve_dead_tokens(None, 8_000_000_000) == 10_000_000  # the paper's threshold in a long run
    assert resolve_dead_tokens(None, 5) == 1 and resolve_dead_tokens(250_000, 1_600_000) == 250_000
    with pytest.raises(ValueError, match="dead_tokens=0 must be an int >= 1, or null"):
        SAEConfig(d_in=8, n_latents=16, k=2, dead_tokens=0)
    # null in a 40-step run of 256 tokens = a threshold of 1024 tokens: the same run as an explicit 1024
    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=8192, seed=5))
    kw = dict(store_path=store, progress=False, wandb_cfg={"enabled": False},
              trainer_cfg=TrainerConfig(tokens=256 * 40, batch_tokens=256, lr=5e-3, log_every_steps=2))
    logs = []
    for name, dead in (("auto", None), ("explicit", 1024)):
        train(out_dir=tmp_path / name, sae_cfg=SAEConfig(d_in=32, n_latents=512, k=4, dead_tokens=dead), **kw)
        st = json.loads((tmp_path / name / "sae" / "training_state.json").read_text())
        assert st["dead_tokens"] == 1024 and st["auxk_active_from_step"] is not None
        logs.append([{k: v for k, v in r.items() if k.startswith("train/") and k != "train/tokens_per_s"}
                     for r in _log(tmp_path / name)])
    assert logs[0] == logs[1]


def test_deterministic_runs_are_bit_identical_and_the_mode_is_scoped(tmp_path, monkeypatch):
    import sae_dist.train.trainer as trainer_mod

    store = _store(tmp_path, _sparse_dictionary_data(n_tokens=8192, seed=7))
    seen = []
    lr_at_step = trainer_mod.lr_at_step

    def spy(*a, **k):  # called once per step, inside the training loop
        seen.append(torch.are_deterministic_algorithms_enabled())
        return lr_at_step(*a, **k)

    monkeypatch.setattr(trainer_mod, "lr_at_step", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    runs = []
    for name in ("a", "b"):
        train(store_path=store, out_dir=tmp_path / name, progress=False, wandb_cfg={"enabled": False},
              sae_cfg=SAEConfig(d_in=32, n_latents=256, k=4, dead_tokens=512, multi_topk=True),
              trainer_cfg=TrainerConfig(tokens=256 * 24, batch_tokens=256, lr=5e-3, log_every_steps=1,
                                        deterministic=True))
        w = load_file(str(tmp_path / name / "sae" / "sae_weights.safetensors"))
        log = [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in _log(tmp_path / name)]
        runs.append((w, log))
    assert seen == [True] * 48 and not torch.are_deterministic_algorithms_enabled()  # restored after the run
    (w0, log0), (w1, log1) = runs
    assert log0 == log1 and len(log0) == 24 and log0[-1]["train/auxk_loss"] > 0
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
