"""DeepSpeed ZeRO-1/2 engine (`sae_dist.train.deepspeed_engine`) against the torch engine.

Every DeepSpeed run happens in spawned worker processes (gloo on CPU), so DeepSpeed's process-wide
state and process groups never leak into the pytest process; the references are computed
independently:
- single process: `TopKSAE` + `TorchEngine` and a copy + `DeepSpeedEngine` (its own 1-rank group)
  take the same steps in one worker: per-step losses, final weights and the Adam state
  (`optimizer_state()`: exp_avg, exp_avg_sq, step) within 1e-5, with and without clipping and
  optimizer-state CPU offload.
- dp x tp meshes: a latent-sharded `TopKSAE` (`parallelize_sae`) + `DeepSpeedEngine` on 2 or 4 processes
  against the unsharded
  `TopKSAE` + `TorchEngine` run in this (pytest) process on the whole batch: global per-step losses,
  each rank's weight shard and Adam-state shard within 1e-5.
- checkpoint round trip: full_optimizer_state() after a few steps, a fresh model + engine loading it,
  then the same further steps as the uninterrupted engine: identical.
- checkpoints in pieces: at dp > 1 optimizer_state() gives each rank's ZeRO partition as live RankParts; a
  DCP checkpoint of them holds the global moments (read back in this process) and loads, exactly, into a
  DeepSpeed run at another mesh; a torch engine's checkpoint loads into the pieces.
AuxK is on (fixed random dead mask), the learning rate changes every step (set_lr), gradient
clipping is active where tested (max norm below the gradients' norm) and DeepSpeed's global gradient
norm is checked against an independent one; one case runs the forward under bf16 autocast (on CPU,
as the trainer does on CUDA) with DeepSpeed in fp32 mode. Fresh random data and seed every run.
The engine's argument checks (in this process): tests/unit/train/test_deepspeed_engine.py.
"""

from __future__ import annotations

import math
import os
import re
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
from helpers.dist import free_port, prefixed, tp_shard
from helpers.train import LR, engine_cfg

from sae_dist.parallel.state import LATENT_DIM
from sae_dist.sae.init import init_rows, tied_init_rows_
from sae_dist.sae.topk import TopKSAE
from sae_dist.train.deepspeed_engine import DeepSpeedEngine
from sae_dist.train.engine import TorchEngine
from sae_dist.train.trainer import TrainerConfig

STEPS, B = 8, 32
CLIP = 0.05  # below the gradient norm of these shapes (asserted), so clipping is active
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


TOL = dict(rtol=1e-5, atol=1e-5)
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _lr(s: int) -> float:
    return LR * (1.0 + 0.25 * s)  # a different lr every step exercises set_lr


def _data():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    cfg = engine_cfg()
    xs = torch.randn(STEPS, B, cfg.d_in, generator=g) * 2.0 + 0.3
    dead = torch.rand(cfg.d_sae, generator=g) < 0.3
    b_dec = 0.1 * torch.randn(cfg.d_in, generator=g)
    return cfg, seed, xs, dead, b_dec


def _ref_model(cfg, seed, b_dec) -> TopKSAE:
    """Unsharded TopKSAE with the mesh-independent tied init of `init_rows`."""
    m = TopKSAE(cfg)
    w = init_rows(0, cfg.d_sae, cfg.d_in, seed)
    with torch.no_grad():
        m.W_dec.copy_(w)
        m.W_enc.copy_(cfg.enc_init_scale * w.T)
        m.b_enc.zero_()
        m.b_dec.copy_(b_dec)
    return m


def _run_engine(model, engine, xs, dead, rows=lambda x: x, steps=range(STEPS), amp=False):
    """Trainer-like steps: set_lr, losses (under bf16 autocast when amp), engine.step. Returns the
    per-step loss (this rank's share)."""
    losses = []
    for s in steps:
        engine.set_lr(_lr(s))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            res = model.training_step_losses(rows(xs[s]), dead)
        engine.step(res.loss)
        losses.append(res.loss.detach().clone())
    return torch.stack(losses)


