"""End to end: the console scripts as a user runs them, on a tiny random Llama and the stdlib corpus.

These run the real Hydra apps in subprocesses (as `make demo` does) and check the CONTRACT outputs:
run-directory layout, SAE export files, every eval.json key; and recompute the reconstruction metric
through a different code path (hooks + load_sae + numpy) as an independent reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EVAL_KEYS = [
    "fvu", "normalized_mse", "explained_variance", "l0", "dead_fraction", "ce_loss_clean",
    "ce_loss_sae", "ce_loss_zero_ablation", "ce_loss_score", "kl_div", "tokens_trained",
    "d_sae", "k", "d_in", "hook_name", "model", "eval_tokens",
]

BIN = Path(sys.executable).parent


def _run(app: str, *overrides: str, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [str(BIN / app), *overrides], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{app} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _tiny(tiny_lm_dir: str, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.name={tiny_lm_dir}", "device=cpu", "seed=0", "data.ctx_len=32",
        "harvest.tokens=12000", "harvest.seqs_per_chunk=8", "harvest.seqs_per_shard=64",
        "harvest.batch_size=16", "sae.d_sae=256", "sae.k=8", "sae.dead_tokens=20000",
        "trainer.tokens=60000", "trainer.batch_tokens=512", "trainer.checkpoint_every_steps=40",
        "trainer.log_every_steps=10", "eval.eval_tokens=1024", "eval.batch_size=16",
    ]


@pytest.fixture(scope="module")
def pipeline_run(tiny_lm_dir, tmp_path_factory, worker_forkserver) -> Path:
    """The sae-pipeline command line run as an executable whose process is forked from the test forkserver
    (tests/helpers/prestarted.py: the same entry point, arguments and environment, without the ~5 s of
    imports of a fresh interpreter)."""
    from helpers.prestarted import prestarted_console_script

    root = tmp_path_factory.mktemp("pipe")
    run_dir = root / "run"
    with prestarted_console_script("sae-pipeline", root / "bin") as sae_pipeline:
        proc = _run(str(sae_pipeline), *_tiny(tiny_lm_dir, run_dir))  # an absolute path: BIN / it is it
    (run_dir / "stdout.txt").write_text(proc.stdout)
    return run_dir


@pytest.mark.slow
def test_pipeline_outputs_follow_the_contract(pipeline_run: Path):
    run = pipeline_run
    for rel in ["activations.zarr/zarr.json", "sae/cfg.json", "sae/sae_weights.safetensors",
                ".hydra/config.yaml", "eval.json"]:
        assert (run / rel).exists(), f"missing {rel}"
    assert any((run / "checkpoints").iterdir()), "no checkpoint written"
    ev = json.loads((run / "eval.json").read_text())
    missing = [k for k in EVAL_KEYS if k not in ev]
    assert not missing, f"eval.json lacks {missing}"
    for k in ["fvu", "normalized_mse", "explained_variance", "l0", "ce_loss_clean", "ce_loss_sae",
              "ce_loss_zero_ablation", "kl_div"]:
        assert math.isfinite(ev[k]), (k, ev[k])
    assert ev["d_sae"] == 256 and ev["k"] == 8 and ev["d_in"] == 32
    assert 60000 - 512 < ev["tokens_trained"] <= 60000  # whole steps of 512 tokens
    assert abs(ev["explained_variance"] - (1 - ev["fvu"])) < 1e-9
    assert 0 < ev["l0"] <= 8 + 1e-9
    assert 0.0 <= ev["dead_fraction"] <= 1.0
    # trained on the tiny LM's activations, the SAE must explain a clear part of the variance
    assert ev["fvu"] < 0.6, ev["fvu"]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    for k in ["architecture", "d_in", "d_sae", "k", "hook_name", "model_name", "dtype", "normalize_activations"]:
        assert k in cfg, k
    assert cfg["hook_name"] == ev["hook_name"] == "blocks.1.hook_resid_post"  # 3 layers: round(2*3/3)-1
    # the fields SAELens / SAEBench rebuild the activations from: 32-token contexts (data.ctx_len) with BOS at
    # position 0, which the harvest never stores (seqpos_slice), from the stdlib corpus, the LM unprocessed
    meta = {k: cfg["metadata"][k] for k in ("context_size", "prepend_bos", "seqpos_slice", "dataset_path",
                                            "model_from_pretrained_kwargs")}
    assert meta == {"context_size": 32, "prepend_bos": True, "seqpos_slice": [1, None], "dataset_path": "stdlib",
                    "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    assert all(cfg[k] == v for k, v in meta.items())
    out = (run / "stdout.txt").read_text()
    for label in ["tokens harvested", "fvu", "normalized mse", "L0", "dead fraction", "CE loss score"]:
        assert label in out, f"summary table lacks {label!r}"


def test_eval_fvu_matches_an_independent_recomputation(pipeline_run: Path, tiny_lm_dir: str):
    """fvu in eval.json == fvu recomputed with hooks + load_sae + numpy float64 on the same held-out text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sae_dist
    from sae_dist.harvest.hooks import run_to_hook
    from sae_dist.harvest.text import iter_documents, packed_sequences

    ev = json.loads((pipeline_run / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    sae = sae_dist.load_sae(pipeline_run / "sae")
    n_seqs = ev["eval_tokens"] // 31
    seqs = []
    for s in packed_sequences(iter_documents("stdlib"), tok, 32, eval_fraction=0.05, split="eval"):
        seqs.append(s)
        if len(seqs) == n_seqs:
            break
    ids = torch.tensor(seqs)
    with torch.no_grad():
        acts = run_to_hook(model, ev["hook_name"], ids)[:, 1:].reshape(-1, 32).float()
        recon = sae(acts)
    x = acts.double().numpy()
    r = recon.double().numpy()
    fvu = ((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(fvu - ev["fvu"]) < 1e-4 * max(1.0, fvu), (fvu, ev["fvu"])
    # the same in the per-token layer-normed space the SAE trained in (the paper's convention)
    mu = x.mean(1, keepdims=True)
    nrm = np.linalg.norm(x - mu, axis=1, keepdims=True) / np.sqrt(x.shape[1])
    xn, rn = (x - mu) / nrm, (r - mu) / nrm
    fvu_n = ((xn - rn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert abs(fvu_n - ev["fvu_normalized_inputs"]) < 1e-4, (fvu_n, ev["fvu_normalized_inputs"])


def test_help_lists_config_groups(console_script):
    # the sae-train command line, run in this process (conftest.py): the help text, not the process, is tested
    proc = console_script("sae-train", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for group in ["model", "data", "harvest", "sae", "trainer", "eval", "parallel"]:
        assert f"{group}:" in out or f"{group}/" in out or group in out.split(), group


def test_wrong_hook_lists_valid_names(tiny_lm_dir, tmp_path, console_script):
    # the sae-harvest command line, run in this process (conftest.py)
    proc = console_script("sae-harvest", *_tiny(tiny_lm_dir, tmp_path / "r"), "hook_name=blocks.7.hook_resid_post")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "blocks.7.hook_resid_post" in err
    # the valid names, written compactly as blocks.{0..2}.hook_{resid_pre,resid_post,attn_out,mlp_out}
    assert "blocks.{0..2}" in err
    assert all(kind in err for kind in ["resid_pre", "resid_post", "attn_out", "mlp_out"])


def test_hooks_and_hook_name_together_are_refused(tiny_lm_dir, tmp_path, console_script):
    """sae-harvest hooks=[...] hook_name=... names both and writes nothing; sae-pipeline refuses hooks=."""
    args = _tiny(tiny_lm_dir, tmp_path / "r")
    proc = console_script("sae-harvest", *args, "hooks=[blocks.0.hook_mlp_out]", "hook_name=blocks.1.hook_mlp_out")
    assert proc.returncode != 0 and "give one or the other" in proc.stderr + proc.stdout
    proc = console_script("sae-pipeline", *args, "hooks=[blocks.0.hook_mlp_out]")
    assert proc.returncode != 0 and "sae-pipeline trains one SAE" in proc.stderr + proc.stdout
    assert not (tmp_path / "r" / "activations.zarr").exists()


@pytest.mark.slow
def test_contract_train_command_on_a_write_store_store(tmp_path, console_script):
    """README's sae-train command, on a store written by write_store from arrays (the command line runs in
    this process, conftest.py: the store and the command are under test here, the process boundary in
    the pipeline run above)."""
    from sae_dist.store import write_store

    rng = np.random.default_rng(np.random.randint(2**31))
    d, n_atoms = 24, 64
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    coef = rng.exponential(size=(20000, n_atoms)) * (rng.random((20000, n_atoms)) < 4 / n_atoms)
    acts = (coef @ atoms + 0.01 * rng.normal(size=(20000, d))).astype(np.float32)
    store = write_store(tmp_path / "acts.zarr", acts, attrs={"model": "synthetic", "hook_name": "none"})
    run = tmp_path / "x"
    proc = console_script("sae-train", f"run_dir={run}", f"store.path={store}", "sae=topk", "sae.d_sae=128",
                          "sae.k=8", "trainer.tokens=80000", "trainer.batch_tokens=1024", "device=cpu", "seed=0")
    assert proc.returncode == 0, proc.stderr[-8000:]
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == d and cfg["d_sae"] == 128 and cfg["k"] == 8
    import torch

    import sae_dist

    sae = sae_dist.load_sae(run / "sae")
    x = torch.from_numpy(acts[:4000])
    with torch.no_grad():
        r = sae(x).double().numpy()
    xd = acts[:4000].astype(np.float64)
    fvu = ((xd - r) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert fvu < 0.5, fvu


def test_eval_refuses_an_sae_of_the_wrong_width(tiny_lm_dir: str, tmp_path, console_script):
    """An SAE trained on d=24 activations evaluated at a d=32 hook: the error names both numbers."""
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae
    from sae_dist.sae.topk import TopKSAE

    sae = TopKSAE(SAEConfig(d_in=24, d_sae=64, k=4, normalize="none"))
    export_sae(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name="tiny", normalize="none")
    # the sae-eval command line, run in this process (conftest.py)
    proc = console_script("sae-eval", f"run_dir={tmp_path / 'e'}", f"model.name={tiny_lm_dir}", "device=cpu",
                          f"sae_path={tmp_path / 'sae'}", "data.ctx_len=32", "eval.eval_tokens=256")
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "24" in err and "32" in err


@pytest.mark.slow
def test_torchrun_two_harvest_workers_and_two_hooks_equal_one(pipeline_run: Path, tiny_lm_dir, tmp_path):
    """`torchrun --nproc-per-node 2 sae-harvest hooks=[<the pipeline's hook>,blocks.0.hook_mlp_out] ...` writes
    one store per hook; the pipeline's hook's store is identical to the one the pipeline run's harvest (one
    worker, one hook, the same model, text and harvest options) wrote."""
    import zarr

    import sae_dist.store  # noqa: F401  (registers the bfloat16 zarr type)

    # the pipeline's options of the model, the text and the harvest (64 sequences of 31 tokens a shard)
    common = [o for o in _tiny(tiny_lm_dir, tmp_path / "two") if o.startswith(("run_dir=", "model.", "device=",
                                                                                "data.", "harvest."))]
    assert "harvest.seqs_per_shard=64" in common and "data.ctx_len=32" in common
    one = zarr.open_group(str(pipeline_run / "activations.zarr"), mode="r")
    hook = one.attrs["hook_name"]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29517",
         str(BIN / "sae-harvest"), *common, f"hooks=[{hook},blocks.0.hook_mlp_out]"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    stores = tmp_path / "two" / "activations.zarr"
    two = zarr.open_group(str(stores / hook), mode="r")
    mlp = zarr.open_group(str(stores / "blocks.0.hook_mlp_out"), mode="r")
    assert two.attrs["harvest"]["complete"] is True and mlp.attrs["harvest"]["complete"] is True
    for name in ["activations", "token_ids", "seq_index", "position"]:
        np.testing.assert_array_equal(one[name][:], two[name][:], err_msg=name)
        if name != "activations":
            np.testing.assert_array_equal(one[name][:], mlp[name][:], err_msg=name)
    assert mlp.attrs["hook_name"] == "blocks.0.hook_mlp_out" and mlp["activations"].shape == one["activations"].shape
    # both ranks wrote: shard markers from 2 workers cover every shard exactly once
    markers = sorted((stores / hook / "_progress").glob("shard_*.json"))
    assert len(markers) == -(-one["activations"].shape[0] // (64 * 31)) > 2
    assert {json.loads(m.read_text())["rank"] for m in markers} == {0, 1}


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for prestarted_console_script
def test_architecture_comparison_script(pipeline_run: Path, tiny_lm_dir: str, tmp_path):
    """launch/compare_architectures.sh as docs/architectures.md runs it, at toy size on the pipeline's
    store: every architecture trains through `sae-train -m`, is evaluated (eval.after_train=true), and
    lands in the comparison table with the exported format its method calls for. Its SAE_TRAIN is
    sae-train as tests/helpers/prestarted.py serves it: each of the script's five `sae-train -m` commands
    runs in a process forked from the test forkserver, not a fresh interpreter (~5 s of imports each)."""
    from helpers.prestarted import prestarted_console_script

    out = tmp_path / "cmp"
    with prestarted_console_script("sae-train", tmp_path / "bin") as sae_train:
        _compare_architectures(pipeline_run, tiny_lm_dir, out, sae_train)
    rows = json.loads((out / "compare.json").read_text())
    expect = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "relu": "standard",
              "prolu": "prolu", "jumprelu": "jumprelu", "soft_topk": "topk", "tree": "topk"}
    assert {r["architecture"]: r["exported"] for r in rows} == expect
    for r in rows:
        assert 0 < r["l0"] and math.isfinite(r["fvu"]) and math.isfinite(r["ce_loss_score"]), r
        if r["architecture"] in ("topk", "soft_topk", "tree"):  # hard TopK at inference
            assert r["l0"] <= 4 + 1e-9, r
    assert (out / "compare.png").stat().st_size > 10_000
    assert len((out / "compare.md").read_text().strip().splitlines()) == 2 + len(expect)


def _compare_architectures(pipeline_run: Path, tiny_lm_dir: str, out: Path, sae_train: Path) -> None:
    # wandb off: its start (~3 s a process, ~1 s a run) is most of a toy run here; the wandb offline files
    # and the sweep's shared group are checked in test_trainer_processes.py and test_scaling.py
    env = dict(os.environ, WANDB_MODE="disabled", N_LATENTS="128", TOKENS="10240", K_LIST="4",
               TARGET_L0="4", RELU_L1="1", PROLU_L1="1", EXTRA_K="4", SAE_TRAIN=str(sae_train))
    script = Path(__file__).resolve().parents[2] / "launch" / "compare_architectures.sh"
    proc = subprocess.run(
        [str(script), str(pipeline_run / "activations.zarr"), str(out), f"model.name={tiny_lm_dir}",
         "device=cpu", "seed=0", "data.ctx_len=32", "trainer.batch_tokens=512", "sae.dead_tokens=20000",
         "eval.eval_tokens=512", "eval.batch_size=16",
         # the shrinkage refinement (FISTA) is most of the evaluation of the dense relu / prolu codes
         "eval.shrinkage_tokens=256"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
