"""Streaming benchmark: training straight from the LM against harvesting then training, and a shared sweep
against separate streamed runs.

`python -m sae_dist.bench_stream [--tokens T] [--d-sae N] [--k K] [--batch B] [--buffer R] [--points P]
[--threads N] [--model M] [--quality-seeds S]` loads the LM of the default config (the embedded
SmolLM2-135M-Instruct, fp32 on CPU; `--model` a local transformers directory instead) and its default hook
point, reads the default text (this interpreter's standard library; the documents are read into memory
before any timing), and times, each into fresh temporary directories, with wandb and checkpoints off:

1. `harvest` of T tokens, then `train` of a TopK SAE (N latents, k, batch B) on that store: `harvest_s`, `train_s`;
2. the same training from the LM (`train(source=LMStream...)`, shuffle windows of R rows): `stream_s`; and
   the raw-space fvu of both SAEs on 64 held-out contexts (`heldout_fvu_store`, `heldout_fvu_stream`);
3. a shared sweep of P points from the LM (`train_grid`; k, 2k, 4k, 8k ...) and the same P points as
   separate streamed runs: `grid_s`, `separate_s`.

It prints ONE JSON line with those wall times and `stream_over_sum` = stream_s / (harvest_s + train_s) (the
goal is <= 1.1) and `grid_over_separate` = grid_s / separate_s (the goal is <= 0.5), plus `threads`, `torch`,
`device` and `date`. docs/benchmarks.md records the results.

`--quality-seeds S` measures quality instead of time: the first ceil(T / (ctx_len - 1)) train sequences of
the text, packed once, are harvested into one store (`row_order=shuffled_in_shard`) and streamed as
pretokenised sequences (the stream's shuffled order), and for seeds 0 .. S-1 an SAE is trained on each; the
JSON line holds `heldout_fvu_store` and `heldout_fvu_stream` (one per seed), their means and
`stream_over_store` = the ratio of the means (the goal is <= 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _documents(tokens: int, data, tok, eval_seqs: int = 64) -> list[str]:
    """The first documents of `data.dataset` (a DataConfig; ctx_len and eval_fraction from it too), enough for
    2 x `tokens` train rows and `eval_seqs` held-out contexts (read before any timing)."""
    from sae_dist.harvest.text import is_eval_document, iter_documents, pack_document

    ctx_len, eval_fraction = data.ctx_len, data.eval_fraction
    docs, rows, held_out = [], 0, 0
    for text in iter_documents(data.dataset):
        docs.append(text)
        n = len(pack_document(text, tok, ctx_len, 0))
        if is_eval_document(text, eval_fraction):
            held_out += n
        else:
            rows += n * (ctx_len - 1)
        if rows >= 2 * tokens and held_out >= eval_seqs:
            return docs
    return docs


#: train()'s keywords in every benchmark run: no progress bar, no wandb
_QUIET = dict(progress=False, wandb_cfg={"enabled": False})


def _timed(fn) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the one JSON line
        fn()
    return time.perf_counter() - t0


def _sae_runs(args, k: int, d_in: int):
    from sae_dist.sae import SAEConfig
    from sae_dist.train import TrainerConfig

    return (SAEConfig(d_in=d_in, d_sae=args.d_sae, k=k),
            TrainerConfig(tokens=args.tokens, batch_tokens=args.batch, keep_checkpoints=0, log_every_steps=50))


@torch.no_grad()
def heldout_fvu(model, tok, hook: str, docs: list[str], ctx_len: int, eval_fraction: float, sae_dirs: list,
                n_seqs: int = 64) -> list[float]:
    """Raw-space fvu of each exported SAE in `sae_dirs` on the hook's activations of the first `n_seqs`
    held-out (eval split) contexts of `docs` (sae-eval's, `heldout_sequences`):
    sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    import sae_dist
    from sae_dist.eval.evaluate import heldout_sequences
    from sae_dist.harvest.harvester import lm_d_model
    from sae_dist.harvest.hooks import run_to_hook

    seqs = heldout_sequences(docs, tok, ctx_len, n_seqs * (ctx_len - 1), eval_fraction)
    x = run_to_hook(model, hook, seqs)[:, 1:].reshape(-1, lm_d_model(model)).double()
    out = []
    for d in sae_dirs:
        xh = sae_dist.load_sae(d)(x.float()).double()
        out.append(round(float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), 5))
    return out


