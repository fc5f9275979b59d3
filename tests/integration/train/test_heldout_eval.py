"""sae-train's held-out evaluation (sae_dist.train.heldout): every trainer.eval_every_steps steps the LM's CE and
KL with the SAE spliced in, on the first trainer.eval_contexts held-out contexts of the store's text, logged to
train_log.jsonl (eval/...) and to wandb under SAELens' names; the values at the last step are those of
`downstream_loss` run independently on the exported SAE, also when the SAE's latents are sharded over
tensor-parallel ranks (never gathered: the shards are spliced in together). Without a local LM the run trains the
same with the evaluation off and says so."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import wandb
import zarr
from helpers.dist import run_train_ranks
from helpers.harvest import CTX, HOOK, run_harvest
from helpers.synthetic import tiny_corpus
from helpers.train import WandbRecorder, train_log

from sae_dist.eval.downstream import downstream_loss
from sae_dist.harvest.text import iter_documents, packed_sequences
from sae_dist.sae.export import load_sae

EVAL_FRACTION, CONTEXTS = 0.5, 4


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    """A store of the tiny LM over 8 short documents (half held out), and the corpus file it names."""
    d = tmp_path_factory.mktemp("heldout")
    corpus = d / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(n_files=8, max_chars=4000)))
    run_harvest(lm, d / "acts.zarr", list(iter_documents("json", data_files=str(corpus))), tokens=2400,
                eval_fraction=EVAL_FRACTION, attrs={"dataset": "json"})
    return d / "acts.zarr", corpus


def _train_args(run, store_path, corpus, wandb_mode="offline"):
    return [f"run_dir={run}", f"store.path={store_path}", "device=cpu", "seed=0", "data.dataset=json",
            f"data.data_files={corpus}", "sae.d_sae=64", "sae.k=4", "sae.dead_tokens=480", "trainer.tokens=1200",
            "trainer.batch_tokens=120", "trainer.log_every_steps=2", "trainer.eval_every_steps=2",
            f"trainer.eval_contexts={CONTEXTS}", "trainer.keep_checkpoints=0", f"wandb.mode={wandb_mode}"]


def _sae_train(console_script, run, store_path, corpus):
    return console_script("sae-train", *_train_args(run, store_path, corpus))


def _reference(lm, corpus, sae_dir):
    """`downstream_loss` of the exported SAE at `sae_dir` spliced into the LM, on the first CONTEXTS held-out
    contexts of the corpus (its eval split packed as the harvest packs text)."""
    model, tok = lm
    docs = iter_documents("json", data_files=str(corpus))
    seqs = [s for _, s in zip(range(CONTEXTS), packed_sequences(docs, tok, CTX, eval_fraction=EVAL_FRACTION,
                                                                 split="eval"), strict=False)]
    return downstream_loss(model, load_sae(sae_dir), HOOK, torch.tensor(seqs))


def _train_records(run):
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in train_log(run) if "train/loss" in r]


def test_held_out_ce_and_kl_during_training(lm, store, tmp_path, console_script, monkeypatch):
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(WandbRecorder(**kw)) or runs[-1])
    store_path, corpus = store
    proc = _sae_train(console_script, tmp_path / "run", store_path, corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in train_log(tmp_path / "run") if "eval/ce_loss_score" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]

    ref = _reference(lm, corpus, tmp_path / "run" / "sae")
    assert ref["ce_tokens"] == CONTEXTS * (CTX - 2) and ref["ce_loss_sae"] > ref["ce_loss_clean"]
    assert evals[-1] == {"step": 10, "tokens": 1200, **{f"eval/{k}": v for k, v in ref.items()}}
    assert evals[0]["eval/ce_loss_clean"] == ref["ce_loss_clean"] != evals[0]["eval/ce_loss_sae"] != ref["ce_loss_sae"]

    (wb,) = runs  # wandb: SAELens' in-training evaluator's groups and names
    logged = [(s, m) for s, m in wb.logged if "model_performance_preservation" in m]
    assert [s for s, _ in logged] == [2, 4, 6, 8, 10]
    assert logged[-1][1] == {
        "model_performance_preservation": {
            "ce_loss_score": ref["ce_loss_score"], "ce_loss_with_sae": ref["ce_loss_sae"],
            "ce_loss_without_sae": ref["ce_loss_clean"], "ce_loss_with_ablation": ref["ce_loss_zero_ablation"]},
        "model_behavior_preservation": {
            "kl_div_score": 1 - ref["kl_div"] / ref["kl_div_zero_ablation"], "kl_div_with_sae": ref["kl_div"],
            "kl_div_with_ablation": ref["kl_div_zero_ablation"]}}

    # the same store naming an LM that is neither a directory nor in the hub cache: trained alike, no evaluation
    other = tmp_path / "other.zarr"
    shutil.copytree(store_path, other)
    zarr.open_group(str(other), mode="r+").attrs["model"] = "nobody/no-such-lm"
    proc = _sae_train(console_script, tmp_path / "off", other, corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("sae-train: held-out evaluation off (trainer.eval_every_steps): the LM model.name=nobody/no-such-lm does "
            "not load from local files (a directory or the hub cache): OSError: ") in proc.stderr
    assert not [r for r in train_log(tmp_path / "off") if "eval/ce_loss_score" in r]
    assert _train_records(tmp_path / "off") == _train_records(tmp_path / "run")
    # rerun once finished: nothing left to train, so the LM is not even tried (no notice)
    proc = _sae_train(console_script, tmp_path / "off", other, corpus)
    assert proc.returncode == 0 and "held-out evaluation off" not in proc.stderr, proc.stderr[-3000:]


def test_a_run_streamed_from_the_lm_evaluates_on_its_held_out_text(lm, tiny_lm_dir, store, tmp_path, console_script):
    """source=lm: the evaluation loads its own copy of the streamed LM (the stream runs its copy in a background
    thread) and uses the data.* text, held-out split and context length."""
    _, corpus = store
    proc = console_script("sae-train", f"run_dir={tmp_path}", "source=lm", f"model.name={tiny_lm_dir}", "device=cpu",
                          "data.dataset=json", f"data.data_files={corpus}", f"data.ctx_len={CTX}",
                          f"data.eval_fraction={EVAL_FRACTION}", "stream.buffer_tokens=240", "sae.d_sae=64", "sae.k=4",
                          "sae.dead_tokens=480", "trainer.tokens=1200", "trainer.batch_tokens=120",
                          "trainer.eval_every_steps=5", f"trainer.eval_contexts={CONTEXTS}",
                          "trainer.keep_checkpoints=0", "wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in train_log(tmp_path) if "eval/ce_loss_score" in r]
    ref = _reference(lm, corpus, tmp_path / "sae")
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1] == {"step": 10, "tokens": 1200, **{f"eval/{k}": v for k, v in ref.items()}}


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for run_train_ranks
def test_a_latent_sharded_run_splices_its_shards_together(lm, store, tmp_path):
    """parallel.tp=2 x dp=2 (4 gloo processes) with the EMA: the tp ranks of dp replica 0 each run the LM and
    splice their latent shards in together (exact global TopK, decodes summed over tp); dp replica 1 waits. The
    logged values equal `downstream_loss` of the exported SAE (gathered from the shards) to float rounding."""
    store_path, corpus = store
    run = tmp_path / "run"
    out = run_train_ranks([*_train_args(run, store_path, corpus, "disabled"), "parallel.tp=2", "trainer.ema=true"],
                          run, nproc=4)
    assert "held-out evaluation off" not in out
    evals = [r for r in train_log(run) if "eval/ce_loss_score" in r]
    assert [(r["step"], r["tokens"]) for r in evals] == [(s, 120 * s) for s in (2, 4, 6, 8, 10)]
    state = json.loads((run / "sae" / "training_state.json").read_text())
    assert state["parallel"] == {"tp": 2, "dp": 2} and state["used_ema"]

    ref = _reference(lm, corpus, run / "sae")
    got = {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    assert got.keys() == ref.keys() and got["ce_tokens"] == ref["ce_tokens"]
    assert ref["ce_loss_sae"] - ref["ce_loss_clean"] > 1e-3 and ref["kl_div"] > 1e-4  # the SAE changes the LM
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_after_train_evaluates_with_the_stores_lm_loaded_once(store, tmp_path, console_script, monkeypatch):
    """eval.after_train: eval.json comes from the store's LM on the store's text (the command line names no model,
    so the config's default model is not the one), and the LM the held-out evaluation loaded during training is
    used again rather than loaded a second time; with that evaluation off, the store's LM is loaded once."""
    import sae_dist.cli as cli

    loads, real = [], cli.load_configured_lm
    monkeypatch.setattr(cli, "load_configured_lm",
                        lambda cfg, *a, **kw: loads.append(cfg.model.name) or real(cfg, *a, **kw))
    store_path, corpus = store
    model = zarr.open_group(str(store_path), mode="r").attrs["model"]
    for every, run in ((2, tmp_path / "held"), (0, tmp_path / "off")):
        loads.clear()
        proc = console_script("sae-train", *_train_args(run, store_path, corpus, "disabled"), "eval.after_train=true",
                              f"trainer.eval_every_steps={every}", "eval.eval_tokens=240", "eval.batch_size=16")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert loads == [model], (every, loads)
        ev = json.loads((run / "eval.json").read_text())
        assert ev["model"] == model and ev["hook_name"] == HOOK and 0 < ev["fvu"] < 2
    assert [r["step"] for r in train_log(tmp_path / "held") if "eval/ce_loss_score" in r] == [2, 4, 6, 8, 10]
