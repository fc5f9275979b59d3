"""The GPU code checked without a GPU: every kernel compiled for sm_90a (registers, spills, 64-bit
offsets, by `sae_dist.kernels.report`). The bounded number of compiled variants per shape is counted by
tests/unit/kernels/test_kernels_dead_pass.py, on the kernel device."""

import json
import os
import subprocess
import sys

import pytest

from sae_dist.kernels import report

KERNELS = {"encoder_topk", "encoder_topk.multi_topk"} | {f"{p}.{k}" for p in ("decode", "auxk_decode")
                              for k in ("fwd", "grad_values", "grad_wdec_atomic", "grad_wdec_rows")}


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}


@pytest.mark.slow
@pytest.mark.parametrize(("k", "dtypes"), [(64, ("bf16", "fp32")), (32, ("bf16",))])
def test_report_compiles_every_kernel_for_sm90a_without_spills_and_with_int64_offsets(k, dtypes):
    """The report CLI in a process without the interpreter at d_in 4096, k_aux 2048: every kernel of the step
    and every launch configuration the encoder's tuner may choose there (`--candidates`), 0 spill bytes, 64-bit
    offsets. k = 64 in bf16 and TF32: the production extremes (64 and 256 top-k slots); k = 32 in bf16: the
    classes `make gpu-check` tunes (32 and 128 slots). (The rest: docs/benchmarks.md's run of the whole
    report, too slow for the suite.)"""
    from sae_dist.kernels.encoder_topk import encoder_candidates
    from sae_dist.kernels.tune import config_tag

    cmd = [sys.executable, "-m", "sae_dist.kernels.report", "--d-in", "4096", "--k", str(k), "--k-aux", "2048",
           "--dtype", *dtypes, "--jobs", "2", "--candidates"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in r.stderr  # every launch states enable_fp_fusion (COMPILE_OPTIONS)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {row["kernel"] for row in rows if " " not in row["kernel"]} == KERNELS
    want = set()
    for dtype in dtypes:
        prec = None if dtype == "bf16" else "tf32"
        for name, kk in (("encoder_topk", k), ("encoder_topk.multi_topk", 4 * k)):
            want |= {(f"{name} {config_tag(c)}", dtype, k) for c in encoder_candidates(kk, prec)[1:]}
    assert {(row["kernel"], row["config"]["dtype"], row["config"]["k"]) for row in rows if " " in row["kernel"]} == want
    assert len(rows) == len(dtypes) * len(KERNELS) + len(want)
    for row in rows:
        assert row["arch"] == "sm_90a" and row["config"]["d_in"] == 4096
        assert row["spill_bytes"] == 0 and row["int64_offsets"] is True, row
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= 228 * 1024, row


def test_an_unaligned_d_in_is_padded_and_compiles_the_encoder_without_spills():
    """d_in = 1000 (not a multiple of 16): `encoder_launch` gives the kernel xc in rows padded to 1008 elements, so
    Triton specialises its row stride as aligned; with the unpadded stride this launch (bf16, k = 32, sm_90a)
    spilled 856 bytes per thread."""
    code = ("import torch\nfrom sae_dist.kernels import encoder_topk as et\n"
            "from sae_dist.kernels.report import compile_launch\n"
            "xc = torch.empty(32768, 1000, dtype=torch.bfloat16, device='meta')\n"
            "W = torch.empty(1000, 1 << 20, dtype=torch.bfloat16, device='meta')\n"
            "launch = et.encoder_launch(xc, W, W[0], 32, 4096)[0]\n"
            "print(launch.args[0].shape[1], launch.args[9], compile_launch(launch)['spill_bytes'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1000", "1008", "0"]


def _compile_ttir(src: str, tmp_path, name: str) -> str:
    """Triton IR of a one-kernel module `src` compiled for sm_90a in a fresh process."""
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    code = (
        "import importlib.util, sys, triton\n"
        "from triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "sig = {'x': '*fp32', 'out': '*fp32', 'i': 'i32', 'stride': 'i32', 'BLOCK': 'constexpr'}\n"
        "k = triton.compile(ASTSource(m.kern, sig, {'BLOCK': 16}), target=GPUTarget('cuda', 90, 32))\n"
        "sys.stdout.write(k.asm['ttir'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


_KERNEL_SRC = """
import triton
import triton.language as tl

@triton.jit
def kern(x, out, i, stride, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK){cast}
    tl.store(out + r, tl.load(x + (r * stride + i)))
"""


def test_int64_offset_check_tells_32_bit_from_64_bit_pointer_arithmetic(tmp_path):
    """The report's offset check on IR of known width: `x + r * stride` in int32 (how the fused encoder
    indexed W_enc before: it wraps once d_in x n >= 2^31) fails, the int64 form passes."""
    ttir32 = _compile_ttir(_KERNEL_SRC.format(cast=""), tmp_path, "k32")
    ttir64 = _compile_ttir(_KERNEL_SRC.format(cast=".to(tl.int64)"), tmp_path, "k64")
    assert "tt.addptr" in ttir32 and not report.int64_offsets(ttir32)
    assert report.int64_offsets(ttir64)


def test_report_rejects_a_bad_arch():
    r = subprocess.run([sys.executable, "-m", "sae_dist.kernels.report", "--arch", "hopper"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode != 0 and "--arch 'hopper'" in r.stderr and "sm_90a" in r.stderr
