"""Trainer in this process on synthetic stores made from a known sparse dictionary: exact resume (an
interrupted run, torn checkpoints), errors (store width mismatch, NaN batches, a changed configuration), the
config's validation and the default learning rate, AuxK's first activation and the dead-token threshold,
deterministic runs. Learning, export and wandb's offline files (written by wandb's service process) and a
resume after a real SIGKILL: tests/integration/train/test_trainer_processes.py."""

import dataclasses
import json

import numpy as np
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


def _resume_cfgs(max_steps=None):
    sae_cfg = SAEConfig(d_in=32, d_sae=256, k=4, dead_tokens=128, normalize="scalar",
                        multi_topk=True, multi_topk_factor=2)
    tcfg = TrainerConfig(tokens=128 * 30, batch_tokens=128, lr=4e-3, warmup_steps=3, lr_decay_frac=0.3,
                         ema=True, ema_decay=0.9, grad_clip_norm=1.0, checkpoint_every_steps=8,
                         keep_checkpoints=2, log_every_steps=1, max_steps=max_steps, prefetch=2)
    return sae_cfg, tcfg


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=3000))  # several epochs too
    kw = dict(store_path=store, progress=False, seed=3, wandb_cfg={"enabled": False})
    a = tmp_path / "a"
    train(out_dir=a, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs()[1], **kw)
    b = tmp_path / "b"
    r1 = train(out_dir=b, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs(max_steps=19)[1], **kw)
    assert r1["stopped_early"] and r1["steps"] == 19 and not (b / "sae").exists()
    assert len(train_log(b)) == 19  # logged past the last checkpoint (16): those lines get replaced
    # a save killed midway leaves a temporary directory and/or a step directory without DCP's
    # .metadata: both must be ignored, resume starts from step 16
    (b / "checkpoints" / ".tmp_step_00000024").mkdir()
    (b / "checkpoints" / ".tmp_step_00000024" / "__0_0.distcp").write_bytes(b"torn")
    (b / "checkpoints" / "step_00000024").mkdir()
    r2 = train(out_dir=b, sae_cfg=_resume_cfgs()[0], trainer_cfg=_resume_cfgs()[1], **kw)
    assert not r2["stopped_early"] and r2["steps"] == 30

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]

    la, lb = strip(train_log(a)), strip(train_log(b))
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


def test_width_mismatch_and_nan_batch(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path, torch.randn(2048, 24))
    with pytest.raises(ValueError, match="store d_in 24 != SAE d_in 32"):
        train(store_path=store, out_dir=tmp_path / "r", sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4),
              trainer_cfg=TrainerConfig(tokens=1024, batch_tokens=256), progress=False,
              wandb_cfg={"enabled": False})

    # a NaN written into the store behind write_store's back: the reader's check names the rows,
    # the trainer names the step
    import zarr

    bad = torch.randn(2048, 24)
    nan_store = synthetic_store(tmp_path, bad, name="nan_store")
    zarr.open_group(nan_store, mode="r+")["activations"][1500, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch of step \d+"):
        train(store_path=nan_store, out_dir=tmp_path / "n0",
              sae_cfg=SAEConfig(d_in=24, d_sae=64, k=4, b_dec_init="zeros"),
              trainer_cfg=TrainerConfig(tokens=2048, batch_tokens=256), progress=False,
              wandb_cfg={"enabled": False})
    with pytest.raises(FloatingPointError, match="b_dec sample"):
        train(store_path=nan_store, out_dir=tmp_path / "n1", sae_cfg=SAEConfig(d_in=24, d_sae=64, k=4),
              trainer_cfg=TrainerConfig(tokens=2048, batch_tokens=256, b_dec_sample_tokens=2048),
              progress=False, wandb_cfg={"enabled": False})

    # a store that yields a NaN batch at the third step (the real reader refuses NaN itself)
    class NaNStore:
        d_in, attrs, scale = 24, {}, None

        def __init__(self, *a, **k):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            x = torch.randn(256, 24)
            if self.i == 3:  # main store: steps 0, 1 fine, step 2 NaN (the b_dec sampler reads 1 batch)
                x[5, 3] = float("nan")
            return x

        def state_dict(self):
            return {}

    import sae_dist.train.trainer as tr

    stores = iter([NaNStore(), NaNStore()])
    monkeypatch.setattr(tr, "_open_store", lambda *a, **k: next(stores))
    with pytest.raises(FloatingPointError, match="step 2"):
        train(store_path=store, out_dir=tmp_path / "n", sae_cfg=SAEConfig(d_in=24, d_sae=64, k=4),
              trainer_cfg=TrainerConfig(tokens=256 * 10, batch_tokens=256, b_dec_sample_tokens=256),
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
    with pytest.raises(ValueError, match="d_sae must be > 0, got 0"):
        sae_dist.train.default_lr(0, 100)
    with pytest.raises(ValueError, match="n_steps must be > 0, got 0"):
        sae_dist.train.default_lr(1024, 0)
    lr = [sae_dist.train.lr_at_step(s, 10, 1.0, warmup_steps=2, decay_frac=0.4) for s in range(10)]
    np.testing.assert_allclose(lr, [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])


def test_default_lr_is_the_budget_rule_and_is_announced(tmp_path, capsys):
    """trainer.lr=null trains at 2e-4 / sqrt(n / 2^14) * clip(sqrt(24000 / steps), 1, 12) (after the
    warm-up), computed here by hand, and says so on stderr."""
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=4096, seed=0))
    tcfg = TrainerConfig(tokens=256 * 400, batch_tokens=256, warmup_steps=2, log_every_steps=100,
                         keep_checkpoints=0)
    train(store_path=store, out_dir=tmp_path / "run", sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4),
          trainer_cfg=tcfg, progress=False, wandb_cfg={"enabled": False})
    expected = 2e-4 / np.sqrt(64 / 2**14) * np.sqrt(24_000 / 400)  # 7.75x: inside the clip
    assert [r["train/lr"] for r in train_log(tmp_path / "run")] == pytest.approx([expected] * 4)
    err = capsys.readouterr().err
    assert f"lr {expected:.3g}" in err and "x 7.75 for a 400-step run" in err, err


