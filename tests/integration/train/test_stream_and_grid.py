"""Training straight from the LM (`train(source=LMStream...)`, sae-train source=lm) and shared sweeps
(`train_grid`, sae-train grid=[...]): a streamed run resumes exactly and reaches the quality of a run on a
store harvested from the same text; a point of a shared sweep ends with the weights and log of its standalone
run, also when the sweep is interrupted and its points resume from different steps."""

import functools

import numpy as np
import pytest
import torch
from helpers.harvest import BODY, CTX, EVAL, HOOK, run_harvest
from helpers.synthetic import tiny_corpus
from helpers.train import offline_one_thread, sparse_dictionary_data, synthetic_store, train_log
from safetensors.torch import load_file

import sae_dist
from sae_dist.harvest.stream import LMStream
from sae_dist.harvest.text import packed_sequences
from sae_dist.sae import SAEConfig
from sae_dist.train import TrainerConfig, train
from sae_dist.train.trainer import GridPoint, train_grid


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    yield from offline_one_thread(monkeypatch)


@pytest.fixture(scope="module")
def docs():
    return tiny_corpus(n_files=6, max_chars=20_000)


def _source(lm, docs, buffer_seqs=32):
    model, tok = lm
    return functools.partial(LMStream, model=model, tokenizer=tok, hook_name=HOOK, docs=lambda: docs, ctx_len=CTX,
                             eval_fraction=EVAL, buffer_tokens=buffer_seqs * BODY, lm_batch_size=16,
                             attrs={"model": "tiny", "dataset": "tiny"})


def _weights(out):
    return load_file(str(out / "sae" / "sae_weights.safetensors"))


def _no_speed(log):
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in log]


def test_streamed_run_resumes_exactly(lm, docs, tmp_path):
    sae_cfg = SAEConfig(d_in=32, d_sae=1024, k=2, dead_tokens=240)
    tcfg = dict(tokens=12 * 120, batch_tokens=120, lr=3e-3, checkpoint_every_steps=4, log_every_steps=1)
    kw = dict(source=_source(lm, docs, buffer_seqs=16), sae_cfg=sae_cfg, progress=False, seed=2,
              wandb_cfg={"enabled": False})
    full = train(out_dir=tmp_path / "full", trainer_cfg=TrainerConfig(**tcfg), **kw)
    part = train(out_dir=tmp_path / "part", trainer_cfg=TrainerConfig(**tcfg, max_steps=6), **kw)
    assert part["stopped_early"] and part["steps"] == 6
    resumed = train(out_dir=tmp_path / "part", trainer_cfg=TrainerConfig(**tcfg), **kw)  # from step 4
    assert resumed["steps"] == full["steps"] == 12
    assert full["metrics"]["train/auxk_loss"] > 0  # AuxK ran, so the resumed RNG and counters mattered
    for k, w in _weights(tmp_path / "full").items():
        assert torch.equal(w, _weights(tmp_path / "part")[k]), k
    assert _no_speed(train_log(tmp_path / "full")) == _no_speed(train_log(tmp_path / "part"))


def _heldout_fvu(lm, docs, sae_dir) -> float:
    """fvu of the exported SAE on raw activations of held-out (eval split) text, by a full forward."""
    model, tok = lm
    seqs = list(packed_sequences(docs, tok, CTX, eval_fraction=EVAL, split="eval"))[:200]
    with torch.no_grad():
        x = model(input_ids=torch.tensor(seqs), output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, 32)
        xh = sae_dist.load_sae(sae_dir)(x)
    x, xh = x.double(), xh.double()
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_streamed_run_matches_a_run_on_a_harvested_store(lm, docs, tmp_path):
    tokens = 40 * 240
    run_harvest(lm, tmp_path / "s.zarr", docs, tokens=tokens, seqs_per_shard=64, seqs_per_chunk=8, batch_size=16)
    sae_cfg = SAEConfig(d_in=32, d_sae=128, k=4)
    tcfg = TrainerConfig(tokens=tokens, batch_tokens=240, lr=3e-3, keep_checkpoints=0, b_dec_sample_tokens=960)
    kw = dict(sae_cfg=sae_cfg, trainer_cfg=tcfg, progress=False, wandb_cfg={"enabled": False})
    train(store_path=tmp_path / "s.zarr", out_dir=tmp_path / "store_run", **kw)
    train(source=_source(lm, docs, buffer_seqs=128), out_dir=tmp_path / "lm_run", **kw)
    f_store = _heldout_fvu(lm, docs, tmp_path / "store_run" / "sae")
    f_lm = _heldout_fvu(lm, docs, tmp_path / "lm_run" / "sae")
    assert f_store < 0.5
    print(f"held-out fvu: store {f_store:.4f}, stream {f_lm:.4f}")
    assert abs(f_lm - f_store) <= 0.05 * f_store, (f_lm, f_store)


