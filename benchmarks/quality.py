#!/usr/bin/env python
"""SAE quality on identical data: our `sae-train` vs EleutherAI sparsify's recipe, both scored by `sae-eval`.

Issue 15. One activation store (the demo's: SmolLM2-135M-Instruct residual stream on the Python
standard-library source, `sae-harvest`), one token budget, one batch size, one seed, two trainers:

* ours: `sae-train` with its defaults (plus the overrides of `--variant`, for ablations);
* sparsify: `sparsify.SparseCoder` (eai-sparsify) stepped the way its trainer steps it with Adam: raw
  (unnormalised) activations, the encoder at `nn.Linear`'s default init with the decoder its unit-norm
  copy, b_dec set to the mean of the first batch, loss = batch fvu + auxk_alpha * its AuxK loss, decoder
  rows renormalised before each step and the gradient component parallel to them removed, Adam at
  lr 2e-4 / sqrt(n / 2^14) (times `--sparsify-lr-scale`, 1 by default; constant unless
  `--sparsify-schedule trainer`), a latent dead once it has not been among the top k for more than
  `--dead-tokens` tokens. The batches are the ones our trainer
  reads (our store reader, same seed, `normalize="none"`).

sparsify's weights are copied into our export layout (normalize "none": the model takes raw
activations) and both SAEs are evaluated by `sae-eval` on the same held-out text: the documents of the
corpus in the eval split (`data.eval_fraction`, a stable hash of each document), none of which is in the
store. Prints a markdown table and writes the numbers as JSON.

    .venv/bin/python benchmarks/quality.py --out runs/quality   # 2 CPU cores: ~5 min harvest (once) + ~8-13 min a run
    .venv/bin/python benchmarks/quality.py --only ours --variant scalar "sae.normalize=scalar"

Run from the repository root (it calls `.venv/bin/sae-*` when they exist, else the ones on PATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("fvu", "normalized_mse", "l0", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablation",
             "ce_loss_score", "kl_div", "eval_tokens")


def _bin(name: str) -> str:
    p = ROOT / ".venv" / "bin" / name
    return str(p) if p.exists() else name


def _run(cmd: list[str], log: Path) -> float:
    """Run cmd (stdout+stderr -> log); returns the wall time in seconds; raises on a non-zero exit."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return wall


def _common(args) -> list[str]:
    return [f"seed={args.seed}", f"device={args.device}", "wandb.enabled=false"]


def build_store(args) -> None:
    """Harvest the demo store into args.store unless a finished one is there."""
    if (Path(args.store) / "zarr.json").exists():
        try:
            from sae_dist.store import ActivationStore

            ActivationStore(args.store, batch_tokens=1, prefetch=0, normalize="none").close()
            return
        except Exception as e:  # unfinished harvest: sae-harvest resumes it
            print(f"store {args.store} not usable yet ({type(e).__name__}: {e}); harvesting", flush=True)
    run_dir = Path(args.out) / "harvest"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [_bin("sae-harvest"), f"run_dir={run_dir}", f"store.path={args.store}",
           f"harvest.tokens={args.harvest_tokens}", *_common(args)]
    print("harvest:", " ".join(cmd), flush=True)
    wall = _run(cmd, run_dir / "harvest.log")
    print(f"harvest done in {wall:.0f} s", flush=True)


def _shape_overrides(args) -> list[str]:
    return [f"sae.d_sae={args.d_sae}", f"sae.k={args.k}", f"sae.dead_tokens={args.dead_tokens}",
            f"trainer.tokens={args.tokens}", f"trainer.batch_tokens={args.batch_tokens}",
            "trainer.checkpoint_every_steps=100000"]


def _step_ms_from_log(train_log: Path, batch_tokens: int) -> float | None:
    """Median ms per step from train_log.jsonl's train/tokens_per_s (first logged window skipped)."""
    if not train_log.exists():
        return None
    tps = []
    for line in train_log.read_text().splitlines():
        try:
            v = json.loads(line).get("train/tokens_per_s")
        except json.JSONDecodeError:
            continue
        if v:
            tps.append(float(v))
    tps = tps[1:] or tps
    return 1000.0 * batch_tokens / statistics.median(tps) if tps else None


def _fresh_run_dir(args, name: str):
    """(run_dir, its train_wall.json, the saved record when --reuse finds the run finished, else None
    after emptying run_dir)."""
    run_dir = Path(args.out) / name
    done = run_dir / "train_wall.json"
    if args.reuse and done.exists() and (run_dir / "sae" / "cfg.json").exists():
        return run_dir, done, json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir, done, None


