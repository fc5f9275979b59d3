"""Offline GPU-code report: compile every Triton kernel for a GPU architecture on any machine.

    python -m sae_dist.kernels.report [--arch sm_90a] [--d-in 768 2304 4096] [--k 32 64]
                                      [--k-aux 512 2048] [--dtype bf16 fp32] [--jobs N]

prints one JSON line per (kernel, configuration):

    {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "int64_offsets",
     "compile_s", "num_warps", "num_stages"}

Each line is the launch the training step makes at that configuration (`Launch` objects built by the
kernels' own launch functions from meta tensors: same tile shapes, constexprs, launch options and
argument specialisation as on a GPU), compiled by Triton for the target and assembled by the `ptxas`
that ships in Triton's wheel, so no GPU is needed:

- registers / spill_bytes: from `ptxas -v` (spill_bytes = spill stores + spill loads, per thread);
- shared_bytes: the kernel's static shared memory (Triton's metadata);
- int64_offsets: every pointer offset in the kernel's Triton IR (`tt.addptr`) is 64-bit, so no index
  product wraps at 2^31 (d_in x d_sae reaches it at production widths);
- compile_s: wall seconds of Triton's compile to cubin for that variant. Configurations that launch
  an identical variant (same key) are compiled once and share the numbers.

The configurations take B = 32768 tokens and n = 2^20 latents per process (so d_in x n >= 2^31 at
d_in >= 2048). Exit status 1 when any line has spills or 32-bit offsets (`--no-fail` to always exit 0).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPORT_TOKENS = 32768
REPORT_LATENTS = 1 << 20
#: bf16: 16-bit operands; fp32: fp32 operands on TF32 tensor cores (torch's fp32_precision = "tf32");
#: fp32-ieee: fp32 operands with IEEE dots (the setting "ieee")
DTYPES = ("bf16", "fp32", "fp32-ieee")
ARCH_RE = re.compile(r"^sm_(\d+)a?$")


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-ieee": torch.float32}[name]


def _multi_topk_factor() -> int:
    """SAEConfig's default Multi-TopK factor (the encoder then selects factor x k latents per token)."""
    from sae_dist.fielddoc import field_default
    from sae_dist.sae.config import SAEConfig

    return field_default(SAEConfig, "multi_topk_factor")


def config_launches(d_in: int, k: int, k_aux: int, dtype: str, candidates: bool = False) -> list:
    """The Triton launches of one TopK-SAE training step at (d_in, k, k_aux, dtype), built from meta
    tensors of shape B = REPORT_TOKENS, n = REPORT_LATENTS: the fused encoder (at k, and at Multi-TopK's
    factor x k with SAEConfig's default factor), the main sparse decode (forward, grad of values, grad of
    W_dec by atomics and by the deterministic row sum) and the AuxK decode (k_aux codes, fp32 output, no
    b_dec). candidates: also the encoder's other tuning candidates (`encoder_topk.encoder_candidates`,
    named "<encoder name> <config tag>"). Returns a list of `_common.Launch`."""
    import torch

    from . import encoder_topk as et
    from . import sparse_decode as sd
    from .tune import config_tag

    B, n, dt, m = REPORT_TOKENS, REPORT_LATENTS, _torch_dtype(dtype), "meta"
    torch.backends.cuda.matmul.fp32_precision = "ieee" if dtype == "fp32-ieee" else "tf32"
    xc = torch.empty(B, d_in, dtype=dt, device=m)
    W_enc = torch.empty(d_in, n, dtype=dt, device=m)
    W_dec = torch.empty(n, d_in, dtype=dt, device=m)
    b_enc, b_dec = torch.empty(n, dtype=dt, device=m), torch.empty(d_in, dtype=dt, device=m)
    out = []
    # Multi-TopK's encoder selects factor x k per token
    for kk, name in ((k, "encoder_topk"), (_multi_topk_factor() * k, "encoder_topk.multi_topk")):
        cands = et.encoder_candidates(kk, et.dot_precision(xc))[1:] if candidates else []
        for cfg in [None, *cands]:
            launch = et.encoder_launch(xc, W_enc, b_enc, kk, 4096, config=cfg)[0]
            launch.name = name if cfg is None else f"{name} {config_tag(cfg)}"
            out.append(launch)
    for kk, name, bias, out_dtype in ((k, "decode", b_dec, dt), (k_aux, "auxk_decode", None, torch.float32)):
        vals = torch.empty(B, kk, dtype=dt, device=m)
        idx = torch.empty(B, kk, dtype=torch.int64, device=m)
        go = torch.empty(B, d_in, dtype=dt if bias is not None else torch.float32, device=m)
        launches = [
            sd.forward_launch(vals, idx, W_dec, bias, torch.empty(B, d_in, dtype=out_dtype, device=m)),
            sd.grad_values_launch(go, idx, W_dec, torch.empty(B, kk, dtype=dt, device=m)),
            sd.grad_wdec_atomic_launch(go, idx, vals, torch.empty(n, d_in, dtype=torch.float32, device=m)),
            sd.grad_wdec_rows_launch(go, torch.empty(B * kk, dtype=torch.int64, device=m),
                                     torch.empty(B * kk, dtype=dt, device=m),
                                     torch.empty(n + 1, dtype=torch.int64, device=m), W_dec.new_empty(n, d_in)),
        ]
        for launch in launches:
            launch.name = f"{name}.{launch.name}"
        out += launches
    return out


