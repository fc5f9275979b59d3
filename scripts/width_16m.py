#!/usr/bin/env python
"""The promised width, for real, on CPU: a 16,777,216-latent TopK SAE trained, killed, resharded,
exported and loaded (issue 14, item 9; docs/benchmarks.md, "16M latents on CPU").

    .venv/bin/python scripts/width_16m.py --work /tmp/w16m

Phases, each timed, with the peak resident memory of its processes (VmRSS from /proc, sampled every 0.2 s:
the sum over the phase's process tree and the largest single process):
  store    a synthetic activation store, d_in=8 (`sae_dist.store.write_store`)
  train    `sae-train` under torchrun, --tp-first processes at parallel.tp=--tp-first; as soon as its
           first checkpoint is complete every process of the job gets SIGKILL (a dead node)
  resume   the same command into the same run_dir at parallel.tp=--tp-resume (--tp-resume processes):
           the checkpoint reshards, training finishes and the SAE is exported shard by shard
  probe    the trainer's own sharded model at parallel.tp=--tp-resume, loaded from the last
           checkpoint, reconstructs --probe-rows rows of the store (`TopKSAE.training_step_losses` on its latent shard)
  verify   `sae_dist.load_sae` on the export: its weights against the last checkpoint's, gathered
           (`read_checkpoint_tensors`), and its reconstruction of those rows against the probe's
Writes WORK/summary.json (configuration, facts, per-phase wall_s and peak RSS) and prints it; exits 1
when a phase fails or a check does not hold. AuxK runs from step 2 on (sae.dead_tokens = one batch),
so its candidate exchange runs at full width too. The loss is not meaningful here (d_in=8 with k=32
latents overshoots at init and a few steps do not train it); the point is every index, buffer and
file at the width. `probe` and `verify` are also subcommands (`probe` runs under torchrun).
Disk at the default sizes: two checkpoints of 3.4 GiB (weights, Adam moments, dead-latent counters)
and the 1.1 GiB export. Memory: about 7 GiB over the 4 processes of the first phase.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).resolve()


def _children() -> dict[int, list[int]]:
    """{pid: [child pids]} of every process, from /proc/<pid>/stat (Linux)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name in parentheses may hold spaces
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss(pid: int) -> int:
    """Resident set size of pid in bytes (VmRSS of /proc/<pid>/status), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMonitor:
    """Peak RSS of a process and all its descendants, sampled every `interval` seconds in a thread
    from /proc: `peak_sum` (bytes, the sum over the tree at one sample) and `peak_max` (the largest
    process)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak_sum = self.peak_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def tree(self) -> list[int]:
        """Pids of the root process and its descendants that still exist."""
        if not Path(f"/proc/{self.pid}").exists():
            return []
        kids, out, todo = _children(), [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(kids.get(pid, []))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = [r for r in map(_rss, self.tree()) if r]
            if rss:
                self.peak_sum = max(self.peak_sum, sum(rss))
                self.peak_max = max(self.peak_max, max(rss))
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        """Stop sampling; the peaks in MiB."""
        self._stop.set()
        self._thread.join()
        return {"peak_rss_sum_mib": round(self.peak_sum / 2**20), "peak_rss_max_proc_mib": round(self.peak_max / 2**20)}


def _env() -> dict:
    # gloo collectives wait while one rank writes GBs of checkpoint on a shared 2-core machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "SAE_DIST_TIMEOUT_S": os.environ.get("SAE_DIST_TIMEOUT_S", "900")}


def train_overrides(a, tp: int) -> list[str]:
    """The `sae-train` Hydra overrides of both training phases (only parallel.tp differs)."""
    w = Path(a.work)
    return [f"run_dir={w / 'run'}", f"store.path={w / 'store.zarr'}", f"sae.d_sae={a.d_sae}",
            f"sae.k={a.k}", f"sae.k_aux={a.k_aux}", f"sae.dead_tokens={a.batch_tokens}",
            f"trainer.tokens={a.steps * a.batch_tokens}", f"trainer.batch_tokens={a.batch_tokens}",
            f"trainer.checkpoint_every_steps={a.checkpoint_every}", "trainer.keep_checkpoints=2",
            "trainer.log_every_steps=1", f"trainer.lr={a.lr}", "trainer.warmup_steps=1",
            "device=cpu", "seed=0", "wandb.mode=disabled", f"parallel.tp={tp}"]


def _torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", "--max-restarts", "0", *argv]


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, TreeMonitor, float]:
    fh = open(log, "w")  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_handle = fh
    return proc, TreeMonitor(proc.pid), time.perf_counter()


