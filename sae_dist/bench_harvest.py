"""Harvest benchmark: several hook points from one LM pass against the deepest of them alone.

`python -m sae_dist.bench_harvest [--tokens T] [--hooks H1,H2,...] [--repeats R] [--threads N] [--model M]
[--device D] [--seqs-per-shard S]` runs the LM of the default config (the embedded SmolLM2-135M-Instruct in
the default `model.dtype`: fp32 on CPU; `--model` a local transformers directory instead) on `--device` (cpu,
or cuda) over the default text (this interpreter's standard library) and times
`harvest` twice per repeat into fresh temporary stores: the deepest hook alone, then all the hooks (one
store each). `--seqs-per-shard` sets harvest's shard size (sequences, a multiple of 8; default: harvest's),
so that a run of several shards shows the background shard writer overlapping the LM. It prints ONE JSON
line: `model`, `hooks`, `deepest`, `tokens`, `seqs_per_shard`, `single_s` and `multi_s`
(medians over the repeats of the wall time of one `harvest` call; loading the model and opening the
dataset excluded), `multi_over_single` = multi_s / single_s, `threads`, `torch`, `device`, `date`.
docs/benchmarks.md records the result; the goal (issue: many hook points from one LM pass) is
multi_over_single <= 1.2 for three hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import itertools
import json
import statistics
import sys
import tempfile
import time

import torch

DEFAULT_HOOKS = "blocks.6.hook_resid_post,blocks.12.hook_mlp_out,blocks.20.hook_resid_post"
_KIND_ORDER = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")  # order of execution in a layer


def deepest_hook(model, hooks: list[str]) -> str:
    """The hook among `hooks` that the forward reaches last (ValueError for an unknown hook name)."""
    from sae_dist.harvest.hooks import resolve_hook

    specs = [resolve_hook(model, h) for h in hooks]
    return max(specs, key=lambda s: (s.layer, _KIND_ORDER.index(s.kind))).name


def _timed_harvest(model, tok, hook_name, tokens: int, ctx_len: int, shard: dict) -> float:
    """Wall seconds of one `harvest` of `tokens` rows at `hook_name` (str or list) into a temporary store
    (`shard`: {} or {"seqs_per_shard": S}); the writes have finished when harvest returns."""
    from sae_dist.config import DataConfig
    from sae_dist.harvest.harvester import harvest
    from sae_dist.harvest.text import iter_documents

    with tempfile.TemporaryDirectory(prefix="bench_harvest_") as d:
        docs = iter_documents(DataConfig().dataset)
        docs = itertools.chain([next(docs)], docs)  # the dataset is opened here, outside the timed part
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the one JSON line
            harvest(model=model, tokenizer=tok, hook_name=hook_name, docs=docs, store_path=f"{d}/store",
                    tokens=tokens, ctx_len=ctx_len, progress=False, **shard)
        return time.perf_counter() - t0


def run_bench(args: argparse.Namespace) -> dict:
    """Load the default LM, harvest the deepest hook alone and all hooks `args.repeats` times, alternating."""
    from sae_dist.config import DataConfig, ModelConfig
    from sae_dist.harvest.lm import load_lm, model_display_name

    if args.threads:
        torch.set_num_threads(args.threads)
    mc, ctx_len = ModelConfig(), DataConfig().ctx_len
    name, gguf = (mc.name, mc.gguf_file) if args.model is None else (args.model, None)
    model, tok = load_lm(name, gguf_file=gguf, dtype=mc.dtype, device=args.device)
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    deepest = deepest_hook(model, hooks)
    shard = {} if args.seqs_per_shard is None else {"seqs_per_shard": args.seqs_per_shard}
    _timed_harvest(model, tok, deepest, min(args.tokens, 2 * ctx_len), ctx_len, shard)  # warm-up
    single, multi = [], []
    for _ in range(args.repeats):
        single.append(_timed_harvest(model, tok, deepest, args.tokens, ctx_len, shard))
        multi.append(_timed_harvest(model, tok, hooks, args.tokens, ctx_len, shard))
    s, m = statistics.median(single), statistics.median(multi)
    return {"model": model_display_name(name, gguf), "hooks": hooks, "deepest": deepest,
            "tokens": args.tokens, "ctx_len": ctx_len, "seqs_per_shard": args.seqs_per_shard,
            "repeats": args.repeats, "single_s": round(s, 6),
            "multi_s": round(m, 6), "multi_over_single": round(m / s, 4), "single_all_s": [round(x, 3) for x in single],
            "multi_all_s": [round(x, 3) for x in multi], "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": args.device, "dtype": str(model.dtype).removeprefix("torch."),
            "date": _dt.date.today().isoformat()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_dist.bench_harvest", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20_000, help="activation rows per harvest")
    p.add_argument("--hooks", default=DEFAULT_HOOKS, help="comma-separated hook names (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed harvests of each kind (medians are reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--model", default=None, help="a local transformers LM directory (default: the embedded LM)")
    p.add_argument("--device", default="cpu", help="where the LM runs: cpu (default) or cuda[:N]")
    p.add_argument("--seqs-per-shard", type=int, default=None,
                   help="harvest's shard size in sequences, a multiple of 8 (default: harvest's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        raise SystemExit(f"--tokens ({args.tokens}) and --repeats ({args.repeats}) must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu")
    try:
        print(json.dumps(run_bench(args)), flush=True)
    except ValueError as e:  # an unknown hook name: the message lists the valid ones
        raise SystemExit(f"python -m sae_dist.bench_harvest: error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