def _ptxas_stats(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread = stores + loads) from `ptxas -v` on the PTX,
    with the options Triton's own ptxas call uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(int(ARCH_RE.match(arch).group(1)))
    except TypeError:  # Triton 3.4: one ptxas for every architecture
        tool = get_ptxas()
    ptxas = tool[0] if isinstance(tool, tuple) else tool.path  # 3.3: (path, version)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                            "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    log = r.stdout + r.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def int64_offsets(ttir: str) -> bool:
    """True when every `tt.addptr` in the Triton IR adds a 64-bit offset (scalar or tensor)."""
    ops = re.findall(r"tt\.addptr [^\n]*?:\s*([^\n]*?)(?:\s+loc\(.*\))?$", ttir, flags=re.M)
    return bool(ops) and all(re.fullmatch(r"(tensor<[0-9x]*x)?i64>?", o.split(",")[-1].strip()) for o in ops)


def compile_launch(launch, arch: str = "sm_90a") -> dict:
    """Compile one `Launch` for `arch` (e.g. "sm_90a", "sm_80") without a GPU; returns its report
    fields (registers, spill_bytes, shared_bytes, int64_offsets, compile_s, num_warps, num_stages).
    Raises ValueError for an arch string that is not sm_XX[a]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m = ARCH_RE.match(arch)
    if not m:
        raise ValueError(f"arch={arch!r}; use a CUDA architecture such as sm_90a or sm_80")
    fn = launch.kernel
    names = [a for a in fn.arg_names if a not in launch.constexprs]
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for name, (ty, attr) in zip(names, launch.signature(), strict=True):
        if ty == "constexpr":
            constexprs[name] = attr
            signature[name] = "constexpr"
        else:
            signature[name] = ty
            if attr == "D":
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    kern = triton.compile(src, target=GPUTarget("cuda", int(m.group(1)), 32), options=dict(launch.options))
    compile_s = time.perf_counter() - t0
    regs, spills = _ptxas_stats(kern.asm["ptx"], arch)
    return dict(registers=regs, spill_bytes=spills, shared_bytes=int(kern.metadata.shared),
                int64_offsets=int64_offsets(kern.asm["ttir"]), compile_s=round(compile_s, 2),
                num_warps=kern.metadata.num_warps, num_stages=kern.metadata.num_stages)


def _compile_indexed(args) -> dict:
    cfg, i, arch, candidates = args
    return compile_launch(config_launches(*cfg, candidates=candidates)[i], arch)


def report(configs, arch: str = "sm_90a", jobs: int = 1, candidates: bool = False):
    """Yield one report row (dict) per (kernel, configuration) in `configs`, an iterable of
    (d_in, k, k_aux, dtype) tuples (with `candidates`, also one per encoder tuning candidate);
    identical variants are compiled once, `jobs` at a time."""
    rows, todo = [], {}
    for cfg in configs:
        for i, launch in enumerate(config_launches(*cfg, candidates=candidates)):
            key = launch.variant_key()
            todo.setdefault(key, (cfg, i, arch, candidates))
            rows.append((launch.name, cfg, key))
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = dict(zip(todo, pool.map(_compile_indexed, todo.values()), strict=True))
    for name, (d_in, k, k_aux, dtype), key in rows:
        config = dict(d_in=d_in, k=k, k_aux=k_aux, dtype=dtype, tokens=REPORT_TOKENS, d_sae=REPORT_LATENTS)
        yield dict(kernel=name, config=config, arch=arch, **done[key])


def markdown(rows) -> str:
    """The report rows as one markdown table, configurations with identical results merged into one line
    (their d_in / k / k_aux values listed)."""
    groups: dict = {}
    for r in rows:
        c = r["config"]
        stats = (r["kernel"], c["dtype"], r["registers"], r["spill_bytes"], r["shared_bytes"], r["int64_offsets"],
                 r["num_warps"], r["num_stages"])
        g = groups.setdefault(stats, {"d_in": set(), "k": set(), "k_aux": set(), "compile_s": 0.0})
        for f in ("d_in", "k", "k_aux"):
            g[f].add(c[f])
        g["compile_s"] = max(g["compile_s"], r["compile_s"])
    lines = ["| kernel | dtype | d_in | k | k_aux | registers | spill bytes | shared bytes | int64 offsets "
             "| warps x stages | compile s |", "|" + "---|" * 11]
    for (kern, dt, regs, spill, shared, i64, w, st), g in groups.items():
        cfg = [", ".join(str(v) for v in sorted(g[f])) for f in ("d_in", "k", "k_aux")]
        lines.append(f"| {kern} | {dt} | {' | '.join(cfg)} | {regs} | {spill} | {shared} | {i64} | {w} x {st} "
                     f"| {g['compile_s']:.1f} |")
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m sae_dist.kernels.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a", help="CUDA architecture (default sm_90a: H100/H200)")
    p.add_argument("--d-in", type=int, nargs="+", default=[768, 2304, 4096])
    p.add_argument("--k", type=int, nargs="+", default=[32, 64])
    p.add_argument("--k-aux", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even with spills or 32-bit offsets")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table (after the JSON lines)")
    p.add_argument("--candidates", action="store_true",
                   help="also compile the encoder's launch configurations that `sae_dist.kernels.tune` times")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0") and "triton" in sys.modules:
        raise SystemExit("TRITON_INTERPRET was set when Triton was imported; run the report in a fresh process")
    if not ARCH_RE.match(args.arch):
        raise SystemExit(f"--arch {args.arch!r}: use a CUDA architecture such as sm_90a or sm_80")
    bad = 0
    # a fresh compile cache, so compile_s is a real compile (not a hit of an earlier run's cache)
    cache = tempfile.TemporaryDirectory(prefix="sae-dist-report-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    configs = itertools.product(args.d_in, args.k, args.k_aux, args.dtype)
    rows = []
    for row in report(list(configs), args.arch, args.jobs, args.candidates):
        bad += row["spill_bytes"] > 0 or not row["int64_offsets"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.markdown:
        print(markdown(rows))
    return 1 if bad and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