def _finish(proc, mon: TreeMonitor, t0: float, timeout: float) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(mon)
        rc = proc.wait()
    proc.log_handle.close()
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), **mon.stop()}


def _kill_tree(mon: TreeMonitor) -> list[int]:
    """SIGKILL every process of the monitored tree (all started by this script), by pid."""
    pids = mon.tree()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def run_phase(name: str, cmd: list[str], work: Path, timeout: float) -> dict:
    """Run one command to its end under a TreeMonitor; its output goes to WORK/<name>.log."""
    proc, mon, t0 = _start(cmd, work / f"{name}.log")
    res = _finish(proc, mon, t0, timeout)
    print(f"[{name}] rc={res['rc']} {res['wall_s']} s, peak RSS {res['peak_rss_sum_mib']} MiB "
          f"(largest process {res['peak_rss_max_proc_mib']} MiB)", flush=True)
    return res


def phase_store(a) -> dict:
    """Write the synthetic store: `rows` tokens of d_in-wide activations (sparse codes over 4 d_in
    random directions plus noise), in this process."""
    import torch

    from sae_dist.store import write_store

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    D = torch.randn(4 * a.d_in, a.d_in, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    codes = (torch.rand(a.rows, 4 * a.d_in, generator=g) < 0.1).float() * torch.rand(a.rows, 4 * a.d_in, generator=g)
    x = 3 * codes @ D + 0.05 * torch.randn(a.rows, a.d_in, generator=g)
    write_store(Path(a.work) / "store.zarr", x, attrs={"hook_name": "blocks.0.hook_resid_post", "model": "synthetic"})
    return {"rc": 0, "wall_s": round(time.perf_counter() - t0, 1)}


def phase_train_and_kill(a, work: Path) -> dict:
    """`sae-train` at parallel.tp=a.tp_first; SIGKILL of the whole job once a checkpoint is complete."""
    from sae_dist.train.checkpoint import latest_checkpoint

    ckpts = work / "run" / "checkpoints"
    cmd = _torchrun(a.tp_first, ["--no-python", str(BIN / "sae-train"), *train_overrides(a, a.tp_first)])
    proc, mon, t0 = _start(cmd, work / "train.log")
    deadline = time.time() + a.timeout
    while latest_checkpoint(ckpts) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    ck = latest_checkpoint(ckpts)
    alive = proc.poll() is None
    killed = _kill_tree(mon) if alive else []
    res = _finish(proc, mon, t0, 60)
    log = work / "run" / "train_log.jsonl"
    res.update(killed_pids=killed, checkpoint_step_at_kill=None if ck is None else ck[0],
               logged_steps_at_kill=len(log.read_text().splitlines()) if log.is_file() else 0,
               export_exists=(work / "run" / "sae" / "cfg.json").is_file())
    print(f"[train] tp={a.tp_first}: SIGKILL to {len(killed)} processes after checkpoint step "
          f"{res['checkpoint_step_at_kill']} ({res['wall_s']} s, peak RSS {res['peak_rss_sum_mib']} MiB, "
          f"largest process {res['peak_rss_max_proc_mib']} MiB)", flush=True)
    if not killed or ck is None or res["export_exists"]:
        raise RuntimeError(f"the tp={a.tp_first} job was not killed after a checkpoint (see {work / 'train.log'}): "
                           f"{res}; use more --steps")
    return res


def phase_resume(a, work: Path) -> dict:
    """The same `sae-train` command into the same run_dir at parallel.tp=a.tp_resume."""
    cmd = _torchrun(a.tp_resume, ["--no-python", str(BIN / "sae-train"), *train_overrides(a, a.tp_resume)])
    res = run_phase("resume", cmd, work, a.timeout)
    text = (work / "resume.log").read_text()
    res["resumed_from_log"] = next((ln.strip() for ln in text.splitlines() if "resuming from" in ln), None)
    state = work / "run" / "sae" / "training_state.json"
    if res["rc"] != 0 or res["resumed_from_log"] is None or not state.is_file():
        raise RuntimeError(f"the resume at tp={a.tp_resume} failed or did not resume: see {work / 'resume.log'}")
    st = json.loads(state.read_text())
    res.update(steps=st["steps"], tokens_trained=st["tokens_trained"], parallel=st["parallel"])
    return res


def probe_main(a) -> None:
    """(Under torchrun, a.tp processes.) Load the last checkpoint's weights into the trainer's sharded
    model at parallel.tp=a.tp and reconstruct the first a.probe_rows rows of the store; global rank 0
    saves {x (raw rows), x_hat_n (the reconstruction in the trainer's normalised space), step} to a.out."""
    import torch
    import torch.distributed.checkpoint as dcp

    from sae_dist.parallel.mesh import destroy_parallel, init_parallel
    from sae_dist.parallel.state import LATENT_DIM, global_view
    from sae_dist.parallel.tp import build_sharded_sae
    from sae_dist.sae.config import SAEConfig
    from sae_dist.store import normalize, open_store
    from sae_dist.train.checkpoint import latest_checkpoint

    run = Path(a.run_dir)
    ctx = init_parallel(a.tp, torch.device("cpu"))
    cfg = SAEConfig(**json.loads((run / "sae" / "training_state.json").read_text())["sae_cfg"])
    sae = build_sharded_sae(cfg, ctx, device="cpu")
    step, ck = latest_checkpoint(run / "checkpoints")
    views = {"model": {n: global_view(p.data, LATENT_DIM[n], ctx) for n, p in sae.named_parameters()}}
    dcp.load(views, checkpoint_id=str(ck))
    x = torch.from_numpy(open_store(a.store)["activations"][: a.probe_rows]).float()
    x_n, _ = normalize(x, cfg.normalize)
    with torch.no_grad():
        res = sae.training_step_losses(x_n)
    if ctx.is_main:
        torch.save({"x": x, "x_hat_n": res.x_hat, "step": step, "normalize": cfg.normalize}, a.out)
    ctx.barrier()
    destroy_parallel(ctx)


def verify_main(a) -> int:
    """Load the export with `sae_dist.load_sae`, compare its weights with the last checkpoint's
    (gathered; b_enc and b_dec divided by the export's fold factor) and its reconstruction of the
    probe's rows with the probe's; print one JSON line; 0 when everything holds, else 1."""
    import torch

    from sae_dist import load_sae
    from sae_dist.store import denormalize, normalize
    from sae_dist.train.checkpoint import latest_checkpoint, read_checkpoint_tensors

    run = Path(a.run_dir)
    t0 = time.perf_counter()
    sae = load_sae(run / "sae")
    out = {"d_sae": sae.d_sae, "d_in": sae.d_in, "load_s": round(time.perf_counter() - t0, 2)}
    step, ck = latest_checkpoint(run / "checkpoints")
    f = sae.cfg["sae_dist"]["fold_factor"]
    ref = read_checkpoint_tensors(ck)
    out["checkpoint_step"] = step
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        want = ref.pop(name)
        want = want / f if name.startswith("b_") else want
        got = getattr(sae, name).detach()
        out[f"{name}_shape"] = list(got.shape)
        out[f"{name}_max_abs_diff"] = float((got - want).abs().max())
        del want
    probe = torch.load(a.probe)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = sae(probe["x"])
    out["forward_s"] = round(time.perf_counter() - t0, 2)
    _, stats = normalize(probe["x"], probe["normalize"])
    want = denormalize(probe["x_hat_n"], probe["normalize"], stats)
    out["recon_max_abs_diff"] = float((y - want).abs().max())
    out["recon_max_abs"] = float(want.abs().max())
    ok = (all(out[f"{n}_max_abs_diff"] == 0 for n in ("W_enc", "W_dec"))
          and all(out[f"{n}_max_abs_diff"] <= 1e-6 for n in ("b_enc", "b_dec"))
          and out["recon_max_abs_diff"] <= 1e-4 * max(1.0, out["recon_max_abs"]))
    out["ok"] = ok
    print(json.dumps(out), flush=True)
    return 0 if ok else 1


def run_all(a) -> int:
    """Every phase in order (module docstring) into a.work; writes and prints WORK/summary.json."""
    work = Path(a.work).resolve()
    a.work = str(work)
    if (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists: use an empty --work directory")
    work.mkdir(parents=True, exist_ok=True)
    run = str(work / "run")
    t0 = time.perf_counter()
    phases = {"store": phase_store(a)}
    phases["train"] = phase_train_and_kill(a, work)
    phases["resume"] = phase_resume(a, work)
    probe = ["probe", "--run-dir", run, "--store", str(work / "store.zarr"), "--tp", str(a.tp_resume),
             "--probe-rows", str(a.probe_rows), "--out", str(work / "probe.pt")]
    phases["probe"] = run_phase("probe", _torchrun(a.tp_resume, [str(SCRIPT), *probe]), work, a.timeout)
    verify = ["verify", "--run-dir", run, "--probe", str(work / "probe.pt")]
    phases["verify"] = run_phase("verify", [sys.executable, str(SCRIPT), *verify], work, a.timeout)
    lines = (work / "verify.log").read_text().strip().splitlines()
    checks = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"ok": False}
    summary = {
        "config": {k: getattr(a, k) for k in ("d_sae", "d_in", "k", "k_aux", "batch_tokens", "steps",
                                              "checkpoint_every", "tp_first", "tp_resume", "lr", "rows")},
        "phases": phases, "checks": checks,
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_sum_mib": max(p.get("peak_rss_sum_mib", 0) for p in phases.values()),
        "machine": {"cpus": os.cpu_count(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = checks.get("ok") and all(p["rc"] == 0 for n, p in phases.items() if n != "train")
    print(f"width_16m: {'OK' if ok else 'FAILED'} in {summary['total_wall_s']} s "
          f"(peak RSS over one phase's processes {summary['peak_rss_sum_mib']} MiB); {work / 'summary.json'}")
    return 0 if ok else 1


def parse_args(argv=None) -> argparse.Namespace:
    """Command line: `[run] --work DIR [sizes]`, `probe ...` (under torchrun) or `verify ...`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", nargs="?", default="run", choices=("run", "probe", "verify"))
    p.add_argument("--work", default="runs/width_16m", help="empty directory for the store, run and logs")
    p.add_argument("--d-sae", "--n-latents", type=int, default=16_777_216, help="latents (--n-latents: old name)")
    p.add_argument("--d-in", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps of the whole run (the resume finishes them)")
    p.add_argument("--checkpoint-every", type=int, default=2, help="the kill follows the first checkpoint")
    p.add_argument("--tp-first", type=int, default=4)
    p.add_argument("--tp-resume", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=4096, help="tokens in the synthetic store")
    p.add_argument("--probe-rows", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    p.add_argument("--run-dir"), p.add_argument("--store"), p.add_argument("--tp", type=int)
    p.add_argument("--out"), p.add_argument("--probe")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point: dispatch on the subcommand."""
    a = parse_args(argv)
    if a.cmd == "probe":
        probe_main(a)
        return 0
    if a.cmd == "verify":
        return verify_main(a)
    return run_all(a)


if __name__ == "__main__":
    sys.exit(main())