def _grid_points(tmp_path, tcfg):
    return [GridPoint(tmp_path / "grid" / "a", SAEConfig(d_in=32, d_sae=1024, k=2, dead_tokens=512), tcfg,
                      {"enabled": False}),
            GridPoint(tmp_path / "grid" / "b", SAEConfig(d_in=32, d_sae=512, k=4, dead_tokens=512),
                      TrainerConfig(**{**tcfg.__dict__, "lr": 1e-3}), {"enabled": False})]


def test_a_grid_point_equals_its_standalone_run_also_after_resumes(tmp_path):
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=8192, seed=5))
    tcfg = dict(tokens=24 * 256, batch_tokens=256, lr=3e-3, checkpoint_every_steps=4, log_every_steps=2)
    alone = [train(store_path=store, out_dir=tmp_path / name, sae_cfg=p.sae_cfg, trainer_cfg=p.trainer_cfg,
                   seed=1, progress=False, wandb_cfg={"enabled": False})
             for name, p in zip(("a", "b"), _grid_points(tmp_path, TrainerConfig(**tcfg)), strict=True)]
    assert alone[0]["metrics"]["train/auxk_loss"] > 0 and alone[1]["metrics"]["train/auxk_loss"] > 0
    # point b alone to step 12, then the grid to step 6 (a: checkpoint 4; b: still 12), then to the end:
    # the stream restarts at step 4 and b waits until step 12
    b = _grid_points(tmp_path, TrainerConfig(**tcfg, max_steps=12))[1]
    train(store_path=store, out_dir=b.out_dir, sae_cfg=b.sae_cfg, trainer_cfg=b.trainer_cfg, seed=1,
          progress=False, wandb_cfg={"enabled": False})
    part = train_grid(points=_grid_points(tmp_path, TrainerConfig(**tcfg, max_steps=6)), store_path=store, seed=1,
                      progress=False)
    assert [r["steps"] for r in part] == [6, 12]
    res = train_grid(points=_grid_points(tmp_path, TrainerConfig(**tcfg)), store_path=store, seed=1, progress=False)
    assert [r["steps"] for r in res] == [24, 24]
    for name in ("a", "b"):
        for k, w in _weights(tmp_path / name).items():
            assert torch.equal(w, _weights(tmp_path / "grid" / name)[k]), (name, k)
        assert _no_speed(train_log(tmp_path / name)) == _no_speed(train_log(tmp_path / "grid" / name))
    np.testing.assert_equal(res[1]["metrics"]["train/fvu"], alone[1]["metrics"]["train/fvu"])


def test_grid_points_must_share_the_batch_stream(tmp_path):
    store = synthetic_store(tmp_path, sparse_dictionary_data(n_tokens=4096, seed=5))
    points = _grid_points(tmp_path, TrainerConfig(tokens=2048, batch_tokens=256))
    points[1].trainer_cfg = TrainerConfig(tokens=2048, batch_tokens=512)
    with pytest.raises(ValueError, match="grid point 1 has trainer.batch_tokens=512 but point 0 has 256"):
        train_grid(points=points, store_path=store, progress=False)
    points[1] = GridPoint(points[0].out_dir, points[0].sae_cfg, points[0].trainer_cfg)
    with pytest.raises(ValueError, match="share a run directory"):
        train_grid(points=points, store_path=store, progress=False)
