"""`sae-train source=lm` and `sae-train grid=[...]` from the command line: a shared sweep streamed from the
LM writes one complete run directory per point; grid keys that would change the shared data are refused by
name; on 2 ranks (torchrun's environment, gloo) a streamed run stopped mid-way and resumed ends with the weights of an
uninterrupted one; under tensor parallelism only the rank that runs the LM loads its weights."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers.dist import free_port, rank_worker, run_train_ranks
from helpers.train import train_log
from safetensors.torch import load_file


def _args(tiny_lm_dir, run_dir, *extra):
    return [f"run_dir={run_dir}", f"model.name={tiny_lm_dir}", "device=cpu", "seed=0", "data.ctx_len=16",
            "source=lm", "stream.buffer_tokens=480", "harvest.batch_size=16", "sae.d_sae=128", "sae.k=4",
            "trainer.tokens=2400", "trainer.batch_tokens=240", "trainer.log_every_steps=2",
            "trainer.checkpoint_every_steps=4", "sae.dead_tokens=480",
            *([] if any(e.startswith("wandb.mode=") for e in extra) else ["wandb.mode=disabled"]), *extra]


@pytest.fixture(scope="module")
def one_process_grid(tiny_lm_dir, tmp_path_factory, worker_forkserver):
    """A 2-point grid from the LM in one process (the reference of the placed grids)."""
    run = tmp_path_factory.mktemp("grid1") / "one"
    run_train_ranks(_args(tiny_lm_dir, run, GRID, "wandb.mode=offline", "eval.after_train=true", "eval.eval_tokens=240",
                          "eval.batch_size=16"), run, nproc=1)  # wandb files and eval.json checked
    return run


GRID, POINTS = 'grid=["sae.k=2,4","trainer.lr=1e-3"]', ("0_n128_k2", "1_n128_k4")


def _point_weights(run, point):
    return load_file(str(run / point / "sae" / "sae_weights.safetensors"))


def test_a_streamed_shared_sweep_from_the_command_line(one_process_grid):
    run = one_process_grid
    log = Path(f"{run}.rank0.log").read_text()
    summary = json.JSONDecoder().raw_decode(log[log.index("\n{\n") + 1 :])[0]  # the printed summary
    assert [Path(p["out_dir"]).name for p in summary["points"]] == list(POINTS)
    for i, (name, k) in enumerate(zip(POINTS, (2, 4), strict=True)):
        out = run / name
        cfg = json.loads((out / "sae" / "cfg.json").read_text())
        assert cfg["k"] == k and cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_in"] == 32
        state = json.loads((out / "sae" / "training_state.json").read_text())
        assert state["tokens_trained"] == 2400 and state["trainer_cfg"]["lr"] == 1e-3
        assert [json.loads(r)["step"] for r in (out / "train_log.jsonl").read_text().splitlines()] == [2, 4, 6, 8, 10]
        assert list((out / "wandb").glob("offline-run-*"))  # its own wandb run
        ident = json.loads((out / "checkpoints" / "run_identity.json").read_text())
        assert ident["store"]["source"] == "lm" and ident["store"]["window_sequences"] == 32
        ev = json.loads((out / "eval.json").read_text())  # eval.after_train: each point evaluated
        assert ev["k"] == k and 0 < ev["fvu"] < 2 and summary["points"][i]["eval"]["fvu"] == ev["fvu"]


def test_grid_keys_that_change_the_data_are_refused(tiny_lm_dir, tmp_path, console_script):
    proc = console_script("sae-train", *_args(tiny_lm_dir, tmp_path / "g", 'grid=["data.ctx_len=16,32"]'))
    assert proc.returncode == 2
    assert "grid entry 'data.ctx_len=16,32'" in proc.stderr and "-m" in proc.stderr


@pytest.mark.usefixtures("worker_forkserver")
def test_two_rank_streamed_run_resumes_exactly(tiny_lm_dir, tmp_path):
    """2 ranks (torchrun's environment, gloo), each streaming its own windows of the text."""
    run_train_ranks(_args(tiny_lm_dir, tmp_path / "full"), tmp_path / "full", nproc=2)
    run_train_ranks(_args(tiny_lm_dir, tmp_path / "part", "trainer.max_steps=6"), tmp_path / "part", nproc=2)
    out = run_train_ranks(_args(tiny_lm_dir, tmp_path / "part"), tmp_path / "part", nproc=2)  # from step 4
    assert "resuming from" in out and "step 4" in out
    state = json.loads((tmp_path / "part" / "sae" / "training_state.json").read_text())
    assert state["parallel"] == {"tp": 1, "dp": 2} and state["tokens_trained"] == 2400
    full = load_file(str(tmp_path / "full" / "sae" / "sae_weights.safetensors"))
    part = load_file(str(tmp_path / "part" / "sae" / "sae_weights.safetensors"))
    for k in full:
        assert torch.equal(full[k], part[k]), k


def _shared_stream_worker(rank, port, lm_dir, out, fail_from_window=None):
    """Rank 0 runs the LM; rank 1's stream must not (its window computation raises) and still gets rank 0's
    batches by broadcast. With `fail_from_window`, rank 0's LM raises OSError from that window on: what each
    rank got before its error, and the error, go to rank<r>.pt."""
    import datetime

    import torch.distributed as dist

    from sae_dist.harvest.lm import load_lm
    from sae_dist.harvest.stream import LMStream
    from sae_dist.harvest.text import iter_documents

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails, not hangs
    model, tok = load_lm(lm_dir, dtype="float32")
    docs = list(itertools.islice(iter_documents("stdlib"), 4))
    s = LMStream(model=model, tokenizer=tok, hook_name="blocks.1.hook_resid_post", batch_tokens=90,
                 docs=lambda: docs, ctx_len=16, buffer_tokens=180, dtype="float32",
                 share_group=dist.new_group([0, 1]), share_src=0)
    if rank == 1:
        s.window_rows_of = None  # calling it would raise TypeError
    elif fail_from_window is not None:
        real = s.window_rows_of
        s.window_rows_of = lambda w, *a: real(w, *a) if w < fail_from_window else _raise(OSError("LM failed"))
    xs, error = [], None
    try:
        xs.append(s.sample_rows(60))
        for _ in range(5):
            xs.append(next(s))
    except Exception as e:  # noqa: BLE001 (the test checks it)
        error = f"{type(e).__name__}: {e}"
    torch.save([s.computes, xs] + ([error] if fail_from_window is not None else []), f"{out}/rank{rank}.pt")
    s.close()
    dist.destroy_process_group()


def _raise(e: Exception):
    raise e


@pytest.mark.usefixtures("worker_forkserver")
def test_a_tensor_parallel_group_shares_one_lm_stream(tiny_lm_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_shared_stream_worker, args=(free_port(), tiny_lm_dir, str(tmp_path)), nprocs=2,
                       join=True, start_method="forkserver")
    (c0, x0), (c1, x1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert c0 and not c1
    assert len(x0) == len(x1) == 6 and x0[0].shape == (60, 32) and x0[1].shape == (90, 32)
    for a, b in zip(x0, x1, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(x0[1], x0[2])  # distinct batches


@pytest.mark.usefixtures("worker_forkserver")
def test_an_lm_error_on_the_computing_rank_stops_its_group(tiny_lm_dir, tmp_path):
    """The LM fails in its second window (batches 2 and 3) on rank 0: rank 0 raises that error and rank 1, instead
    of waiting for a broadcast that never comes, a RuntimeError naming rank 0, both after the same batches."""
    import torch.multiprocessing as mp

    mp.start_processes(_shared_stream_worker, args=(free_port(), tiny_lm_dir, str(tmp_path), 1), nprocs=2,
                       join=True, start_method="forkserver")
    (c0, x0, e0), (c1, x1, e1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (c0, c1) == (True, False) and len(x0) == len(x1) == 3  # the sample and batches 0, 1
    assert all(torch.equal(a, b) for a, b in zip(x0, x1, strict=True))
    assert e0 == "OSError: LM failed"
    assert e1 == ("RuntimeError: LMStream: computing a batch from the LM failed on global rank 0, which produces "
                  "it for this rank's group (share_group): see that rank's error")


def _lazy_stream_worker(rank, port, lm_dir, out, fail):
    """Both ranks give the LM's structure and a loader (counting its calls; with `fail` it raises on rank 0, the
    one that runs the LM): what each rank's stream holds, serves or raises goes to rank<r>.pt."""
    import datetime

    import torch.distributed as dist

    from sae_dist.harvest.lm import load_lm, load_lm_structure
    from sae_dist.harvest.stream import LMStream
    from sae_dist.harvest.text import iter_documents

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    loads = []

    def load():
        loads.append(rank)
        if fail:
            raise OSError("the weights are not readable here")
        return load_lm(lm_dir, dtype="float32")

    docs = list(itertools.islice(iter_documents("stdlib"), 4))
    try:
        s = LMStream(model=load_lm_structure(lm_dir, dtype="float32"), load_lm=load,
                     hook_name="blocks.1.hook_resid_post", batch_tokens=90, docs=lambda: docs, ctx_len=16,
                     buffer_tokens=180, dtype="float32",
                     share_group=dist.new_group([0, 1]), share_src=0)
        got = {"meta": {p.is_meta for p in s.model.parameters()}, "d_in": s.d_in, "hook": s.attrs["hook_name"],
               "xs": [s.sample_rows(60)] + [next(s) for _ in range(3)]}
        s.close()
    except Exception as e:  # noqa: BLE001 (the test checks it)
        got = {"error": f"{type(e).__name__}: {e}"}
    torch.save({"loads": loads, **got}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.usefixtures("worker_forkserver")
def test_only_the_rank_that_runs_the_lm_loads_it(lm, tiny_lm_dir, tmp_path):
    """share_src (rank 0) calls load_lm and serves the batches an unshared stream of the loaded LM serves; rank 1
    never calls it, its stream holds only the weightless structure (every parameter on the meta device), and it
    receives the same batches. A load that fails on rank 0 raises there and, naming rank 0, on rank 1."""
    import torch.multiprocessing as mp

    from sae_dist.harvest.stream import LMStream
    from sae_dist.harvest.text import iter_documents

    mp.start_processes(_lazy_stream_worker, args=(free_port(), tiny_lm_dir, str(tmp_path), False), nprocs=2,
                       join=True, start_method="forkserver")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (r0["loads"], r1["loads"]) == ([0], [])
    assert (r0["meta"], r1["meta"]) == ({False}, {True})
    assert r0["d_in"] == r1["d_in"] == 32 and r0["hook"] == r1["hook"] == "blocks.1.hook_resid_post"
    docs = list(itertools.islice(iter_documents("stdlib"), 4))
    ref = LMStream(model=lm[0], tokenizer=lm[1], hook_name="blocks.1.hook_resid_post", batch_tokens=90,
                   docs=lambda: docs, ctx_len=16, buffer_tokens=180, dtype="float32")
    want = [ref.sample_rows(60)] + [next(ref) for _ in range(3)]
    ref.close()
    for a, b, c in zip(want, r0["xs"], r1["xs"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)

    mp.start_processes(_lazy_stream_worker, args=(free_port(), tiny_lm_dir, str(tmp_path), True), nprocs=2,
                       join=True, start_method="forkserver")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (r0["loads"], r1["loads"]) == ([0], [])
    assert r0["error"] == "OSError: the weights are not readable here"
    assert r1["error"].startswith("RuntimeError: LMStream: loading the LM failed on global rank 0, which produces it")


def _weight_loads_counted(rank, world, port, argv, log_files):
    """`rank_worker` with each load of an LM's weights (`AutoModelForCausalLM.from_pretrained`) counted: the
    number goes to `<log file>.loads`."""
    from transformers import AutoModelForCausalLM

    real, loads = AutoModelForCausalLM.from_pretrained, []
    AutoModelForCausalLM.from_pretrained = staticmethod(lambda *a, **kw: loads.append(a) or real(*a, **kw))
    try:
        rank_worker(rank, world, port, argv, log_files)
    finally:
        Path(f"{log_files[rank]}.loads").write_text(str(len(loads)))


def _loads(run, nproc):
    return [int(Path(f"{run}.rank{r}.log.loads").read_text()) for r in range(nproc)]


def _logged(run):
    """The run's logged training values by step (all but the timing)."""
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in train_log(run)]


@pytest.mark.usefixtures("worker_forkserver")
def test_a_tensor_parallel_run_loads_the_lm_on_the_rank_that_runs_it_alone(tiny_lm_dir, tmp_path):
    """parallel.tp=2 on 2 ranks: tp rank 0 loads the LM's weights (once) and rank 1, which receives its batches, loads
    none, in a fresh run and in one resumed from its step-4 checkpoint; the run logs the one-process run's losses
    (to float tolerance: the sharded reductions add in another order)."""
    def args(run, *extra):
        return _args(tiny_lm_dir, tmp_path / run, "trainer.eval_every_steps=0", *extra)

    run_train_ranks(args("one"), tmp_path / "one", nproc=1, worker=_weight_loads_counted)
    assert _loads(tmp_path / "one", 1) == [1]
    run_train_ranks(args("tp", "parallel.tp=2", "trainer.max_steps=6"), tmp_path / "tp", nproc=2,
                    worker=_weight_loads_counted)
    assert _loads(tmp_path / "tp", 2) == [1, 0]
    out = run_train_ranks(args("tp", "parallel.tp=2"), tmp_path / "tp", nproc=2, worker=_weight_loads_counted)
    assert "resuming from" in out and "step 4" in out
    assert _loads(tmp_path / "tp", 2) == [1, 0]
    state = json.loads((tmp_path / "tp" / "sae" / "training_state.json").read_text())
    assert state["parallel"] == {"tp": 2, "dp": 1} and state["tokens_trained"] == 2400
    one, tp = _logged(tmp_path / "one"), _logged(tmp_path / "tp")
    assert [r["step"] for r in tp] == [r["step"] for r in one] == [2, 4, 6, 8, 10]
    for a, b in zip(tp, one, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), a["step"]


@pytest.mark.usefixtures("worker_forkserver")
def test_grid_points_placed_one_per_rank_equal_the_one_process_grid(tiny_lm_dir, tmp_path, one_process_grid):
    """parallel.grid_groups=2 on 2 ranks: rank r trains point r alone (its own LM stream, no process group);
    each point ends with the weights of the same point in the one-process grid."""
    run_train_ranks([*_args(tiny_lm_dir, tmp_path / "ranks", GRID), "parallel.grid_groups=2"],
                    tmp_path / "ranks", nproc=2)
    for point in POINTS:
        a, b = _point_weights(one_process_grid, point), _point_weights(tmp_path / "ranks", point)
        for k in a:
            assert torch.equal(a[k], b[k]), (point, k)
    for rank, (mine, other) in enumerate((POINTS, POINTS[::-1])):
        log = (tmp_path / f"ranks.rank{rank}.log").read_text()  # each rank's summary lists its own point
        assert f'"out_dir": "{tmp_path / "ranks" / mine}"' in log and str(tmp_path / "ranks" / other) not in log


@pytest.mark.usefixtures("worker_forkserver")
def test_grid_points_sharded_on_rank_groups_resume_and_match(tiny_lm_dir, tmp_path, one_process_grid):
    """parallel.grid_groups=2 with parallel.tp=2 on 4 ranks: ranks {0, 1} shard point 0, ranks {2, 3} point 1,
    each group with its own stream, checkpoints and export; stopped at step 6 and resumed (from step 4), each
    point ends at the one-process grid's weights (to float tolerance: the sharded reductions differ)."""
    args = [*_args(tiny_lm_dir, tmp_path / "g", GRID), "parallel.grid_groups=2", "parallel.tp=2"]
    run_train_ranks([*args, "trainer.max_steps=6"], tmp_path / "g", nproc=4)
    out = run_train_ranks(args, tmp_path / "g", nproc=4)
    assert out.count("resuming from") == 2
    for point in POINTS:
        state = json.loads((tmp_path / "g" / point / "sae" / "training_state.json").read_text())
        assert state["parallel"] == {"tp": 2, "dp": 1} and state["tokens_trained"] == 2400
        a, b = _point_weights(one_process_grid, point), _point_weights(tmp_path / "g", point)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{point} {k}")