def _run_reference(model, engine, xs, dead, amp=False):
    """`_run_engine` for the unsharded reference, also returning each step's global gradient norm
    (after the W_dec projection, before clipping) from an independent autograd.grad pass."""
    losses, norms = [], []
    params = [getattr(model, n) for n in NAMES]
    for s in range(STEPS):
        engine.set_lr(_lr(s))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            res = model.training_step_losses(xs[s], dead)
        grads = dict(zip(NAMES, torch.autograd.grad(res.loss, params, retain_graph=True), strict=True))
        w = model.W_dec.detach()
        g = grads["W_dec"]
        grads["W_dec"] = g - (g * w).sum(-1, keepdim=True) * w
        norms.append(float(torch.sqrt(sum(gg.double().pow(2).sum() for gg in grads.values()))))
        engine.step(res.loss)
        losses.append(res.loss.detach().clone())
    return torch.stack(losses), torch.tensor(norms, dtype=torch.float64)


def _weights(model) -> dict:
    return {n: getattr(model, n).detach().clone() for n in NAMES}


def _opt_state(engine) -> dict:
    """Whole local-shard copies of the Adam state (DeepSpeed's gathered over its dp partitions)."""
    state = engine.full_optimizer_state() if hasattr(engine, "full_optimizer_state") else engine.optimizer_state()
    return {n: {k: v.detach().clone() for k, v in st.items()} for n, st in state.items()}


def _max_diff(a: dict, b: dict) -> float:
    out = 0.0
    for n in a:
        if isinstance(a[n], dict):
            out = max(out, _max_diff(a[n], b[n]))
        else:
            out = max(out, float((a[n].float() - b[n].float()).abs().max()))
    return out


# ---------------------------------------------------------------------------------- workers
def _worker(rank, world, tp, port, mode, cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir):
    torch.set_num_threads(1)
    if mode.startswith("single"):  # a plain process: the engine creates its own 1-rank group
        for k in _LAUNCH_ENV:
            os.environ.pop(k, None)
        _single(cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir, amp=mode == "single_bf16")
        return
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sae_dist.parallel.mesh import destroy_parallel, init_parallel

    ctx = init_parallel(tp=tp, device="cpu")
    try:
        if mode == "mesh":
            _mesh(ctx, cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir)
        else:
            _roundtrip(ctx, cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir)
    finally:
        destroy_parallel(ctx)


def _single(cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir, amp=False):
    tcfg = TrainerConfig(grad_clip_norm=clip)
    ref, model = _ref_model(cfg, seed, b_dec), _ref_model(cfg, seed, b_dec)
    ref_engine = TorchEngine(ref, LR, tcfg)
    engine = DeepSpeedEngine(model, LR, tcfg, None, zero_stage=stage, offload_optimizer=offload)
    before = _opt_state(engine)  # the state Adam would create: zeros, step 0
    ref_losses, ref_norms = _run_reference(ref, ref_engine, xs, dead, amp)
    losses, norms = [], []
    for s in range(STEPS):
        losses.append(_run_engine(model, engine, xs, dead, steps=[s], amp=amp))
        norms.append(float(engine.ds_engine.get_global_grad_norm()))
    aux = float(ref.training_step_losses(xs[0], dead).auxk_loss)
    torch.save({"ref_losses": ref_losses, "losses": torch.cat(losses), "aux": aux,
                "norms": torch.tensor(norms, dtype=torch.float64), "ref_norms": ref_norms,
                "ref_weights": _weights(ref), "weights": _weights(model), "before": before,
                "ref_opt": _opt_state(ref_engine), "opt": _opt_state(engine),
                "row_norm_err": float((model.W_dec.norm(dim=-1) - 1).abs().max())},
               os.path.join(out_dir, "rank0.pt"))
    engine.close()


def _sharded(ctx, cfg, seed, b_dec):
    from sae_dist.parallel.tp import build_sharded_sae

    m = build_sharded_sae(cfg, ctx)
    tied_init_rows_(m, seed, m.latent_start)
    with torch.no_grad():
        m.b_dec.copy_(b_dec)
    return m


def _rows(ctx):
    b = B // ctx.dp
    return lambda x: x[ctx.dp_rank * b:(ctx.dp_rank + 1) * b]