def train_ours(args, name: str, overrides: list[str]) -> dict:
    run_dir, done, rec = _fresh_run_dir(args, name)
    if rec is not None:
        return rec
    cmd = [_bin("sae-train"), f"run_dir={run_dir}", f"store.path={args.store}", *_shape_overrides(args),
           *_common(args), *overrides]
    print(f"[{name}] train:", " ".join(cmd), flush=True)
    wall = _run(cmd, run_dir / "train.log")
    rec = {"train_wall_s": wall, "step_ms": _step_ms_from_log(run_dir / "train_log.jsonl", args.batch_tokens),
           "command": " ".join(cmd)}
    done.write_text(json.dumps(rec, indent=2))
    return rec


def train_sparsify(args, name: str) -> dict:
    """Train sparsify's SparseCoder on the store (module docstring) and export it in our layout."""
    run_dir, done, rec = _fresh_run_dir(args, name)
    if rec is not None:
        return rec
    t0 = time.perf_counter()
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder does not run on CPU tensors
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae
    from sae_dist.sae.topk import TopKSAE
    from sae_dist.store import ActivationStore

    device = torch.device("cpu" if args.device == "auto" and not torch.cuda.is_available() else
                          ("cuda" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    store = ActivationStore(args.store, batch_tokens=args.batch_tokens, seed=args.seed, device=device,
                            normalize="none")
    d, n, k, B = store.d_in, args.d_sae, args.k, args.batch_tokens
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device, dtype=torch.float32)
    if args.sparsify_enc_init != "default":  # ablation: W_enc = scale * W_dec^T (our tied init) instead
        with torch.no_grad():
            sc.set_decoder_norm_to_unit_norm()
            sc.encoder.weight.copy_(float(args.sparsify_enc_init) * sc.W_dec)
    lr = args.sparsify_lr_scale * 2e-4 / math.sqrt(n / 2**14)
    opt = torch.optim.Adam(sc.parameters(), lr=lr)
    n_steps = args.tokens // B
    warm = args.sparsify_warmup

    def lr_factor(step: int) -> float:  # transformers' linear schedule with warm-up, as sparsify's trainer
        if args.sparsify_schedule == "constant":
            return 1.0
        if step < warm:
            return step / max(1, warm)
        return max(0.0, (n_steps - step) / max(1, n_steps - warm))

    since_fired = torch.zeros(n, dtype=torch.long, device=device)
    step_times = []
    it = iter(store)
    for step in range(n_steps):
        x = next(it)
        ts = time.perf_counter()
        if step == 0:
            sc.b_dec.data = (x.median(0).values if args.sparsify_b_dec == "median" else x.mean(0)).to(sc.dtype)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step)
        sc.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_tokens if args.sparsify_auxk_alpha > 0 else None
        out = sc(x, dead_mask=dead)
        loss = out.fvu + args.sparsify_auxk_alpha * out.auxk_loss
        loss.backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
        step_times.append(time.perf_counter() - ts)
        if (step + 1) % 50 == 0 or step + 1 == n_steps:
            print(f"[{name}] step {step + 1}/{n_steps} fvu {float(out.fvu):.4f} "
                  f"dead {float((since_fired > args.dead_tokens).float().mean()):.3f} "
                  f"{1000 * statistics.median(step_times[-50:]):.0f} ms/step", flush=True)
    hook, model_name = store.attrs.get("hook_name"), store.attrs.get("model")
    store.close()
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=n, k=k, normalize="none"))
    with torch.no_grad():
        sae.W_enc.copy_(sc.encoder.weight.T)
        sae.b_enc.copy_(sc.encoder.bias)
        sae.W_dec.copy_(sc.W_dec)  # as trained (sparsify renormalises before each step, not after the last)
        sae.b_dec.copy_(sc.b_dec)
    export_sae(sae, run_dir / "sae", hook_name=hook, model_name=model_name, normalize="none",
               extra_cfg={"training_tokens": n_steps * B, "trained_by": "sparsify recipe (benchmarks/quality.py)"})
    wall = time.perf_counter() - t0
    rec = {"train_wall_s": wall, "step_ms": 1000 * statistics.median(step_times[1:] or step_times),
           "command": f"train_sparsify(auxk_alpha={args.sparsify_auxk_alpha}, schedule={args.sparsify_schedule}, "
                      f"b_dec={args.sparsify_b_dec}, enc_init={args.sparsify_enc_init}, lr={lr:.4g})"}
    done.write_text(json.dumps(rec, indent=2))
    return rec