def test_resume_with_a_changed_configuration_names_what_changed(tmp_path):
    """Checkpoints made with d_sae=128 are not silently resumed with d_sae=64."""
    x = sparse_dictionary_data(n_tokens=4096)
    store = synthetic_store(tmp_path, x)
    out = tmp_path / "run"
    tcfg = TrainerConfig(tokens=256 * 20, batch_tokens=256, checkpoint_every_steps=5, max_steps=6,
                         warmup_steps=0)
    train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=128, k=4), trainer_cfg=tcfg,
          progress=False, wandb_cfg={"enabled": False})
    with pytest.raises(ValueError, match=r"d_sae: recorded 128 != now 64"):
        train(store_path=store, out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4), trainer_cfg=tcfg,
              progress=False, wandb_cfg={"enabled": False})


def test_checkpoints_of_an_earlier_release_resume_under_the_renamed_keys(tmp_path):
    """run_identity.json written before the renames (n_latents, store d_model / hook) resumes: the old
    names are read as d_sae, d_in, hook_name; a really changed width is still refused."""
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=4096))
    out = tmp_path / "run"
    tcfg = TrainerConfig(tokens=256 * 12, batch_tokens=256, checkpoint_every_steps=5, max_steps=6, warmup_steps=0)
    run = dict(store_path=store, out_dir=out, progress=False, wandb_cfg={"enabled": False})
    train(sae_cfg=SAEConfig(d_in=32, d_sae=128, k=4), trainer_cfg=tcfg, **run)
    path = out / "checkpoints" / "run_identity.json"
    ident = json.loads(path.read_text())
    assert ident["d_sae"] == 128 and ident["store"]["d_in"] == 32
    ident["n_latents"] = ident.pop("d_sae")
    ident["store"]["d_model"] = ident["store"].pop("d_in")
    ident["store"]["hook"] = ident["store"].pop("hook_name")
    path.write_text(json.dumps(ident))
    with pytest.raises(ValueError, match=r"d_sae: recorded 128 != now 64"):
        train(sae_cfg=SAEConfig(d_in=32, d_sae=64, k=4), trainer_cfg=tcfg, **run)
    res = train(sae_cfg=SAEConfig(d_in=32, d_sae=128, k=4), trainer_cfg=dataclasses.replace(tcfg, max_steps=None),
                **run)
    assert res["tokens_trained"] == 256 * 12 and train_log(out)[-1]["step"] == 12