def _mesh(ctx, cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir):
    from sae_dist.parallel.comm import all_reduce_

    tcfg = TrainerConfig(grad_clip_norm=clip)
    model = _sharded(ctx, cfg, seed, b_dec)
    lo, hi = model.latent_start, model.latent_end
    engine = DeepSpeedEngine(model, LR, tcfg, ctx, zero_stage=stage, offload_optimizer=offload)
    losses, norms = [], []
    for s in range(STEPS):
        losses.append(_run_engine(model, engine, xs, dead[lo:hi], _rows(ctx), steps=[s]))
        norms.append(float(engine.ds_engine.get_global_grad_norm()))
    losses = all_reduce_(torch.cat(losses), ctx.dp_group)  # per-rank shares -> global loss
    torch.save({"range": (lo, hi), "losses": losses, "norms": torch.tensor(norms, dtype=torch.float64),
                "weights": _weights(model),
                "opt": _opt_state(engine)}, os.path.join(out_dir, f"rank{ctx.rank}.pt"))


def _roundtrip(ctx, cfg, seed, xs, dead, b_dec, stage, clip, offload, out_dir):
    """Engine A: STEPS steps uninterrupted. Engine B: a fresh model + engine that loads A's weights
    and optimizer_state() after `cut` steps (before B's first step, as a resumed run does), then
    takes the remaining steps."""
    tcfg = TrainerConfig(grad_clip_norm=clip)
    cut = STEPS // 2
    model_a = _sharded(ctx, cfg, seed, b_dec)
    lo, hi = model_a.latent_start, model_a.latent_end
    dead_loc, rows = dead[lo:hi], _rows(ctx)
    eng_a = DeepSpeedEngine(model_a, LR, tcfg, ctx, zero_stage=stage, offload_optimizer=offload)
    _run_engine(model_a, eng_a, xs, dead_loc, rows, steps=range(cut))
    saved_opt, saved_w = _opt_state(eng_a), _weights(model_a)

    model_b = _sharded(ctx, cfg, seed + 1, torch.zeros_like(b_dec))  # different weights, overwritten
    eng_b = DeepSpeedEngine(model_b, LR, tcfg, ctx, zero_stage=stage, offload_optimizer=offload)
    with torch.no_grad():
        for n in NAMES:
            getattr(model_b, n).copy_(saved_w[n])  # in place, as a DCP load does
    bad = {"W_dec": {**saved_opt["W_dec"], "exp_avg": saved_opt["W_dec"]["exp_avg"][:-1]}}
    try:
        eng_b.load_optimizer_state(bad)
        shape_error = ""
    except ValueError as e:
        shape_error = str(e)
    eng_b.load_optimizer_state(saved_opt)
    reloaded = _opt_state(eng_b)

    loss_a = _run_engine(model_a, eng_a, xs, dead_loc, rows, steps=range(cut, STEPS))
    loss_b = _run_engine(model_b, eng_b, xs, dead_loc, rows, steps=range(cut, STEPS))
    torch.save({"saved_opt": saved_opt, "reloaded": reloaded, "loss_a": loss_a, "loss_b": loss_b,
                "shape_error": shape_error,
                "w_a": _weights(model_a), "w_b": _weights(model_b),
                "opt_a": _opt_state(eng_a), "opt_b": _opt_state(eng_b)},
               os.path.join(out_dir, f"rank{ctx.rank}.pt"))


def _spawn(nprocs, tp, mode, data, stage, clip, offload, out_dir):
    cfg, seed, xs, dead, b_dec = data
    mp.start_processes(_worker, args=(nprocs, tp, free_port(), mode, cfg, seed, xs, dead, b_dec, stage,
                                      clip, offload, str(out_dir)),
                       nprocs=nprocs, join=True, start_method="forkserver")


# ---------------------------------------------------------------------------------- tests
@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
@pytest.mark.parametrize("stage,clip,offload,amp", [(1, None, False, False), (2, None, False, False),
                                                    (1, CLIP, True, False), (2, CLIP, True, False),
                                                    (2, CLIP, False, True)])