def evaluate(args, name: str) -> dict:
    run_dir = Path(args.out) / name
    ev = run_dir / "eval.json"
    if not (args.reuse and ev.exists()):
        cmd = [_bin("sae-eval"), f"run_dir={run_dir}", f"sae_path={run_dir / 'sae'}",
               f"eval.eval_tokens={args.eval_tokens}", "eval.probes=false", "eval.ablation_latents=0",
               "eval.n2g_latents=0", "eval.shrinkage_tokens=0", *_common(args)]
        print(f"[{name}] eval:", " ".join(cmd), flush=True)
        _run(cmd, run_dir / "eval.log")
    res = json.loads(ev.read_text())
    return {key: res.get(key) for key in EVAL_KEYS}


def table(rows: list[dict]) -> str:
    clean = next((r["ce_loss_clean"] for r in rows if r.get("ce_loss_clean") is not None), None)
    lines = [f"| run | held-out fvu | CE with SAE (clean {clean:.3f}) | CE increase | CE loss score | KL | "
             "L0 | train wall | ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['fvu']:.4f} | {r['ce_loss_sae']:.3f} | {r['ce_loss_sae'] - r['ce_loss_clean']:.3f} | "
            f"{r['ce_loss_score']:.4f} | {r['kl_div']:.3f} | {r['l0']:.1f} | {r['train_wall_s']:.0f} s | "
            f"{r['step_ms']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/quality", help="directory of the runs (one folder per run)")
    p.add_argument("--store", default=None, help="activation store (default <out>/store; harvested if absent)")
    p.add_argument("--harvest-tokens", type=int, default=250_000, help="tokens to harvest when building the store")
    p.add_argument("--tokens", type=int, default=1_600_000, help="training tokens per SAE")
    p.add_argument("--d-sae", "--n-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--dead-tokens", type=int, default=250_000, help="AuxK dead threshold (tokens), both trainers")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for sae-eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--only", choices=("both", "ours", "sparsify"), default="both")
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=None,
                   help="an extra run of ours: NAME and space-separated sae-train overrides "
                        "(e.g. --variant scalar 'sae.normalize=scalar'); repeatable. 'ours' (the defaults) "
                        "always runs unless --no-default")
    p.add_argument("--no-default", action="store_true", help="skip the run of ours at its defaults")
    p.add_argument("--sparsify-auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--sparsify-schedule", choices=("constant", "trainer"), default="constant",
                   help="constant lr (default) or sparsify trainer's linear warm-up then linear decay to 0")
    p.add_argument("--sparsify-warmup", type=int, default=1000, help="warm-up steps of --sparsify-schedule trainer")
    p.add_argument("--sparsify-b-dec", choices=("mean", "median"), default="mean",
                   help="b_dec at step 0: the first batch's mean (sparsify's trainer) or coordinate-wise median")
    p.add_argument("--sparsify-enc-init", default="default",
                   help="'default' (nn.Linear's init, decoder its unit-norm copy) or a number c: encoder = "
                        "c * the unit-norm decoder (ablation; c=1 is our tied init)")
    p.add_argument("--sparsify-lr-scale", type=float, default=1.0,
                   help="sparsify's lr = this * 2e-4 / sqrt(n / 2^14) (its default rule at 1.0; ablation)")
    p.add_argument("--sparsify-name", default="sparsify", help="run name of the sparsify run")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs / evals found under --out")
    p.add_argument("--json", default=None, help="output JSON (default <out>/quality.json)")
    args = p.parse_args(argv)
    args.store = args.store or str(Path(args.out) / "store")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    build_store(args)

    runs: list[tuple[str, list[str] | None]] = []
    if args.only in ("both", "ours"):
        if not args.no_default:
            runs.append(("ours", []))
        for name, ov in args.variant or []:
            runs.append((name, ov.split()))
    if args.only in ("both", "sparsify"):
        runs.append((args.sparsify_name, None))
    rows = []
    for name, ov in runs:
        rec = train_sparsify(args, name) if ov is None else train_ours(args, name, ov)
        rows.append({"name": name, "overrides": ov, **rec, **evaluate(args, name)})
        print(table(rows[-1:]), flush=True)
    md = table(rows)
    print(md)
    out_json = Path(args.json or Path(args.out) / "quality.json")
    out_json.write_text(json.dumps({"args": vars(args), "runs": rows, "table": md,
                                    "wall_s": time.perf_counter() - t_start}, indent=2))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
