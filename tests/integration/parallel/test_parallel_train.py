"""`sae-train` under torchrun (gloo, CPU): meshes against the single-process run, checkpoints saved at
one mesh resumed at another, and a killed rank (fail fast, naming it; the rerun resumes with no lost or
repeated steps). Every run trains the same tiny SAE on a synthetic store made here.

The runs compared with the reference start their ranks as processes forked from the test forkserver
(`_run_ranks`: the `sae-train` entry point with torchrun's environment) rather than through torchrun,
whose agent and per-rank imports cost ~2 + 4 s a launch; torchrun itself runs where its behaviour is
under test (the killed rank).

Every run also logs feature-density windows of WINDOW steps (sae_dist.train.density: fire counts summed over dp,
gathered over tp); the comparisons include their summaries and the last window's per-latent values
(sparsity.safetensors), so a resume at another mesh also checks the window's counts in the checkpoint (the
checkpoint of step 40 is inside the window of steps 31-60)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.dist import run_train_ranks
from safetensors.torch import load_file

from sae_dist.store import write_store

pytestmark = pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for _run_ranks

BIN = Path(sys.executable).parent
STEPS, CKPT, WINDOW = 60, 20, 30
#: train_log.jsonl keys of a feature-density window's summaries
DENSITY = ("train/mean_log10_feature_density", "train/latents_density_below_1e-5", "train/latents_density_below_1e-6")
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pstore")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    D = torch.randn(96, 24, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    codes = (torch.rand(8192, 96, generator=g) < 0.06).float() * torch.rand(8192, 96, generator=g) * 3
    x = codes @ D + 0.05 * torch.randn(8192, 24, generator=g)
    path = root / "store.zarr"
    write_store(path, x, attrs={"hook_name": "blocks.0.hook_resid_post", "model": "synthetic"})
    return path


def _args(store, run_dir, extra=()):
    return [f"run_dir={run_dir}", f"store.path={store}", "sae.d_sae=384", "sae.k=4",
            "++sae.k_aux=8", "sae.dead_tokens=512", f"trainer.tokens={STEPS * 256}",
            "trainer.batch_tokens=256", f"trainer.checkpoint_every_steps={CKPT}",
            "trainer.keep_checkpoints=5", "trainer.log_every_steps=1", f"trainer.feature_density_every_steps={WINDOW}",
            "device=cpu", "seed=0",
            "wandb.mode=disabled", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "SAE_DIST_TIMEOUT_S": "60"}


def _train(store, run_dir, nproc=1, tp=1, extra=(), check=True, **popen):
    cmd = [str(BIN / "sae-train"), *_args(store, run_dir, extra), f"parallel.tp={tp}"]
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "--no-python", *cmd]
    if popen:
        return subprocess.Popen(cmd, env=_env(), **popen)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _run_ranks(store, run_dir, nproc=1, tp=1, extra=(), fail=False) -> str:
    """`_train(store, run_dir, nproc, tp, extra)` with the ranks forked from the forkserver of
    tests/conftest.py instead of started by torchrun (`helpers.dist.run_train_ranks`)."""
    return run_train_ranks([*_args(store, run_dir, extra), f"parallel.tp={tp}"], run_dir, nproc, fail=fail)


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "sae" / "sae_weights.safetensors"))


def _close(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1)), what
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/fvu", "train/auxk_loss", "train/l0", "train/dead_fraction"):
            assert abs(x[key] - y[key]) <= 1e-5 + 1e-5 * abs(y[key]), (what, x["step"], key, x[key], y[key])
            worst = max(worst, abs(x[key] - y[key]))
        assert [x.get(k) for k in DENSITY] == [y.get(k) for k in DENSITY], (what, x["step"])
        assert (DENSITY[0] in x) == (x["step"] % WINDOW == 0), (what, x["step"])
    return worst


def _same_density(run, reference, what):
    """The last window's per-latent log10 densities (gathered over tp, in latent order) equal the reference's."""
    got, want = (load_file(str(Path(r) / "sparsity.safetensors"))["sparsity"] for r in (run, reference))
    assert want.shape == (384,) and 0 < int((want < -9).sum()) < 384, "no rare latent: a weak comparison"
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The single-process run every mesh is compared with."""
    run = tmp_path_factory.mktemp("ref") / "single"
    _run_ranks(store, run)
    log = _log(run)
    assert any(r["train/auxk_loss"] > 0 for r in log), "AuxK never ran: the comparison would be weak"
    return run