def test_single_process_matches_torch_engine(stage, clip, offload, amp, tmp_path):
    data = _data()
    _spawn(1, 1, "single_bf16" if amp else "single", data, stage, clip, offload, tmp_path)
    got = torch.load(tmp_path / "rank0.pt")
    assert got["aux"] > 0  # AuxK really contributes
    # under bf16 autocast a last-bit difference of an fp32 weight (the two engines sum in different
    # orders) can round a bf16 operand differently, which moves a loss by ~1e-5: a bf16-sized tolerance
    tol = dict(rtol=1e-4, atol=1e-4) if amp else TOL
    torch.testing.assert_close(got["losses"], got["ref_losses"], **tol)
    for n in NAMES:
        torch.testing.assert_close(got["weights"][n], got["ref_weights"][n], **tol,
                                   msg=partial(prefixed, f"weight {n}"))
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["opt"][n][k], got["ref_opt"][n][k], **tol,
                                       msg=partial(prefixed, f"optimizer state {n}.{k}"))
            assert got["before"][n][k].shape == got["ref_weights"][n].shape or k == "step"
            assert float(got["before"][n][k].abs().max()) == 0.0
    assert float(got["opt"]["W_dec"]["step"]) == STEPS
    assert got["row_norm_err"] < 1e-6
    # DeepSpeed's global gradient norm (what it clips with) is the reference's
    torch.testing.assert_close(got["norms"], got["ref_norms"], rtol=1e-5, atol=0)
    if clip is not None:
        assert float(got["ref_norms"].max()) > clip  # clipping was active
    worst = max(float((got["losses"] - got["ref_losses"]).abs().max()),
                _max_diff(got["weights"], got["ref_weights"]), _max_diff(got["opt"], got["ref_opt"]))
    norm_rel = float(((got["norms"] - got["ref_norms"]) / got["ref_norms"]).abs().max())
    print(f"single process ZeRO-{stage} clip={clip} offload={offload} bf16-autocast={amp}: max abs "
          f"difference over losses, weights, optimizer state = {worst:.3g}; grad norm rel {norm_rel:.3g}")


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
@pytest.mark.parametrize("tp,dp,stage,clip,offload", [
    (1, 2, 1, None, False),
    (1, 2, 2, CLIP, False),
    (1, 2, 2, None, True),
    (2, 1, 2, CLIP, False),
    (2, 2, 1, CLIP, False),
])
def test_mesh_matches_single_process_torch_engine(tp, dp, stage, clip, offload, tmp_path):
    data = _data()
    cfg, seed, xs, dead, b_dec = data
    tcfg = TrainerConfig(grad_clip_norm=clip)
    ref = _ref_model(cfg, seed, b_dec)
    ref_engine = TorchEngine(ref, LR, tcfg)
    assert float(ref.training_step_losses(xs[0], dead).auxk_loss) > 0
    ref_losses, ref_norms = _run_reference(ref, ref_engine, xs, dead)
    ref_w, ref_opt = _weights(ref), _opt_state(ref_engine)

    _spawn(tp * dp, tp, "mesh", data, stage, clip, offload, tmp_path)
    worst = norm_rel = 0.0
    for r in range(tp * dp):
        got = torch.load(tmp_path / f"rank{r}.pt")
        lo, hi = got["range"]
        torch.testing.assert_close(got["losses"], ref_losses, **TOL)
        worst = max(worst, float((got["losses"] - ref_losses).abs().max()))
        for n in NAMES:
            exp = tp_shard(ref_w[n], n, lo, hi)
            torch.testing.assert_close(got["weights"][n], exp, **TOL,
                                       msg=partial(prefixed, f"weight {n}, rank {r}"))
            worst = max(worst, float((got["weights"][n] - exp).abs().max()))
            for k in ("exp_avg", "exp_avg_sq"):
                exp = tp_shard(ref_opt[n][k], n, lo, hi)
                torch.testing.assert_close(got["opt"][n][k], exp, **TOL,
                                           msg=partial(prefixed, f"optimizer state {n}.{k}, rank {r}"))
                worst = max(worst, float((got["opt"][n][k] - exp).abs().max()))
            assert float(got["opt"][n]["step"]) == STEPS
        # global norm over dp partitions and tp shards, the replicated b_dec counted once
        torch.testing.assert_close(got["norms"], ref_norms, rtol=1e-5, atol=0,
                                   msg=partial(prefixed, f"gradient norms, rank {r}"))
        norm_rel = max(norm_rel, float(((got["norms"] - ref_norms) / ref_norms).abs().max()))
    if clip is not None:
        assert float(ref_norms.max()) > clip  # clipping was active
    print(f"tp={tp} dp={dp} ZeRO-{stage} clip={clip} offload={offload}: max abs difference over "
          f"losses, weight shards, optimizer state shards = {worst:.3g}; grad norm rel {norm_rel:.3g}")