def test_auxk_first_activation_is_logged_and_an_unreachable_threshold_warned(tmp_path, capsys):
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=8192, seed=5))
    kw = dict(store_path=store, progress=False, wandb_cfg={"enabled": False})
    out = tmp_path / "run"
    train(out_dir=out, sae_cfg=SAEConfig(d_in=32, d_sae=512, k=4, dead_tokens=1024),
          trainer_cfg=TrainerConfig(tokens=256 * 40, batch_tokens=256, lr=5e-3, log_every_steps=2), **kw)
    err = capsys.readouterr().err
    st = json.loads((out / "sae" / "training_state.json").read_text())
    first = next(r["step"] for r in train_log(out) if r["train/auxk_loss"] > 0)  # logged every 2 steps
    assert st["auxk_active_from_step"] == first
    assert f"AuxK active from step {first} ({first * 256} tokens)" in err and "warning" not in err
    # a dead threshold the run cannot reach: said up front, and AuxK indeed never runs
    out2 = tmp_path / "run2"
    train(out_dir=out2, sae_cfg=SAEConfig(d_in=32, d_sae=512, k=4, dead_tokens=10_000_000),
          trainer_cfg=TrainerConfig(tokens=256 * 8, batch_tokens=256, log_every_steps=1), **kw)
    err = capsys.readouterr().err
    assert "sae.dead_tokens=10000000 >= the run's 2048 tokens" in err and "AuxK active" not in err
    assert all(r["train/auxk_loss"] == 0 for r in train_log(out2))
    assert json.loads((out2 / "sae" / "training_state.json").read_text())["auxk_active_from_step"] is None


def test_dead_tokens_default_is_a_tenth_of_the_run_capped_at_the_papers_10m(tmp_path):
    from sae_dist.sae.config import resolve_dead_tokens

    assert resolve_dead_tokens(None, 1_600_000) == 160_000
    assert resolve_dead_tokens(None, 8_000_000_000) == 10_000_000  # the paper's threshold in a long run
    assert resolve_dead_tokens(None, 5) == 1 and resolve_dead_tokens(250_000, 1_600_000) == 250_000
    with pytest.raises(ValueError, match="dead_tokens=0 must be an int >= 1, or null"):
        SAEConfig(d_in=8, d_sae=16, k=2, dead_tokens=0)
    # null in a 40-step run of 256 tokens = a threshold of 1024 tokens: the same run as an explicit 1024
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=8192, seed=5))
    kw = dict(store_path=store, progress=False, wandb_cfg={"enabled": False},
              trainer_cfg=TrainerConfig(tokens=256 * 40, batch_tokens=256, lr=5e-3, log_every_steps=2))
    logs = []
    for name, dead in (("auto", None), ("explicit", 1024)):
        train(out_dir=tmp_path / name, sae_cfg=SAEConfig(d_in=32, d_sae=512, k=4, dead_tokens=dead), **kw)
        st = json.loads((tmp_path / name / "sae" / "training_state.json").read_text())
        assert st["dead_tokens"] == 1024 and st["auxk_active_from_step"] is not None
        logs.append([{k: v for k, v in r.items() if k.startswith("train/") and k != "train/tokens_per_s"}
                     for r in train_log(tmp_path / name)])
    assert logs[0] == logs[1]


def test_deterministic_runs_are_bit_identical_and_the_mode_is_scoped(tmp_path, monkeypatch):
    import sae_dist.train.trainer as trainer_mod

    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=8192, seed=7))
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
              sae_cfg=SAEConfig(d_in=32, d_sae=256, k=4, dead_tokens=512, multi_topk=True),
              trainer_cfg=TrainerConfig(tokens=256 * 24, batch_tokens=256, lr=5e-3, log_every_steps=1,
                                        deterministic=True))
        w = load_file(str(tmp_path / name / "sae" / "sae_weights.safetensors"))
        log = [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in train_log(tmp_path / name)]
        runs.append((w, log))
    assert seen == [True] * 48 and not torch.are_deterministic_algorithms_enabled()  # restored after the run
    (w0, log0), (w1, log1) = runs
    assert log0 == log1 and len(log0) == 24 and log0[-1]["train/auxk_loss"] > 0
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_rng_state_holds_the_current_cuda_device_only(monkeypatch):
    """With CUDA the trainer's RNG states hold the current device's generator only, so a job resumed on
    fewer visible GPUs restores it (one state per visible device made `set_rng_state_all` index past the
    devices); an older checkpoint's per-device list restores the current device's entry, if saved. CUDA's
    generator functions are stand-ins that record what is restored."""
    from sae_dist.train import trainer as tr

    state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s.tolist()))
    st = tr._rng_state()
    assert torch.equal(st["cuda"], state)
    tr._set_rng_state(st)
    tr._set_rng_state({**st, "cuda": [state + i for i in range(8)]})  # saved by a process that saw 8 GPUs
    tr._set_rng_state({**st, "cuda": [state + 5]})  # saw one GPU: nothing saved for cuda:1
    assert restored == [state.tolist(), (state + 1).tolist()]