def run_quality(args: argparse.Namespace, model, tok, hook: str, d_in: int, docs: list[str], data) -> dict:
    """Held-out fvu of SAEs trained on a store and streamed from the same packed sequences, per seed
    (`--quality-seeds`, module docstring); `data` (a DataConfig) gives ctx_len and eval_fraction, as for the
    timed runs."""
    from sae_dist.harvest.harvester import harvest
    from sae_dist.harvest.stream import LMStream
    from sae_dist.harvest.text import packed_sequences
    from sae_dist.train.trainer import train

    seeds = range(args.quality_seeds)
    n = -(-args.tokens // (data.ctx_len - 1))
    seqs = list(itertools.islice(packed_sequences(docs, tok, data.ctx_len, eval_fraction=data.eval_fraction), n))
    source = functools.partial(LMStream, model=model, tokenizer=tok, hook_name=hook, sequences=seqs,
                               ctx_len=data.ctx_len, eval_fraction=data.eval_fraction, buffer_tokens=args.buffer)
    sae_cfg, tcfg = _sae_runs(args, args.k, d_in)
    with tempfile.TemporaryDirectory(prefix="bench_stream_q_") as d, contextlib.redirect_stdout(sys.stderr):
        d = Path(d)
        harvest(model=model, tokenizer=tok, hook_name=hook, docs=None, sequences=seqs, row_order="shuffled_in_shard",
                store_path=str(d / "store"), tokens=args.tokens, ctx_len=data.ctx_len, progress=False)
        for seed in seeds:
            train(store_path=d / "store", out_dir=d / f"store{seed}", sae_cfg=sae_cfg, trainer_cfg=tcfg, seed=seed,
                  **_QUIET)
            train(source=source, out_dir=d / f"lm{seed}", sae_cfg=sae_cfg, trainer_cfg=tcfg, seed=seed, **_QUIET)
        fvu = heldout_fvu(model, tok, hook, docs, data.ctx_len, data.eval_fraction,
                          [d / f"{kind}{seed}" / "sae" for kind in ("store", "lm") for seed in seeds])
    store, stream = fvu[: len(seeds)], fvu[len(seeds):]
    mean_store, mean_stream = sum(store) / len(store), sum(stream) / len(stream)
    return {"heldout_fvu_store": store, "heldout_fvu_stream": stream, "mean_store": round(mean_store, 5),
            "mean_stream": round(mean_stream, 5), "stream_over_store": round(mean_stream / mean_store, 4)}


def run_bench(args: argparse.Namespace) -> dict:
    """Load the LM and the text once, then time the stages of the module docstring."""
    from sae_dist.config import DataConfig, ModelConfig
    from sae_dist.harvest.harvester import harvest, lm_d_model
    from sae_dist.harvest.hooks import default_hook_name
    from sae_dist.harvest.lm import load_lm, model_display_name
    from sae_dist.harvest.stream import LMStream
    from sae_dist.train.trainer import GridPoint, train, train_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    mc, data = ModelConfig(), DataConfig()
    name, gguf = (mc.name, mc.gguf_file) if args.model is None else (args.model, None)
    model, tok = load_lm(name, gguf_file=gguf, dtype=mc.dtype, device="cpu")
    hook, d_in = default_hook_name(model), lm_d_model(model)
    docs = _documents(args.tokens, data, tok)
    common = {"model": model_display_name(name, gguf), "hook_name": hook, "tokens": args.tokens, "d_sae": args.d_sae,
              "k": args.k, "batch": args.batch, "buffer_tokens": args.buffer, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "device": "cpu", "date": _dt.date.today().isoformat()}
    if args.quality_seeds:
        return {**common, "seeds": args.quality_seeds, **run_quality(args, model, tok, hook, d_in, docs, data)}
    source = functools.partial(LMStream, model=model, tokenizer=tok, hook_name=hook, docs=lambda: docs,
                               ctx_len=data.ctx_len, eval_fraction=data.eval_fraction, buffer_tokens=args.buffer)
    ks = [args.k * 2**i for i in range(args.points)]
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as d:
        d = Path(d)
        sae_cfg, tcfg = _sae_runs(args, args.k, d_in)
        harvest_s = _timed(lambda: harvest(model=model, tokenizer=tok, hook_name=hook, docs=iter(docs),
                                           store_path=str(d / "store"), tokens=args.tokens, ctx_len=data.ctx_len,
                                           progress=False))
        train_s = _timed(lambda: train(store_path=d / "store", out_dir=d / "store_run", sae_cfg=sae_cfg,
                                       trainer_cfg=tcfg, **_QUIET))
        stream_s = _timed(lambda: train(source=source, out_dir=d / "lm_run", sae_cfg=sae_cfg, trainer_cfg=tcfg,
                                        **_QUIET))
        points = [GridPoint(d / f"grid/{k}", *_sae_runs(args, k, d_in), {"enabled": False}) for k in ks]
        grid_s = _timed(lambda: train_grid(points=points, source=source, progress=False))
        fvu = heldout_fvu(model, tok, hook, docs, data.ctx_len, data.eval_fraction,
                          [d / "store_run" / "sae", d / "lm_run" / "sae"])
        separate_s = sum(_timed(lambda p=p: train(source=source, out_dir=d / f"alone/{p.sae_cfg.k}", sae_cfg=p.sae_cfg,
                                                  trainer_cfg=p.trainer_cfg, **_QUIET)) for p in points)
    return {**common, "grid_k": ks, "harvest_s": round(harvest_s, 6), "train_s": round(train_s, 6),
            "stream_s": round(stream_s, 6), "stream_over_sum": round(stream_s / (harvest_s + train_s), 4),
            "heldout_fvu_store": fvu[0], "heldout_fvu_stream": fvu[1], "grid_s": round(grid_s, 6),
            "separate_s": round(separate_s, 6), "grid_over_separate": round(grid_s / separate_s, 4)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_dist.bench_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65_536, help="training tokens (= harvested rows)")
    p.add_argument("--d-sae", type=int, default=8192, help="latents of the SAE")
    p.add_argument("--k", type=int, default=32, help="active latents (the grid uses k, 2k, 4k, ...)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--buffer", type=int, default=16_384, help="rows per shuffle window of the stream")
    p.add_argument("--points", type=int, default=4, help="points of the shared sweep")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--model", default=None, help="a local transformers LM directory (default: the embedded LM)")
    p.add_argument("--quality-seeds", type=int, default=0,
                   help="instead of timing: held-out fvu of store-trained vs streamed SAEs over this many seeds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
           if k in ("tokens", "d_sae", "k", "batch", "buffer", "points") and v < 1]
    if bad or args.batch > args.tokens:
        raise SystemExit(f"python -m sae_dist.bench_stream: error: {', '.join(bad) or '--batch > --tokens'}: "
                         "sizes must be >= 1 and --batch <= --tokens")
    print(json.dumps(run_bench(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