@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py
@pytest.mark.parametrize("stage,offload", [(1, False), (2, True)])
def test_optimizer_state_round_trip(stage, offload, tmp_path):
    data = _data()
    _spawn(2, 1, "roundtrip", data, stage, CLIP, offload, tmp_path)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert "W_dec.exp_avg has shape" in got["shape_error"]
        assert _max_diff(got["reloaded"], got["saved_opt"]) == 0.0  # load then read back: exact
        assert float(got["saved_opt"]["W_dec"]["exp_avg_sq"].abs().max()) > 0
        assert torch.equal(got["loss_a"], got["loss_b"])
        for n in NAMES:
            assert torch.equal(got["w_a"][n], got["w_b"][n]), f"weight {n}, rank {r}"
        assert _max_diff(got["opt_a"], got["opt_b"]) == 0.0
        assert float(got["opt_b"]["b_dec"]["step"]) == STEPS


# ---------------------------------------------------------------------------------- checkpoints in pieces
def _ckpt_worker(rank, world, tp, port, mode, data, stage, offload, out_dir):
    """mode "save_ds" / "save_torch": STEPS // 2 steps, then a checkpoint (build_state of the engine's
    optimizer_state(): at dp > 1 DeepSpeed's RankParts) and this rank's whole Adam state and weights;
    "load_ds": a fresh DeepSpeed engine at this mesh loads that checkpoint and reports its Adam state."""
    from sae_dist.parallel.mesh import destroy_parallel, init_parallel
    from sae_dist.parallel.state import RankPart, build_state
    from sae_dist.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg, seed, xs, dead, b_dec = data
    ctx = init_parallel(tp=tp, device="cpu")
    try:
        model = _sharded(ctx, cfg, seed, b_dec)
        lo, hi = model.latent_start, model.latent_end
        tcfg = TrainerConfig()
        engine = (TorchEngine(model, LR, tcfg) if mode == "save_torch"
                  else DeepSpeedEngine(model, LR, tcfg, ctx, zero_stage=stage, offload_optimizer=offload))
        opt = engine.optimizer_state()
        out = {"range": (lo, hi)}
        if mode == "load_ds":
            _, path = latest_checkpoint(os.path.join(out_dir, "ck"))
            load_checkpoint(path, state=build_state(model, opt, None, {}, ctx), ctx=ctx)
            engine.load_optimizer_state(opt)
        else:
            _run_engine(model, engine, xs, dead[lo:hi], _rows(ctx), steps=range(STEPS // 2))
            opt = engine.optimizer_state()
            parts = [st[k] for st in opt.values() for k in ("exp_avg", "exp_avg_sq")]
            out["parts"] = [(p.start, p.flat.numel(), p.shape) if isinstance(p, RankPart) else None for p in parts]
            if mode == "save_ds":  # live views of the partition's Adam state, not copies
                storages = {engine._adam.state[f][k].untyped_storage().data_ptr()
                            for f in engine._flat_partitions() for k in ("exp_avg", "exp_avg_sq")}
                out["live"] = all((p.flat if isinstance(p, RankPart) else p).untyped_storage().data_ptr() in storages
                                  for p in parts if (p.flat if isinstance(p, RankPart) else p).numel())
                # a RankPart the engine did not return (a copy of its live one) is refused
                foreign = {n: {k: RankPart(v.flat.clone(), v.start, v.shape) if isinstance(v, RankPart) else v
                               for k, v in st.items()} for n, st in opt.items()}
                try:
                    engine.load_optimizer_state(foreign)
                    out["foreign"] = None
                except ValueError as e:
                    out["foreign"] = str(e)
            save_checkpoint(os.path.join(out_dir, "ck"), STEPS // 2, state=build_state(model, opt, None, {}, ctx),
                            trainer_state={}, ctx=ctx)
        out["opt"] = _opt_state(engine)
        torch.save(out, os.path.join(out_dir, f"{mode}{ctx.rank}.pt"))
        if hasattr(engine, "close"):
            engine.close()
    finally:
        destroy_parallel(ctx)


def _ckpt_run(nprocs, tp, mode, data, stage, out_dir, offload=False):
    mp.start_processes(_ckpt_worker, args=(nprocs, tp, free_port(), mode, data, stage, offload, str(out_dir)),
                       nprocs=nprocs, join=True, start_method="forkserver")
    return [torch.load(out_dir / f"{mode}{r}.pt") for r in range(nprocs)]


def _global(ranks, name, key):
    """The global tensor of an Adam moment from every rank's whole local shard (tp shards concatenated)."""
    dim = LATENT_DIM[name]
    shards = {r["range"]: r["opt"][name][key] for r in ranks}
    if dim is None:
        return next(iter(shards.values()))
    return torch.cat([shards[k] for k in sorted(shards)], dim=dim)


@pytest.mark.usefixtures("worker_forkserver")
@pytest.mark.parametrize("save,load,offload", [(("save_ds", 2, 1, 1), (2, 2), False),
                                               (("save_ds", 4, 2, 2), (2, 1), False),
                                               (("save_torch", 2, 2, 1), (2, 1), False),
                                               (("save_ds", 2, 1, 1), (2, 1), True)])
def test_checkpoints_hold_zero_partitions_without_gathering(save, load, offload, tmp_path):
    """A DeepSpeed run at dp > 1 checkpoints each rank's piece of the Adam moments (live views, no gathered
    copy); the checkpoint holds the global moments the pieces make up, and a DeepSpeed run at another mesh
    (dp = 1: whole views; dp = 2: other pieces) loads them exactly, as it does a torch engine's checkpoint.
    With the optimizer offloaded to the host (the CPU's memory here) the same holds."""
    from sae_dist.train.checkpoint import latest_checkpoint, read_checkpoint_tensors

    with torch.random.fork_rng():
        torch.manual_seed(0)  # a fixed seed and data for this test
        data = _data()
    (mode, world, tp, stage), (lworld, ltp) = save, load  # loaded at ZeRO-2, saved at the `stage` given
    saved = _ckpt_run(world, tp, mode, data, stage, tmp_path, offload)  # offload: host memory, the CPU's anyway
    stored = read_checkpoint_tensors(latest_checkpoint(tmp_path / "ck")[1], prefix="optim")
    for name in NAMES:
        for key in ("exp_avg", "exp_avg_sq"):
            want = _global(saved, name, key)
            assert float(want.abs().max()) > 0
            assert torch.equal(stored[f"{name}.{key}"], want), (name, key)
    if mode == "save_ds":  # dp = 2: every local shard tiled by the dp ranks' pieces, each element once
        assert all(r["live"] for r in saved)
        assert all(re.fullmatch(r"optimizer state \w+\.exp_avg is a RankPart this engine's last optimizer_state\(\) "
                                r"did not return; pass whole local tensors", r["foreign"]) for r in saved), saved
        by_shard: dict = {}
        for r in saved:
            by_shard.setdefault(r["range"], []).append(r["parts"])
        for pieces in by_shard.values():
            assert len(pieces) == 2
            for i in range(len(pieces[0])):
                (a, n), (b, m) = sorted((p[i][0], p[i][1]) for p in pieces)
                assert a == 0 and a + n == b and b + m == math.prod(pieces[0][i][2]), (i, pieces)
    loaded = _ckpt_run(lworld, ltp, "load_ds", data, 2, tmp_path, offload)
    for r in loaded:
        lo, hi = r["range"]
        for name in NAMES:
            dim = LATENT_DIM[name]
            for key in ("exp_avg", "exp_avg_sq"):
                want = stored[f"{name}.{key}"]
                want = want if dim is None else want.narrow(dim, lo, hi - lo)
                assert torch.equal(r["opt"][name][key], want), (name, key, r["range"])
            assert float(r["opt"][name]["step"]) == STEPS // 2