@pytest.fixture(scope="module")
def tp2xdp2(store, tmp_path_factory):
    """A run from scratch at tp=2 x dp=2 (4 processes): compared with the reference, and the
    checkpoints that test_checkpoint_reshards_across_meshes resumes at other meshes."""
    run = tmp_path_factory.mktemp("tp2xdp2") / "run"
    _run_ranks(store, run, nproc=4, tp=2)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tp", [(2, 2), (2, 1), (4, 2)], ids=["tp2", "dp2", "tp2xdp2"])
def test_mesh_matches_single_process(store, reference, tmp_path, nproc, tp, request):
    if (nproc, tp) == (4, 2):
        run = request.getfixturevalue("tp2xdp2")
    else:
        run = tmp_path / "run"
        _run_ranks(store, run, nproc=nproc, tp=tp)
    worst = _close(_log(run), _log(reference), f"tp={tp} world={nproc}")
    _same_density(run, reference, f"tp={tp} world={nproc}")
    ref_w, got_w = _weights(reference), _weights(run)
    for n in NAMES:
        torch.testing.assert_close(got_w[n], ref_w[n], rtol=1e-5, atol=1e-5)
        worst = max(worst, float((got_w[n] - ref_w[n]).abs().max()))
    state = json.loads((run / "sae" / "training_state.json").read_text())
    assert state["parallel"] == {"tp": tp, "dp": nproc // tp}
    print(f"tp={tp} dp={nproc // tp}: max |difference| over {STEPS} steps of logged metrics and the "
          f"exported weights: {worst:.3g}")


def _restart_from(src: Path, dst: Path, step: int):
    """A copy of a finished run directory as it was right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "sae")
    for ck in (dst / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)


@pytest.mark.slow
def test_checkpoint_size_is_sae_plans(tp2xdp2):
    """Each checkpoint of the tp=2 x dp=2 run records exactly sae-plan's tensor bytes (`checkpoint_bytes`), its
    files fit within sae-plan's total, and no rank's file exceeds sae-plan's most bytes one rank writes."""
    from helpers.checkpoint import checkpoint_on_disk

    from sae_dist.plan import checkpoint_bytes

    r = checkpoint_bytes(24, 384, tp=2, density=True)
    cks = sorted((tp2xdp2 / "checkpoints").glob("step_*"))
    assert cks
    for ck in cks:
        tensors, on_disk, per_file = checkpoint_on_disk(ck)
        assert tensors == r["total_bytes"] - r["bytes"]["overhead"], ck.name
        assert tensors < on_disk <= r["total_bytes"] and max(per_file) <= r["writer_bytes"] < r["total_bytes"]


@pytest.mark.slow
def test_checkpoint_reshards_across_meshes(store, reference, tp2xdp2, tmp_path):
    saved = tp2xdp2  # only copied (_restart_from)
    for name, nproc, tp in (("single", 1, 1), ("tp4", 4, 4), ("dp2", 2, 1)):
        run = tmp_path / name
        _restart_from(saved, run, 2 * CKPT)
        out = _run_ranks(store, run, nproc=nproc, tp=tp)
        assert f"step_{2 * CKPT:08d} (step {2 * CKPT}" in out
        _close(_log(run), _log(reference), f"resumed at {name}")
        _same_density(run, reference, f"resumed at {name}")
        for n in NAMES:
            torch.testing.assert_close(_weights(run)[n], _weights(reference)[n], rtol=1e-5, atol=1e-5)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_killed_rank_fails_fast_and_rerun_resumes(store, reference, tmp_path):
    run = tmp_path / "killed"
    # slow the run down (a checkpoint every step) so it is surely mid-training when a rank is killed
    proc = _train(store, run, nproc=2, tp=2, extra=("trainer.checkpoint_every_steps=1",),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert elapsed < 90, f"the job took {elapsed:.0f} s to fail after a rank died"
    assert "local_rank: 1" in err and "SIGKILL" in err, err[-2000:]
    done = len(_log(run))
    assert done < STEPS
    out = _run_ranks(store, run, nproc=2, tp=2)  # the rerun resumes from the last complete checkpoint
    assert "resuming from" in out
    _close(_log(run), _log(reference), "after a killed rank")
    for n in NAMES:
        torch.testing.assert_close(_weights(run)[n], _weights(reference)[n], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tp_errors_are_clear(store, tmp_path, console_script):
    # a plain single process: the sae-train command line, run in this process (conftest.py)
    r = console_script("sae-train", *_args(store, tmp_path / "a"), "parallel.tp=2")
    assert r.returncode != 0 and "needs 2 processes" in r.stderr
    # two ranks, as torchrun starts them, forked from the forkserver (_run_ranks): the refusal is sae-train's
    out = _run_ranks(store, tmp_path / "b", nproc=2, tp=3, fail=True)
    assert "does not divide the world size 2" in out, out[-3000:]


@pytest.mark.slow
def test_deepspeed_engine_matches_and_resumes(store, reference, tmp_path):
    """trainer.engine=deepspeed (ZeRO-1 over dp=2) matches the single-process torch-engine run; its
    checkpoint resumes under ZeRO-2 at another mesh (tp=2) and still matches."""
    run = tmp_path / "ds"
    _run_ranks(store, run, nproc=2, tp=1, extra=("trainer.engine=deepspeed", "trainer.zero_stage=1"))
    _close(_log(run), _log(reference), "deepspeed zero-1 dp=2")
    for n in NAMES:
        torch.testing.assert_close(_weights(run)[n], _weights(reference)[n], rtol=1e-5, atol=1e-5)
    resumed = tmp_path / "ds_resumed"
    _restart_from(run, resumed, 2 * CKPT)
    out = _run_ranks(store, resumed, nproc=2, tp=2, extra=("trainer.engine=deepspeed", "trainer.zero_stage=2"))
    assert "resuming from" in out
    _close(_log(resumed), _log(reference), "deepspeed zero-2 tp=2, resumed")


@pytest.mark.slow
def test_unsharded_architecture_refuses_tp_and_trains_data_parallel(store, tmp_path):
    """Architectures other than TopK do not shard latents: tp > 1 fails naming the architecture; at
    tp = 1 the ranks are data-parallel replicas whose logged losses track the single-process run
    (each rank normalises over its own half of the batch, so not bit-equal)."""
    # init_scale=1: the plain tied init, whose first reconstruction is n / (2 d) = 8 times too large, so that
    # training visibly lowers fvu (with the default "auto" init fvu starts low and L1 raises it)
    relu = ("sae=relu", "sae.k=null", "sae.l1_coef=0.1", "sae.init_scale=1")
    out = _run_ranks(store, tmp_path / "tp2", nproc=2, tp=2, extra=relu, fail=True)
    assert "sae=relu does not train latent-sharded" in out, out[-2000:]
    single, dp2 = tmp_path / "single", tmp_path / "dp2"
    _run_ranks(store, single, extra=relu)
    _run_ranks(store, dp2, nproc=2, tp=1, extra=relu)
    a, b = _log(single), _log(dp2)
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/fvu", "train/l0"):
            assert abs(x[key] - y[key]) <= 0.06 * abs(y[key]) + 2e-3, (x["step"], key, x[key], y[key])
    assert b[-1]["train/fvu"] < 0.5 * b[0]["train/fvu"]
    wa, wb = _weights(single), _weights(dp2)
    assert (wa["W_dec"] - wb["W_dec"]).abs().max() < 0.05
