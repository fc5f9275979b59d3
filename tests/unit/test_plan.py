"""sae-plan (sae_dist/plan.py): shard shapes, memory / FLOPs / communication against hand counts, the
byte counts of the TopK exchange and the Triton split count against the code itself (recorded
collectives of `sae_dist.parallel.tp.global_keep`, the buffers `_select_triton` allocates) and the
refusal path. The Hydra CLI: tests/integration/test_plan_cli.py."""

from __future__ import annotations

import itertools
import json
import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_dist.plan import (
    ALLGATHER_CHUNK_BYTES,
    CANDIDATE_BUFFER_BYTES,
    DEAD_PASS_ELEMENTS,
    ENCODER_BLOCK_N,
    ENCODER_ROW_ALIGN,
    GRAD_CHUNK_BYTES,
    Cluster,
    GiB,
    PlanDoesNotFit,
    check_fits,
    harvest_store_bytes,
    kept_width,
    params_per_gpu,
    plan,
    shard_shapes,
    triton_encoder_splits,
)

ROOT = Path(__file__).resolve().parents[2]
N24, D4K, B_PAPER = 2**24, 4096, 131072
H100_8x8 = {"nodes": 8, "gpus_per_node": 8}


# ------------------------------------------------------------------------------------ shard shapes
def test_shard_shapes_match_an_independent_split():
    rng = random.Random(random.randrange(2**31))  # inputs drawn from the per-test seed (conftest.py)
    for _ in range(20):
        tp = rng.choice([1, 2, 4, 8, 16])
        d, n = rng.randint(1, 48), tp * rng.randint(1, 40)
        shapes = shard_shapes(d, n, tp)
        # the unsharded parameters split along the latent dim into tp equal parts (meta: no memory)
        full = {"W_enc": torch.empty(d, n, device="meta"), "b_enc": torch.empty(n, device="meta"),
                "W_dec": torch.empty(n, d, device="meta")}
        dims = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
        for name, t in full.items():
            parts = torch.tensor_split(t, tp, dim=dims[name])
            assert {tuple(p.shape) for p in parts} == {shapes[name]}, (name, d, n, tp)
        assert shapes["b_dec"] == (d,)  # replicated
        # over all ranks: every latent parameter exactly once, b_dec once per rank
        assert tp * params_per_gpu(d, n, tp) == 2 * d * n + n + tp * d


def test_shard_shapes_refuses_uneven_split():
    with pytest.raises(ValueError, match="not divisible by parallel.tp"):
        shard_shapes(64, 1000, 3)


def test_planned_shards_at_2_24_on_64_gpus():
    shapes = shard_shapes(D4K, N24, 64)
    assert shapes == {"W_enc": (4096, 262144), "b_enc": (262144,), "W_dec": (262144, 4096), "b_dec": (4096,)}
    r = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=64, cluster=H100_8x8)
    assert r["shard_shapes"] == {k: list(v) for k, v in shapes.items()}
    assert r["params_per_gpu"] == 2 * 4096 * 262144 + 262144 + 4096 == 2_147_749_888
    assert r["memory_bytes"]["params"] == 4 * 2_147_749_888
    assert r["config"]["k_aux"] == 2048  # power of two near d_in / 2
    assert (r["config"]["dp"], r["config"]["tokens_per_gpu"], r["config"]["latents_per_gpu"]) == (1, 131072, 262144)
    # Triton candidate buffers: k = 32 slots per split (the kernel holds no AuxK candidates); the 1 GiB
    # cap allows 2^30 / (131072 x 32 x 8) = 32 splits, so the span widens from 4096 to 262144 / 32 =
    # 8192 latents and the buffers are exactly the cap
    assert r["config"]["encoder_splits"] == 32
    cast = 2 * 4096 * 262144 + 2 * 262144  # the kernel's bf16 copy of W_enc and b_enc
    assert r["transient_bytes"]["forward"]["encoder_split_candidates"] - cast == 131072 * 32 * 32 * 8 == 2**30
    # AuxK dead pass: chunks of max(4096, 2 x 2048) = 4096 dead columns, in blocks of
    # 2^27 // (2048 + 4096) = 21845 tokens
    assert r["config"]["auxk_dead_chunk"] == 4096
    assert r["config"]["dead_latents_per_gpu"] == round(0.05 * 262144) == 13107
    assert r["flops"]["auxk_dead_matmul"]["flops"] == 2 * 131072 * 4096 * 13107


# ------------------------------------------------------------------------------------ hand counts
SMALL = dict(d_in=64, d_sae=1024, k=8, k_aux=32, batch_tokens=256, tp=4, cluster={"nodes": 1, "gpus_per_node": 8})
# by hand: dp = 8 / 4 = 2, Bl = 128 tokens, nl = 256 latents, P = 2*64*256 + 256 + 64 = 33088 params;
# slots per token: main wm = 8, AuxK wa = 32; own winners per rank: 128*8/4 = 256, 128*32/4 = 1024


def test_memory_equals_hand_count_torch_engine():
    r = plan(**SMALL)  # defaults: alltoall, compact decode, zero-gradient entries dropped, bf16 copies
    m = r["memory_bytes"]
    assert r["params_per_gpu"] == 33088
    assert m["params"] == 132352 and m["grads"] == 132352  # 4 B each
    assert m["optimizer"] == 264704  # Adam: two fp32 moments
    assert m["dead_latent_state"] == 9 * 256
    assert "bf16_operand_copies" not in m  # the encoder forward's bf16 copies are transient (below)
    a = r["activation_bytes"]
    bd = 128 * 64 * 4
    assert a["inputs_fp32"] == 2 * bd  # current + prefetched batch
    assert a["dense_Bxd_buffers"] == 8 * bd  # 4 loss-path + 4 AuxK [Bl, d] fp32 tensors
    assert a["encoder_saved_input"] == 128 * 64 * 2  # x - b_dec in bf16
    assert a["selections"] == 128 * 8 * (2 + 8) + 128 * 32 * (2 + 8)  # bf16 values + int64 ids
    assert a["keep_masks"] == 128 * 8 + 128 * 32  # one bool [Bl, w] per selection width
    # masked main bf16 values [128, 8] (returned); per decode call its compacted bf16 values, -1-padded
    # int64 ids and the gathers' int64 order over m = 7 (main) and 18 (AuxK) slots
    assert a["decode_inputs"] == 128 * 8 * 2 + 128 * (7 + 18) * (2 + 8 + 8)
    kept = 65536 + 262144 + 16384 + 51200 + 5120 + 59648
    assert sum(a.values()) == kept == 460032
    t = r["transient_bytes"]
    # the kernel's bf16 copy of W_enc [64, 256] and b_enc [256] beside its candidate buffers (freed before
    # the dead pass)
    cast = 64 * 256 * 2 + 256 * 2
    assert t["forward"]["encoder_split_candidates"] == cast + 128 * 1 * 8 * 8  # one split (4096 > 256) of k = 8
    # AuxK dead pass, worst case (all 256 local latents dead): one chunk (C = min(4096, 256) = 256
    # columns, so never a merge) in one block of 128 tokens: the [128, 256] bf16 pre-activations and
    # its topk's bf16 values and int64 positions [128, 32]; the [128, 32] result (bf16 values, int64
    # ids), the [64, 256] bf16 gathered columns and their 256 biases, the int64 dead ids. Alive with
    # it: the split candidate buffers and the main selection (fp32 values, int64 positions and ids
    # [128, 8]). The columns' fp32 gather before their cast (65 x 256 x 4 bytes) is smaller than the block
    dead = 128 * (256 * 2 + 32 * (2 + 8)) + 128 * 32 * (2 + 8) + 65 * 256 * 2 + 256 * 8
    assert 65 * 256 * 4 < 128 * (256 * 2 + 32 * (2 + 8))
    assert t["forward"]["auxk_dead_pass"] == dead + 8192 + 128 * 8 * 20 == 211456
    # AuxK exchange: fp32 copy of the bf16 values, received block + its transpose, 3 uint8 masks,
    # torch.topk's [Bl/tp, 32] values + ids
    assert t["forward"]["auxk_exchange"] == 128 * 32 * 4 + 2 * 128 * 32 * 4 + 3 * 128 * 32 + 32 * 32 * 12
    assert t["forward"]["topk_exchange"] == 128 * 8 * 4 + 2 * 128 * 8 * 4 + 3 * 128 * 8 + 32 * 8 * 12
    # two decode calls: a second dense fp32 [nl, d] W_dec gradient + the AuxK value gradients (bf16):
    # the kernel's [128, 18] and the gather backward's zero-filled [128, 32]
    assert t["decode_backward"]["decode_grad_buffers"] == 256 * 64 * 4 + 128 * (18 + 32) * 2
    # encoder backward: 16 bytes per candidate slot (5120: masked gradients, ids) and 40 per CSR
    # entry, which holds only the nonzero gradients, the rank's winners: 128 * (8 + 32) / 4 = 1280
    # (< 0.9 * 5120, so the code filters, and takes the CSR path); CSR pointers and bincount, b_enc
    # grad, the last [chunk=256, d] fp32 product, the fp32 upcast of the saved bf16 x - b_dec. No
    # copy of W_enc: the gradient is the fp32 parameter's, and the b_dec gradient reads the parameter
    enc = 5120 * 16 + 1280 * 40 + 257 * 16 + 256 * 4 + 256 * 64 * 4 + 128 * 64 * 4
    assert r["config"]["encoder_bwd_grad_w"] == "csr"
    assert t["encoder_backward"]["encoder_backward"] == enc == 236560
    phases = r["activation_phases"]
    assert phases["forward"] == kept + 211456 and phases["decode_backward"] == kept + 78336
    assert phases["encoder_backward"] == 2 * bd + 16384 + 51200 + enc  # inputs, saved x, selections
    assert r["activation_peak_phase"] == "forward"
    assert m["activations"] == max(phases.values()) == 671488
    assert m["workspace"] == 2 * GiB
    assert m["total"] == 132352 * 2 + 264704 + 2304 + 671488 + 2 * GiB
    assert r["memory_gib"]["total"] == pytest.approx(m["total"] / 2**30)


def test_memory_fp32_operands_and_allgather_fallback():
    r = plan(**SMALL, bf16_operand_copies=False, topk_exchange="allgather")
    a, t = r["activation_bytes"], r["transient_bytes"]
    assert t["forward"]["encoder_split_candidates"] == 128 * 8 * 8  # no cast copies under the buffers
    assert a["selections"] == 128 * 40 * 12  # fp32 values + int64 ids
    # one chunk of all 128 tokens (C = 128 x 4 x 32 x 4 bytes under the 256 MiB cap); no send copy
    # (values already fp32): the larger of the gathered tp parts + their concatenation (2 C) and the
    # concatenation + the bool [128, 4 x 32] mask + torch.topk's [128, 32] values and ids
    C = 128 * 4 * 32 * 4
    assert t["forward"]["auxk_exchange"] == max(2 * C, C + 128 * 4 * 32 + 128 * 32 * 12)
    assert a["keep_masks"] == 128 * 8 + 128 * 32  # bool [Bl, w] masks, as with the all_to_all
    # CSR over the rank's 1280 winners (tp = 4): index arrays, CSR pointers, b_enc grad, the [256, d]
    # product; fp32 operands: no upcast of the saved input
    assert r["config"]["encoder_bwd_grad_w"] == "csr"
    assert t["encoder_backward"]["encoder_backward"] == 5120 * 16 + 1280 * 40 + 257 * 16 + 256 * 4 + 256 * 64 * 4
    # chunked: at most 5120 bytes of values gathered at a time: 10 tokens for AuxK (4 x 32 x 4 bytes
    # each), 40 for the main TopK (4 x 8 x 4); 13 and 4 gathers, the same bytes, more latency
    ch = plan(**SMALL, bf16_operand_copies=False, topk_exchange="allgather", allgather_chunk_bytes=5120)
    C = 10 * 4 * 32 * 4
    assert ch["transient_bytes"]["forward"]["auxk_exchange"] == max(2 * C, C + 10 * 4 * 32 + 10 * 32 * 12)
    C = 40 * 4 * 8 * 4
    assert ch["transient_bytes"]["forward"]["topk_exchange"] == max(2 * C, C + 40 * 4 * 8 + 40 * 8 * 12)
    one, many = ({x["name"]: x for x in p["comm"]} for p in (r, ch))
    for name, calls in (("auxk_allgather", 13), ("topk_allgather", 4)):
        assert (one[name]["calls"], many[name]["calls"]) == (1, calls)
        assert many[name]["bytes_per_gpu"] == one[name]["bytes_per_gpu"]
        assert many[name]["time_s"] - one[name]["time_s"] == pytest.approx((calls - 1) * 3 * 5e-6)


def test_encoder_backward_csr_product_spans_the_cuda_chunk():
    """The CSR products span max(latent_chunk, GRAD_CHUNK_BYTES // (4 d)) latents on CUDA (capped at
    nl): here all 256 whatever latent_chunk is; the b_dec gradient reads the fp32 parameter, so no
    [d, latent_chunk] upcast either."""
    t = plan(**SMALL, latent_chunk=64)["transient_bytes"]["encoder_backward"]["encoder_backward"]
    assert t == 5120 * 16 + 1280 * 40 + 257 * 16 + 256 * 4 + 256 * 64 * 4 + 128 * 64 * 4
    assert plan(**SMALL)["transient_bytes"]["encoder_backward"]["encoder_backward"] == t
    # what-if, no zero filter: every local candidate in the CSR (5120 entries of 40 bytes instead of 1280)
    w = plan(**SMALL, latent_chunk=64, encoder_bwd_drop_zeros=False)
    assert w["transient_bytes"]["encoder_backward"]["encoder_backward"] == t + (5120 - 1280) * 40


def test_memory_equals_hand_count_zero_stages():
    z1 = plan(**SMALL, engine="deepspeed", zero_stage=1)["memory_bytes"]
    z2 = plan(**SMALL, engine="deepspeed", zero_stage=2)["memory_bytes"]
    part = 33088 // 2  # ZeRO partition over dp = 2
    assert z1["params"] == z2["params"] == 132352
    assert z1["grads"] == 132352 + 4 * part  # full grads + fp32 gradient partition
    assert z2["grads"] == 4 * part  # stage 2 keeps only the partition
    assert z1["optimizer"] == z2["optimizer"] == 12 * part  # 2 moments + fp32 master partition
    assert z1["zero_buckets"] == z2["zero_buckets"] == 4 * 500_000_000
    off = plan(**SMALL, engine="deepspeed", zero_stage=2, offload_optimizer=True)
    assert off["memory_bytes"]["optimizer"] == 0 and off["memory_bytes"]["grads"] == 0
    assert off["host_memory_bytes"] == 16 * part
    assert off["flops"]["adam_on_host"]["time_s"] == pytest.approx(28 * part / 20e9)
    # engine=torch ignores zero_stage (trainer.zero_stage only applies to DeepSpeed)
    assert plan(**SMALL, zero_stage=2)["memory_bytes"] == plan(**SMALL)["memory_bytes"]


def test_encoder_flops_are_2_B_over_dp_d_n_over_tp():
    rng = random.Random(random.randrange(2**31))
    for _ in range(25):
        nodes, gpn = rng.choice([1, 2, 4]), rng.choice([4, 8])
        world = nodes * gpn
        tp = rng.choice([t for t in (1, 2, 4, 8, 16, 32) if world % t == 0])
        dp = world // tp
        d, n, B = rng.randint(8, 512), tp * rng.randint(64, 4096), dp * rng.randint(16, 2048)
        r = plan(d_in=d, d_sae=n, k=8, batch_tokens=B, tp=tp, cluster={"nodes": nodes, "gpus_per_node": gpn})
        enc = r["flops"]["encoder_matmul"]
        assert enc["flops"] == 2 * (B // dp) * d * (n // tp), (d, n, B, tp, dp)
        assert enc["time_s"] == pytest.approx(enc["flops"] / (989e12 * 0.5))
        dead = r["flops"].get("auxk_dead_matmul", {"flops": 0})["flops"]  # the AuxK pass's matmul
        assert dead == 2 * (B // dp) * d * round(0.05 * (n // tp)) and r["matmul_flops"] == enc["flops"] + dead
        assert r["flops"]["b_dec_grad"]["flops"] == 2 * d * (n // tp)
        assert r["flops"]["adam"]["flops"] == 12 * (2 * d * (n // tp) + n // tp + d)
        # the exchange the code picks: all_to_all when B/dp divides by tp, else the all-gather
        assert r["config"]["topk_exchange"] == ("alltoall" if (B // dp) % tp == 0 else "allgather")


def test_decode_rows_slots_and_encoder_backward_entries():
    r = plan(**SMALL)  # the code: own winners decoded, compacted codes scanned, winners in the CSR
    assert r["config"]["decode_rows"] == {"decode": 128 * 8 // 4, "auxk_decode": 128 * 32 // 4}
    assert r["config"]["decode_slots"] == {"decode": 8, "auxk_decode": 32}
    # scanned width m: a row's kept count ~ Binomial(K, 1/4); m = the smallest c >= K/4 with
    # 128 * P(count > c) <= 0.01, from exact integer binomial tails (independent of kept_width's lgamma)
    def m_ref(K):
        def tail(c):
            return sum(math.comb(K, j) * 3 ** (K - j) for j in range(c + 1, K + 1)) / 4 ** K

        return next(c for c in range(-(-K // 4), K + 1) if 128 * tail(c) <= 0.01)
    assert (m_ref(8), m_ref(32)) == (7, 18)
    assert r["config"]["decode_scan_width"] == {"decode": 7, "auxk_decode": 18}
    assert r["flops"]["decode"]["flops"] == 2 * 256 * 64
    assert r["flops"]["decode_bwd"]["flops"] == 2 * r["flops"]["decode"]["flops"]
    # AuxK decode forward: 1024 W_dec rows (fp32), the int64 ids of the 128 x 18 scanned slots read by
    # each of the ceil(64 / 64) = 1 feature tiles, the [Bl, d] fp32 output
    assert r["flops"]["auxk_decode"]["hbm_bytes"] == 1024 * 64 * 4 + 128 * 18 * 8 + 128 * 64 * 4
    # backward: grad_out re-read by the ceil(18 / 8) = 3 code blocks, rows, ids, bf16 value grads; W_dec
    # grad: dense fp32 zero fill, grad_out tile, ids per feature tile, atomic read-modify-writes
    gv = 3 * 128 * 64 * 4 + 1024 * 64 * 4 + 128 * 18 * 8 + 128 * 18 * 2
    gw = 256 * 64 * 4 + 128 * 64 * 4 + 128 * 18 * 8 + 1024 * 64 * 8
    assert r["flops"]["auxk_decode_bwd"]["hbm_bytes"] == gv + gw
    # the compaction: 32 B per [128, 32] slot (mask cast, count, sort), three gathers of 18 slots
    # (int64 order, source, output: 24 + 2 * (1 + 2 + 8) bytes), backward: zero-filled bf16 [128, 32]
    # value gradient, scatter of 18 (bf16 read + write, int64 order)
    assert r["flops"]["auxk_decode_compaction"]["hbm_bytes"] == 128 * 32 * 32 + 128 * 18 * (24 + 22)
    assert r["flops"]["auxk_decode_compaction_bwd"]["hbm_bytes"] == 128 * 32 * 2 + 128 * 18 * 12
    # keep applied: values * keep over w (bf16 in, bool in, bf16 out), where(keep, ids, -1) over m
    assert r["flops"]["keep_apply"]["hbm_bytes"] == 128 * (8 + 32) * 5 + 128 * (7 + 18) * 17
    # kept for the backward: masked main values [128, 8] bf16; per call bf16 values + int64 ids +
    # int64 gather order over m slots
    assert r["activation_bytes"]["decode_inputs"] == 128 * 8 * 2 + 128 * (7 + 18) * 18
    # the former full-width scan (for comparison): m = w, nothing sorted
    f = plan(**SMALL, decode_scan_slots="full")
    assert f["config"]["decode_scan_width"] == {"decode": 8, "auxk_decode": 32}
    assert f["flops"]["auxk_decode"]["hbm_bytes"] == 1024 * 64 * 4 + 128 * 32 * 8 + 128 * 64 * 4
    assert f["flops"]["auxk_decode_bwd"]["hbm_bytes"] == (4 * 128 * 64 * 4 + 1024 * 64 * 4 + 128 * 32 * 10
                                                          + gw - 128 * 18 * 8 + 128 * 32 * 8)
    assert not any("compaction" in name for name in f["flops"])
    assert r["config"]["encoder_bwd_entries"] == 128 * (8 + 32) // 4  # winners: 1280 < 0.9 * 5120 slots
    assert r["flops"]["encoder_sparse_bwd"]["flops"] == 2 * 1280 * 64
    # HBM: gathered fp32 input rows per entry, 60 bytes per slot (5120) + 320 per entry of index work,
    # the [nl, d] gradient work (fp32 product 8 + fp32 gradient 4 bytes), the fp32 input cast (6 B)
    assert r["flops"]["encoder_sparse_bwd"]["hbm_bytes"] == (1280 * 64 * 4 + 5120 * 60 + 1280 * 320
                                                             + 256 * 64 * 12 + 128 * 64 * 6)
    # what-ifs: every candidate in the CSR; every candidate's row decoded
    w = plan(**SMALL, encoder_bwd_drop_zeros=False)
    assert w["config"]["encoder_bwd_entries"] == 128 * 40
    assert w["flops"]["encoder_sparse_bwd"]["flops"] == 2 * 5120 * 64
    # tp = 1: every slot is a winner, nothing to drop; tp = 2 with k = n: the rank's 2 + 2 slots hold
    # (4 + 4) / 2 = 4 winners per token, not under 0.9 of the slots, so the code keeps them all
    one = plan(**{**SMALL, "tp": 1})
    assert one["config"]["encoder_bwd_entries"] == 256 // 8 * (8 + 32)
    # nothing to drop; bf16 operands: the CSR path over every slot (the last product spans all 1024
    # latents), with the fp32 upcast of the saved bf16 input [32, 64]
    assert one["config"]["encoder_bwd_grad_w"] == "csr"
    assert one["transient_bytes"]["encoder_backward"]["encoder_backward"] == (1280 * 16 + 1280 * 40 + 1025 * 16
                                                                              + 1024 * 4 + 1024 * 64 * 4 + 32 * 64 * 4)
    # fp32 operands on the Triton backend: the atomic-scatter kernel, no CSR index arrays and no
    # product; transient: the masked fp32 gradients and int64 ids and their concatenations (16 bytes
    # per slot), the fp32 b_enc gradient. It scatters every slot: 2 x 1280 x 64 FLOPs; HBM: the
    # gradient's zero fill, x once, ids + values per 64-feature tile, atomics, slot work
    fp32 = plan(**{**SMALL, "tp": 1}, bf16_operand_copies=False)
    assert fp32["config"]["encoder_bwd_grad_w"] == "atomic" and fp32["config"]["encoder_bwd_entries"] == 1280
    assert fp32["transient_bytes"]["encoder_backward"]["encoder_backward"] == 1280 * 16 + 1024 * 4
    assert fp32["flops"]["encoder_sparse_bwd"]["flops"] == 2 * 1280 * 64
    assert fp32["flops"]["encoder_sparse_bwd"]["hbm_bytes"] == (4 * 64 * 1024 + 32 * 64 * 4 + 1280 * 12
                                                                + 1280 * 64 * 8 + 1280 * 40)
    # the torch backend keeps the CSR path
    csr = plan(**{**SMALL, "tp": 1}, bf16_operand_copies=False, kernel_backend="torch")
    assert csr["config"]["encoder_bwd_grad_w"] == "csr"
    assert csr["transient_bytes"]["encoder_backward"]["encoder_backward"] == (1280 * 16 + 1280 * 40 + 1025 * 16
                                                                              + 1024 * 4 + 1024 * 64 * 4)
    # tp = 1: every winner is local, m = w, no compaction
    assert one["config"]["decode_scan_width"] == {"decode": 8, "auxk_decode": 32}
    assert not any("compaction" in name for name in one["flops"])
    with pytest.raises(ValueError, match="decode_scan_slots"):
        plan(**SMALL, decode_scan_slots=True)
    kn = plan(d_in=8, d_sae=4, k=4, k_aux=4, batch_tokens=16, tp=2, cluster={"nodes": 1, "gpus_per_node": 2})
    assert kn["config"]["encoder_bwd_entries"] == 16 * (2 + 2)
    full = plan(**SMALL, decode_compact=False)
    assert full["config"]["decode_rows"] == {"decode": 128 * 8, "auxk_decode": 128 * 32}


def test_own_winners_per_rank_average_B_k_over_tp():
    """The compact decode's rows per rank: over the tp ranks the own winners of the exact global
    top-k add up to Bl*k, so Bl*k/tp on average (random pre-activations, fresh every run)."""
    tp, Bl, nl, k = 4, 64, 50, 8
    pre = torch.randn(Bl, tp * nl)
    win = pre.topk(k, dim=1).indices  # exact global top-k
    own = [((win >= r * nl) & (win < (r + 1) * nl)).sum().item() for r in range(tp)]
    assert sum(own) == Bl * k
    r = plan(d_in=16, d_sae=tp * nl, k=k, batch_tokens=Bl, tp=tp, cluster={"nodes": 1, "gpus_per_node": tp},
             auxk=False)
    assert r["config"]["decode_rows"]["decode"] == sum(own) / tp


def test_kept_width_bounds_the_batch_max_of_the_exact_selection():
    """`kept_width` against the code's compaction width: exact global top-K over random
    pre-activations (fresh every run) split into tp shards; the largest per-row kept count over
    all ranks (what `compact_kept` cuts to) is >= ceil(K/tp) and below the bound with tail 1e-6
    (a failure probability of at most 1e-6 per run)."""
    rng = random.Random(random.randrange(2**31))
    for _ in range(4):
        tp, Bl, nl, K = rng.choice([2, 4, 8]), rng.randint(64, 512), rng.randint(40, 120), rng.randint(4, 40)
        win = torch.randn(Bl, tp * nl).topk(K, dim=1).indices
        counts = torch.stack([((win >= r * nl) & (win < (r + 1) * nl)).sum(1) for r in range(tp)])
        m = int(counts.max())
        w = min(K, nl)
        assert -(-K // tp) <= m <= kept_width(K, tp, w, Bl * tp, tail=1e-6) <= w, (tp, Bl, nl, K, m)
    assert kept_width(32, 1, 32, 1000) == 32 and kept_width(2048, 64, 2048, 131072) == 65
    with pytest.raises(ValueError, match="tail"):
        kept_width(8, 2, 8, 10, tail=0)


# ---------------------------------------------------------------------- against the code itself
def _recording_csr(seen: list, real, crow, col, val, size, **kw):
    """Stand-in for torch.sparse_csr_tensor (bind `seen`, `real` with partial): appends the entry count
    to `seen`, then builds the tensor with `real`."""
    seen.append(int(col.numel()))
    return real(crow, col, val, size, **kw)


def _recording_empty(seen: list, real, *shape, **kw):
    """Stand-in for torch.empty (bind `seen`, `real` with partial): appends (shape, dtype) of every 2-d
    float32 or int32 allocation to `seen`, then allocates with `real`."""
    if len(shape) == 2 and kw.get("dtype") in (torch.float32, torch.int32):
        seen.append((shape, kw["dtype"]))
    return real(*shape, **kw)


def test_encoder_backward_csr_holds_the_winners_as_planned(monkeypatch):
    """The planner's CSR entries per rank (Bl*k/tp on average, the winners) equal what
    `_EncodeTopK.backward` builds: run the encoder on each of tp latent shards, keep the exact global
    top-k (as the sharded SAE's keep masks do), backpropagate, and count the entries of the sparse
    CSR matrices the backward multiplies (fresh random inputs every run)."""
    from sae_dist.kernels import encoder_topk as et

    tp, Bl, nl, d, k = 4, 64, 32, 16, 8
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(Bl, d, generator=gen)
    W = torch.randn(d, tp * nl, generator=gen)
    b_enc = torch.full((tp * nl,), 10.0)  # every pre-activation positive: no ReLU zeros
    b_dec = torch.zeros(d, requires_grad=True)
    shards = []
    for r in range(tp):
        Wr = W[:, r * nl:(r + 1) * nl].clone().requires_grad_(True)
        br = b_enc[r * nl:(r + 1) * nl].clone().requires_grad_(True)
        v, _, _, _ = et.encode_topk(x, Wr, br, b_dec, k, backend="torch")
        shards.append(v)
    thr = torch.cat([v.detach() for v in shards], 1).topk(k, dim=1).values[:, -1:]  # global k-th value
    real = torch.sparse_csr_tensor
    nnz, own = [], []
    for v in shards:
        seen = []
        keep = v.detach() >= thr  # this rank's winners of the exact global top-k
        monkeypatch.setattr(torch, "sparse_csr_tensor", partial(_recording_csr, seen, real))
        (v * keep).sum().backward()
        monkeypatch.setattr(torch, "sparse_csr_tensor", real)
        nnz.append(sum(seen))
        own.append(int(keep.sum()))
    assert nnz == own and sum(nnz) == Bl * k  # only the winners, k per token over the tp ranks
    r = plan(d_in=d, d_sae=tp * nl, k=k, batch_tokens=Bl, tp=tp, auxk=False,
             cluster={"nodes": 1, "gpus_per_node": tp})
    assert r["config"]["encoder_bwd_entries"] == sum(nnz) / tp == Bl * k // tp
    assert plan(d_in=d, d_sae=tp * nl, k=k, batch_tokens=Bl, tp=tp, auxk=False, encoder_bwd_drop_zeros=False,
                cluster={"nodes": 1, "gpus_per_node": tp})["config"]["encoder_bwd_entries"] == Bl * k


def _record_global_keep(monkeypatch, B, w, tp, kk, firsts=()):
    """Run `sae_dist.parallel.tp.global_keep` as rank 1 of a fake tp group, recording every collective's
    (op, bytes this rank sends, dtype). The fake all_to_all returns the rank's own blocks (as if
    every rank held the same candidates); the fake all-gather concatenates tp copies."""
    import torch.distributed as dist

    from sae_dist.parallel import tp as tpmod

    calls = []

    def a2a(out, inp, group=None):
        calls.append(("all_to_all", inp.numel() * inp.element_size(), inp.dtype))
        out.copy_(inp)

    def gather(t, group, dim=1):
        calls.append(("all_gather", tp * t.numel() * t.element_size(), t.dtype))
        return torch.cat([t] * tp, dim=dim)

    monkeypatch.setattr(dist, "all_to_all_single", a2a)
    monkeypatch.setattr(tpmod, "all_gather_cat", gather)
    vals = torch.randn(B, w).to(torch.bfloat16)  # the encoder's values under bf16 autocast
    masks = tpmod.global_keep(vals, (kk, *firsts), object(), tp, 1)
    assert [m.shape for m in masks] == [(B, w)] * (1 + len(firsts))
    return calls


def test_alltoall_bytes_match_the_code(monkeypatch):
    """The planner's exchange collectives equal what `global_keep` sends: one fp32 values
    all_to_all of [Bl, w] and one uint8 mask all_to_all per selection width (main TopK with
    Multi-TopK: two; AuxK with w = k_aux: one)."""
    tp, Bl = 4, 128
    cl = {"nodes": 1, "gpus_per_node": 8}
    # Multi-TopK main selection: w = min(4k, nl) = 32, widths (32, 8)
    r = plan(d_in=64, d_sae=1024, k=8, k_aux=64, batch_tokens=2 * Bl, tp=tp, cluster=cl, multi_topk=True)
    comm = {x["name"]: x for x in r["comm"]}
    calls = _record_global_keep(monkeypatch, Bl, 32, tp, 32, (8,))
    assert calls == [("all_to_all", Bl * 32 * 4, torch.float32)] + [("all_to_all", Bl * 32, torch.uint8)] * 2
    assert comm["topk_values_alltoall"]["size_bytes"] == calls[0][1]
    assert (comm["topk_masks_alltoall"]["size_bytes"], comm["topk_masks_alltoall"]["count"]) == (calls[1][1], 2)
    # (tp - 1) / tp of what each rank sends crosses links
    assert comm["topk_values_alltoall"]["bytes_per_gpu"] == 3 * Bl * 32 * 4 // 4
    assert comm["topk_masks_alltoall"]["bytes_per_gpu"] == 2 * 3 * Bl * 32 // 4
    # AuxK: w = k_aux = 64 (> nl? no: nl = 256), one width
    calls = _record_global_keep(monkeypatch, Bl, 64, tp, 64)
    assert comm["auxk_values_alltoall"]["size_bytes"] == calls[0][1] == Bl * 64 * 4
    assert comm["auxk_masks_alltoall"]["size_bytes"] == calls[1][1] == Bl * 64
    assert comm["auxk_masks_alltoall"]["count"] == len(calls) - 1 == 1
    # time: (p-1)/p * S / bw + (p-1) * latency, NVLink inside the node
    v = comm["auxk_values_alltoall"]
    assert v["time_s"] == pytest.approx(3 / 4 * Bl * 64 * 4 / 450e9 + 3 * 5e-6)


def test_allgather_fallback_bytes_match_the_code(monkeypatch):
    """B/dp not divisible by tp: the code gathers the fp32 values (tp * Bl * w * 4 bytes per rank),
    and the planner switches to that exchange by itself."""
    tp, Bl = 4, 130  # 130 % 4 != 0
    r = plan(d_in=64, d_sae=1024, k=8, k_aux=32, batch_tokens=2 * Bl, tp=tp, cluster={"nodes": 1})
    assert r["config"]["topk_exchange"] == "allgather" and r["config"]["topk_exchange_requested"] == "alltoall"
    comm = {x["name"]: x for x in r["comm"]}
    assert "topk_values_alltoall" not in comm
    for name, w in (("topk_allgather", 8), ("auxk_allgather", 32)):
        calls = _record_global_keep(monkeypatch, Bl, w, tp, w if name == "auxk_allgather" else 8)
        assert calls == [("all_gather", tp * Bl * w * 4, torch.float32)]
        assert comm[name]["size_bytes"] == calls[0][1]
        assert comm[name]["bytes_per_gpu"] == 3 * Bl * w * 4  # (tp - 1) / tp of the gathered total


def test_allgather_chunks_match_the_code(monkeypatch):
    """The fallback gathers in chunks of tokens (`tp.GATHER_CHUNK_BYTES`, mirrored by the planner's
    ALLGATHER_CHUNK_BYTES): the planner's number of collectives and their bytes equal the code's."""
    from sae_dist.parallel import tp as tpmod

    assert ALLGATHER_CHUNK_BYTES == tpmod.GATHER_CHUNK_BYTES == 2**28
    tp, Bl, w, cap = 4, 130, 32, 3000  # 5 tokens of 4 x 32 fp32 values per chunk: 26 gathers
    monkeypatch.setattr(tpmod, "GATHER_CHUNK_BYTES", cap)
    calls = _record_global_keep(monkeypatch, Bl, w, tp, w)
    r = plan(d_in=64, d_sae=1024, k=8, k_aux=w, batch_tokens=2 * Bl, tp=tp, cluster={"nodes": 1},
             allgather_chunk_bytes=cap)
    ag = {x["name"]: x for x in r["comm"]}["auxk_allgather"]
    assert len(calls) == ag["calls"] == 26 and sum(b for _, b, _ in calls) == ag["size_bytes"] == tp * Bl * w * 4
    assert max(b for _, b, _ in calls) <= cap


def test_candidate_buffer_cap_matches_the_kernel(monkeypatch):
    """The split count of `triton_encoder_splits` equals the one `encoder_launch` allocates for
    `_select_triton` (run through the Triton interpreter on CPU, or on a GPU): two [B, splits * k]
    candidate buffers, fp32 values and int32 ids, with the cap lowered so that it binds and latent
    chunks that are not multiples of the tile."""
    from sae_dist.kernels import encoder_topk as et

    B, d, N, k = 32, 16, 512, 4
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not et.triton_available(dev):
        pytest.fail("Triton cannot run here (needs CUDA or TRITON_INTERPRET=1, set by conftest)")
    interp = dev == "cpu"
    prec = "ieee" if interp or not et.tf32_enabled() else "tf32"  # fp32 operands, as encoder_launch picks
    block_n = et.encoder_launch_config(d, k, prec, interpret=interp)["BLOCK_N"]
    assert block_n == (32 if interp else ENCODER_BLOCK_N[prec])
    g = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(B, d, generator=g).to(dev)
    W = torch.randn(d, N, generator=g).to(dev)
    be = torch.zeros(N, device=dev)
    real_empty = torch.empty
    row = B * k * 8  # bytes of one split's candidates
    for cap, chunk in ((row * 2 + 5, 128), (row * 3, 64), (2**30, 128), (2**30, 100), (2**30, 40), (10, 128)):
        seen = []
        monkeypatch.setattr(et, "CANDIDATE_BUFFER_BYTES", cap)
        monkeypatch.setattr(torch, "empty", partial(_recording_empty, seen, real_empty))
        v, i, av, _ = et._select_triton(x, W, be, k, None, 0, chunk)
        monkeypatch.setattr(torch, "empty", real_empty)
        assert [s for s, _ in seen] == [seen[0][0]] * 2 and seen[0][0][0] == B, seen
        assert [dt for _, dt in seen] == [torch.float32, torch.int32]
        width = seen[0][0][1]
        assert width % k == 0
        splits = width // k
        assert triton_encoder_splits(B, N, k, chunk, cap, block_n) == splits, (cap, chunk)
        # by hand: span = max(chunk, ceil(N / max_splits)) rounded up to the tile, max_splits = cap // row
        ms = max(1, cap // row)
        assert splits == -(-N // (-(-max(chunk, -(-N // ms)) // block_n) * block_n))
        if ms > 1:
            assert B * splits * k * 8 <= cap
        # the selection itself is the exact top-k (no AuxK candidates from the kernel): the same latents,
        # values equal up to the summation order of the two fp32 dot products (Triton's and the BLAS')
        ref = (x @ W).topk(k, 1)
        assert av is None and torch.equal(i.long().sort(1).values, ref.indices.sort(1).values)
        torch.testing.assert_close(v.sort(1).values, ref.values.sort(1).values.to(v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_n"):
        triton_encoder_splits(B, N, k, block_n=0)


def test_planner_constants_mirror_the_kernel_module():
    """CANDIDATE_BUFFER_BYTES, DEAD_PASS_ELEMENTS, GRAD_CHUNK_BYTES, the row alignment, the zero-dropping
    threshold and the tile BLOCK_N per dot precision are the kernel module's (`encoder_topk`,
    `encoder_launch_config`)."""
    from sae_dist.kernels import encoder_topk as et
    from sae_dist.plan import ENCODER_BWD_DROP_BELOW

    assert ENCODER_BWD_DROP_BELOW == et.DROP_ZEROS_BELOW == 0.9

    assert CANDIDATE_BUFFER_BYTES == et.CANDIDATE_BUFFER_BYTES == 2**30
    assert DEAD_PASS_ELEMENTS == et.DEAD_PASS_ELEMENTS == 2**27
    assert GRAD_CHUNK_BYTES == et.GRAD_CHUNK_BYTES == 2**28
    assert ENCODER_ROW_ALIGN == et.ROW_ALIGN == 16
    for d_in, k in itertools.product((768, 2304, 4096), (8, 32, 64, 128)):
        assert {key: et.encoder_launch_config(d_in, k, None if key == "bf16" else key)["BLOCK_N"]
                for key in ENCODER_BLOCK_N} == ENCODER_BLOCK_N
        assert et.encoder_launch_config(d_in, k, "ieee", interpret=True)["BLOCK_N"] == 32
    # the planner's default tile is the bf16 / TF32 one
    assert triton_encoder_splits(131072, 3000, 32, latent_chunk=100) == -(-3000 // 128)


def test_plan_defaults_mirror_the_config_options():
    """plan()'s keyword defaults for the sae.* / trainer.* options it models are those options' defaults
    (the planner stays importable without torch, so it repeats them; sae-plan itself passes the config)."""
    import inspect

    from sae_dist.config import HarvestConfig
    from sae_dist.fielddoc import field_default
    from sae_dist.sae.config import SAEConfig
    from sae_dist.train.config import TrainerConfig

    params = inspect.signature(plan).parameters
    mirrored = {SAEConfig: ("multi_topk_factor", "kernels", "kernel_backend"),
                TrainerConfig: ("engine", "zero_stage", "offload_optimizer", "ema")}
    for cls, names in mirrored.items():
        for name in names:
            assert params[name].default == field_default(cls, name), (cls.__name__, name)
    assert params["store_dtype"].default == field_default(HarvestConfig, "dtype")
    with pytest.raises(KeyError, match="no field 'nope'"):
        field_default(SAEConfig, "nope")


def _recording_addmm(shapes: list, real, *args, **kw):
    """Stand-in for torch.addmm (bind `shapes`, `real` with partial): records the output shape."""
    out = real(*args, **kw)
    shapes.append(tuple(out.shape))
    return out


@pytest.mark.parametrize("B, n, n_dead, ka, lc, cap", [(64, 600, 600, 16, 40, 64 * 16),
                                                       (64, 600, 577, 16, 100, 2**27),
                                                       (32, 900, 700, 24, 4096, 32 * 100),
                                                       (16, 300, 20, 8, 4096, 2**27)])
def test_dead_pass_blocks_match_select_dead(monkeypatch, B, n, n_dead, ka, lc, cap):
    """The planner's AuxK dead pass (`_dead_pass`) against `_select_dead` itself, DEAD_PASS_ELEMENTS
    lowered so that token blocks bind and latent_chunk so that column chunks do: the [rows, chunk]
    blocks its addmm computes (fresh random inputs every run), and the candidates themselves."""
    from sae_dist import plan as planmod
    from sae_dist.kernels import encoder_topk as et

    for mod in (et, planmod):
        monkeypatch.setattr(mod, "DEAD_PASS_ELEMENTS", cap)
    g = torch.Generator().manual_seed(random.randrange(2**31))
    d = 8
    x, W, b = torch.randn(B, d, generator=g), torch.randn(d, n, generator=g), torch.randn(n, generator=g)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[:n_dead]] = True
    ka = min(ka, n_dead)
    shapes = []
    monkeypatch.setattr(torch, "addmm", partial(_recording_addmm, shapes, torch.addmm))
    v, i = et._select_dead(x, W, b, dead.nonzero().squeeze(1), ka, lc)
    p = planmod._dead_pass(B, d, n_dead, ka, lc, 4, n_dead)
    C, R = p["chunk"], p["rows"]
    assert C == min(max(lc, 2 * ka), n_dead) and R == min(B, max(1, cap // (ka + C)))
    assert shapes == [(min(R, B - r0), min(C, n_dead - c0)) for c0 in range(0, n_dead, C) for r0 in range(0, B, R)]
    assert p["select_flops"] == B * (n_dead + (len(range(0, n_dead, C)) - 1) * ka)
    # the AuxK candidates themselves: the exact top-ka pre-activations among the dead latents
    pre = (x @ W + b).masked_fill(~dead, float("-inf"))
    ref = pre.topk(ka, 1).values.sort(1).values
    assert torch.allclose(v.sort(1).values, ref, atol=1e-5)
    assert torch.allclose(pre.gather(1, i).sort(1).values, ref, atol=1e-5)  # the ids name those values
    assert bool(dead[i].all()) and all(len(set(r)) == ka for r in i.tolist())


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated on CPU while fn() runs, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("B, d, n, ka, lc, rows, dtype", [(1024, 64, 400, 16, 16, 300, torch.bfloat16),
                                                          (512, 64, 400, 16, 64, 512, torch.bfloat16),
                                                          (300, 16, 500, 40, 90, 128, torch.float32)])
def test_dead_pass_transient_bounds_its_allocations(monkeypatch, B, d, n, ka, lc, rows, dtype):
    """The planned worst-case transient of the AuxK dead pass (every latent dead) against the peak of
    what `_select_dead` allocates (torch.profiler on CPU): an upper bound, within 15 %. The shapes
    keep the production ratios (C = 2 ka and several token blocks, as at 65536 tokens per rank and
    k_aux 2048; C > 2 ka; one block)."""
    from sae_dist import plan as planmod
    from sae_dist.kernels import encoder_topk as et

    C = max(lc, 2 * ka)
    for mod in (et, planmod):
        monkeypatch.setattr(mod, "DEAD_PASS_ELEMENTS", rows * (ka + C))
    g = torch.Generator().manual_seed(random.randrange(2**31))
    # the trainer's operands: fp32 parameters (cast by the pass itself), x - b_dec in the compute dtype
    x, W = torch.randn(B, d, generator=g).to(dtype), torch.randn(d, n, generator=g)
    b, dead = torch.zeros(n), torch.arange(n)
    measured = _peak_cpu_bytes(lambda: et._select_dead(x, W, b, dead, ka, lc))
    planned = planmod._dead_pass(B, d, n, ka, lc, 2 if dtype == torch.bfloat16 else 4, n)["transient_bytes"]
    assert measured <= planned <= 1.15 * measured, (measured, planned)


# ------------------------------------------------------------------------------------ comm, step
def test_communication_hand_count_and_links():
    r = plan(**SMALL)
    comm = {x["name"]: x for x in r["comm"]}
    bd = 128 * 64 * 4  # one fp32 [Bl, d]
    rec = comm["recon_allreduce"]
    assert (rec["group"], rec["link"], rec["group_size"]) == ("tp", "intra", 4)  # tp=4 inside a node of 8
    assert rec["bytes_per_gpu"] == 2 * 3 * bd // 4
    assert rec["time_s"] == pytest.approx(2 * 3 / 4 * bd / 450e9 + 2 * 3 * 5e-6)
    assert comm["topk_values_alltoall"]["size_bytes"] == 128 * 8 * 4
    assert comm["auxk_values_alltoall"]["size_bytes"] == 128 * 32 * 4
    ag = {x["name"]: x for x in plan(**SMALL, topk_exchange="allgather")["comm"]}
    assert ag["auxk_allgather"]["size_bytes"] == 4 * 128 * 32 * 4
    g = comm["grad_allreduce"]
    assert (g["group"], g["link"], g["bytes_per_gpu"]) == ("dp", "intra", 132352)  # 2 * (1/2) * 4P
    # ZeRO: reduce-scatter + all-gather move the same bytes as the all-reduce
    z = {x["name"]: x for x in plan(**SMALL, engine="deepspeed", zero_stage=2)["comm"]}
    assert z["grad_reduce_scatter"]["bytes_per_gpu"] + z["param_allgather"]["bytes_per_gpu"] == 132352
    assert "grad_allreduce" not in z
    # tp groups spanning nodes use the inter-node bandwidth; so does dp across nodes
    big = plan(d_in=64, d_sae=1024, k=8, k_aux=32, batch_tokens=256, tp=16, cluster={"nodes": 4})
    links = {(x["group"], x["link"]) for x in big["comm"]}
    assert links == {("tp", "inter"), ("dp", "inter")}
    assert {x["link"] for x in plan(**{**SMALL, "tp": 1})["comm"]} == {"intra"}
    assert plan(**{**SMALL, "tp": 8})["config"]["dp_link"] == "none"
    # the batch: read by the tp group's first rank, broadcast in the store's dtype after a 4-byte status
    # (the bytes themselves: tests/integration/parallel/test_store_shared_over_tp.py)
    bb = comm["batch_broadcast"]
    assert (bb["op"], bb["size_bytes"], bb["bytes_per_gpu"]) == ("broadcast", 128 * 64 * 2, 128 * 64 * 2)
    assert bb["time_s"] == pytest.approx(128 * 64 * 2 / 450e9 + 3 * 5e-6)
    assert comm["batch_status_broadcast"]["size_bytes"] == 4
    f32 = {x["name"]: x for x in plan(**SMALL, store_dtype="float32")["comm"]}
    assert f32["batch_broadcast"]["size_bytes"] == 128 * 64 * 4
    assert not any(x["name"].startswith("batch_") for x in plan(**{**SMALL, "tp": 1})["comm"])
    with pytest.raises(ValueError, match="harvest.dtype='int8' .*valid: \\('float16', 'bfloat16', 'float32'\\)"):
        plan(**SMALL, store_dtype="int8")


def test_step_time_is_compute_plus_communication():
    r = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=32, cluster=H100_8x8,
             engine="deepspeed", zero_stage=2)
    assert r["compute_s"] == pytest.approx(sum(v["time_s"] for v in r["flops"].values()))
    assert r["comm_s"] == pytest.approx(sum(x["time_s"] for x in r["comm"]))
    assert r["step_time_s"] == pytest.approx(r["compute_s"] + r["tp_comm_s"] + r["dp_comm_s"])
    assert r["tokens_per_s"] == pytest.approx(B_PAPER / r["step_time_s"])
    assert r["step_time_overlapped_s"] == pytest.approx(max(r["compute_s"], r["comm_s"]))
    # tp=32 spans 4 nodes: its collectives run at the InfiniBand rate
    assert r["config"]["tp_link"] == "inter" and r["config"]["dp_link"] == "inter"
    assert r["memory_bytes"]["total"] == sum(v for k, v in r["memory_bytes"].items() if k != "total")
    json.dumps(r)  # JSON-serialisable


def test_what_if_switches_at_2_24():
    """At the 16M shape the former full-width decode scan and the former encoder backward (every
    local candidate in the CSR) add work: the step gets longer, the communication stays the same."""
    kw = dict(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=64, cluster=H100_8x8)
    code = plan(**kw)
    assert code["fits"]
    # AuxK: 2048 winners, 32 per rank on average; the planned batch max over 131072 rows is 65 slots
    assert code["config"]["decode_scan_width"] == {"decode": kept_width(32, 64, 32, B_PAPER), "auxk_decode": 65}
    full = plan(**kw, decode_scan_slots="full")
    assert full["config"]["decode_scan_width"] == {"decode": 32, "auxk_decode": 2048}
    assert full["step_time_s"] > code["step_time_s"] and full["comm_s"] == code["comm_s"]
    old = plan(**kw, encoder_bwd_drop_zeros=False)
    assert old["step_time_s"] > code["step_time_s"] and old["comm_s"] == code["comm_s"]
    # the encoder backward over the rank's winners: 2 * Bl * (k + k_aux) / tp * d FLOPs; before the
    # filter, over every local candidate: tp times that
    assert code["flops"]["encoder_sparse_bwd"]["flops"] == 2 * (131072 * (32 + 2048) // 64) * 4096
    assert old["flops"]["encoder_sparse_bwd"]["flops"] == 2 * 131072 * (32 + 2048) * 4096


def test_dead_fraction_scales_the_auxk_pass_only():
    """dead_fraction sets the compute of the Triton backend's AuxK pass (2 Bl d nd FLOPs, nd =
    round(dead_fraction nl)); its memory (worst case) and the AuxK exchange and decode do not move."""
    base = plan(**SMALL, dead_fraction=0.25)
    assert base["config"]["dead_latents_per_gpu"] == 64
    assert base["flops"]["auxk_dead_matmul"]["flops"] == 2 * 128 * 64 * 64
    assert base["flops"]["auxk_dead_matmul"]["time_s"] == pytest.approx(2 * 128 * 64 * 64 / (989e12 * 0.5))
    # nd = 64 columns in one chunk (C = min(4096, 64)), wider than ka = 32: gather (fp32 read + write,
    # then the bf16 cast's read + write), the block written and read, its topk's values and ids
    # written, the values copied (read + write) and the ids gathered (read positions, write ids); no merge
    assert base["flops"]["auxk_dead_gather_topk"]["hbm_bytes"] == 64 * 64 * 14 + 128 * (2 * 64 * 2 + 32 * 30)
    # every FLOP costed at mfu: the encoder matmul and the dead pass's
    assert base["matmul_flops"] == base["flops"]["encoder_matmul"]["flops"] + 2 * 128 * 64 * 64
    none = plan(**SMALL, dead_fraction=0)
    assert "auxk_dead_matmul" not in none["flops"] and none["compute_s"] < base["compute_s"]
    assert none["transient_bytes"] == base["transient_bytes"] and none["comm"] == base["comm"]
    assert none["config"]["decode_scan_width"] == base["config"]["decode_scan_width"]
    # no AuxK, or the torch backend (AuxK from its own chunk buffers): no dead pass
    assert "auxk_dead_pass" not in plan(**SMALL, auxk=False)["transient_bytes"]["forward"]
    torch_be = plan(**SMALL, kernel_backend="torch")
    assert "auxk_dead_matmul" not in torch_be["flops"]
    assert "auxk_dead_pass" not in torch_be["transient_bytes"]["forward"]
    assert torch_be["flops"]["topk_select"]["flops"] == 128 * 256 * 3  # + the dead-masked AuxK compares
    assert base["flops"]["topk_select"]["flops"] == 128 * 256 * 2  # the kernel keeps the k main slots only


def test_encoder_backward_grad_chunk_on_cuda_at_2_24():
    """The CSR path with bf16 operands at d_in 4096: the products span GRAD_CHUNK_BYTES // (4 d) = 16384
    latents, so the last [16384, 4096] fp32 product (256 MiB) is held, not a [latent_chunk, d] one; the
    same on the torch and Triton backends (tp = 64: zeros dropped)."""
    shape = dict(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=64, cluster=H100_8x8)
    r = plan(**shape, kernel_backend="torch")
    Bl, nl, d = 131072, 262144, 4096
    e_all, e = Bl * (32 + 2048), -(-Bl * (32 + 2048) // 64)
    assert r["config"]["encoder_bwd_grad_w"] == "csr" and r["config"]["encoder_bwd_entries"] == e
    want = (e_all * 16 + e * 40 + (nl + 1) * 16 + nl * 4 + (GRAD_CHUNK_BYTES // (4 * d)) * d * 4
            + Bl * d * 4)
    assert r["transient_bytes"]["encoder_backward"]["encoder_backward"] == want
    t = plan(**shape)
    assert t["config"]["encoder_bwd_grad_w"] == "csr" and t["config"]["encoder_bwd_entries"] == e
    assert t["transient_bytes"]["encoder_backward"] == r["transient_bytes"]["encoder_backward"]


# ------------------------------------------------------------------------------------ refusal
def test_refuses_tp8_at_2_24_with_excess_in_gib():
    r = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=8, cluster=H100_8x8,
             engine="deepspeed", zero_stage=2)
    # one weight shard is 4096 x 2^21 fp32 = 32 GiB; W_enc + W_dec = 64 GiB of parameters alone
    assert r["memory_gib"]["params"] == pytest.approx(64.0, abs=0.01)
    assert not r["fits"]
    # a checkpoint saves and loads ZeRO's partitions in place: it needs the step's state without activations
    ck = r["checkpoint_peak_bytes"] / GiB
    assert ck == pytest.approx(r["memory_gib"]["total"] - r["memory_gib"]["activations"])
    step_excess = r["memory_gib"]["total"] - 79.6
    assert r["excess_gib"] == pytest.approx(step_excess)
    assert f"{step_excess:.1f} GiB more than cluster.gpu_memory_gib=79.6" in r["message"]
    assert "At every checkpoint" not in r["message"]
    # the torch engine's optimizer state is its live state too
    t = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=8, cluster=H100_8x8)
    assert t["checkpoint_peak_bytes"] == t["memory_bytes"]["total"] - t["memory_bytes"]["activations"]
    excess = t["memory_gib"]["total"] - 79.6
    assert excess > 0 and t["excess_gib"] == pytest.approx(excess)
    assert f"{excess:.1f} GiB more than cluster.gpu_memory_gib=79.6" in t["message"]
    # ZeRO-2 at tp=32 x dp=2 fits, step and checkpoint (72.2 GiB)
    z2 = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=32, cluster=H100_8x8, engine="deepspeed",
              zero_stage=2)
    assert z2["fits"] and z2["memory_gib"]["total"] == pytest.approx(72.2, abs=0.05)
    # with the optimizer offloaded to the host, optimizer_state() gathers the rank's fp32 Adam moments onto the
    # GPU: 2 x 4 bytes per parameter (32 GiB at tp = 32), beyond the step's state without activations
    off = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=32, cluster=H100_8x8, engine="deepspeed",
               zero_stage=2, offload_optimizer=True)
    gathered = 8 * off["params_per_gpu"] / GiB
    assert gathered == pytest.approx(32.0, abs=0.01)  # + b_enc, b_dec
    ck = off["checkpoint_peak_bytes"] / GiB
    assert ck == pytest.approx(off["memory_gib"]["total"] - off["memory_gib"]["activations"] + gathered)
    tiny = plan(d_in=D4K, d_sae=N24, k=32, batch_tokens=B_PAPER, tp=32, cluster={**H100_8x8, "gpu_memory_gib": 45},
                engine="deepspeed", zero_stage=2, offload_optimizer=True, suggest=False)
    ck = tiny["checkpoint_peak_bytes"] / GiB
    assert tiny["memory_gib"]["total"] < 45 < ck and not tiny["fits"] and tiny["excess_gib"] == pytest.approx(ck - 45)
    assert tiny["message"].startswith(f"does not fit: tp=32 x dp=2 needs {ck:.1f} GiB per GPU at every checkpoint "
                                      f"save and resume, {ck - 45:.1f} GiB more than")
    assert f"DeepSpeed's optimizer_state() gathers the rank's fp32 Adam moments, {gathered:.1f} GiB" in tiny["message"]
    with pytest.raises(PlanDoesNotFit, match=r"GiB more than"):
        check_fits(r)
    assert r["suggestions"], r["message"]
    for s in r["suggestions"]:  # every suggestion is a trainer setting that fits, with a larger tp
        assert s["total_gib"] <= 79.6 and "parallel.tp=" in s["overrides"]
        assert s["overrides"] in r["message"]
        assert all(o.split("=")[0] in ("parallel.tp", "trainer.engine", "trainer.zero_stage",
                                       "trainer.batch_tokens") for o in s["overrides"].split())
    ok = plan(**SMALL)
    assert check_fits(ok) is ok and ok["message"] == "" and ok["excess_gib"] == 0


def test_heldout_lm_is_counted_and_turning_it_off_is_suggested():
    # 2^22 latents at tp=16 over 16 H100s, B = 163840: 69.7 GiB per GPU; an 8B LM in bf16 (14.9 GiB) beside it
    # does not fit
    kw = dict(d_in=D4K, d_sae=2**22, k=32, batch_tokens=163840, tp=16, cluster={"nodes": 2, "gpus_per_node": 8})
    base, with_lm = plan(**kw), plan(**kw, heldout_lm_gib=14.9)
    assert base["fits"] and base["memory_bytes"]["heldout_lm"] == 0
    assert with_lm["memory_bytes"]["heldout_lm"] == round(14.9 * GiB)
    assert with_lm["memory_bytes"]["total"] - base["memory_bytes"]["total"] == round(14.9 * GiB)
    assert {k: v for k, v in with_lm["memory_bytes"].items() if k not in ("heldout_lm", "total")} == \
        {k: v for k, v in base["memory_bytes"].items() if k not in ("heldout_lm", "total")}
    assert not with_lm["fits"] and "heldout_lm 14.9" in with_lm["message"]
    first, *rest = with_lm["suggestions"]
    assert first["overrides"] == "trainer.eval_every_steps=0"
    assert first["total_gib"] == base["memory_gib"]["total"] and first["tokens_per_s"] == base["tokens_per_s"]
    for s in rest:  # the other settings keep the LM: 14.9 GiB of their total
        assert 14.9 < s["total_gib"] <= 79.6 and "eval_every_steps" not in s["overrides"]
    for bad in (-1.0, "1", True, float("nan")):
        with pytest.raises(ValueError, match=r"estimate.heldout_lm_gib=.* must be a number of GiB >= 0"):
            plan(**kw, heldout_lm_gib=bad)


def test_bad_options_raise_with_the_fix():
    with pytest.raises(ValueError, match="must divide the world size 8"):
        plan(**{**SMALL, "tp": 3, "d_sae": 1023})
    with pytest.raises(ValueError, match="not divisible by dp=2"):
        plan(**{**SMALL, "batch_tokens": 255})
    with pytest.raises(ValueError, match="zero_stage"):
        plan(**SMALL, engine="deepspeed", zero_stage=3)
    with pytest.raises(ValueError, match="needs trainer.engine=deepspeed"):
        plan(**SMALL, offload_optimizer=True)
    with pytest.raises(ValueError, match="topk_exchange"):
        plan(**SMALL, topk_exchange="ring")
    with pytest.raises(ValueError, match="unknown cluster keys"):
        plan(**{**SMALL, "cluster": {"gpus": 8}})
    with pytest.raises(ValueError, match="mfu"):
        Cluster(mfu=1.5)
    with pytest.raises(ValueError, match="candidate_buffer_bytes"):
        plan(**SMALL, candidate_buffer_bytes=0)
    for bad in (-0.01, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"estimate.dead_fraction=.* must be a number in \[0, 1\]"):
            plan(**SMALL, dead_fraction=bad)


# ------------------------------------------------------------------------------------ store on disk
def _disk(path: Path) -> tuple[int, int]:
    """(bytes of the shard files under <array>/c/, bytes of every file) of a store directory."""
    files = [p for p in path.rglob("*") if p.is_file()]
    data = sum(p.stat().st_size for p in files if "c" in p.relative_to(path).parts[1:2])
    return data, sum(p.stat().st_size for p in files)


#: Tolerance of `store_bytes` against a real store: the shard files exactly; the whole directory
#: within the metadata allowance (zarr.json files and markers are estimated, never under-counted by
#: more than this).
STORE_META_TOLERANCE = 4096


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_store_bytes_equal_a_written_store(tmp_path, dtype):
    """`store_bytes` against stores `write_store` writes: full and partial last shards, edge chunks,
    with and without the text arrays and the per-chunk checksum."""
    from sae_dist.plan import STORE_META_BYTES, store_bytes
    from sae_dist.store import write_store

    rng = np.random.default_rng(random.randrange(2**31))
    for n, d, chunk, shard, text, crc in ((1000, 24, 64, 256, True, True), (769, 24, 32, 256, True, False),
                                          (257, 7, 16, 64, False, True), (64, 3, 64, 64, False, True)):
        x = rng.standard_normal((n, d)).astype(np.float32)
        extra = dict(seq_index=np.arange(n) // 7, position=np.arange(n) % 7 + 1) if text else {}
        p = tmp_path / f"s{n}"
        write_store(p, x, np.arange(n) if text else None, chunk_tokens=chunk, shard_tokens=shard, dtype=dtype,
                    checksum=crc, **extra)
        want = store_bytes(n, d, dtype=dtype, chunk_tokens=chunk, shard_tokens=shard, text_arrays=text,
                           checksum=crc)
        data, total = _disk(p)
        meta = want["bytes"]["metadata"]
        assert data == want["total_bytes"] - meta, (n, d, chunk, shard, text, crc)
        assert meta - STORE_META_TOLERANCE <= total - data <= meta, (total - data, meta)
        assert meta == STORE_META_BYTES["group"] + STORE_META_BYTES["array"] * (4 if text else 1)
        assert want["shards"] == -(-n // shard)


def test_harvest_store_bytes_equal_a_harvest(tiny_lm_dir, tmp_path):
    """`harvest_store_bytes` (what sae-plan reports for harvest.tokens=T) against a real harvest of
    the tiny LM: T rounded up to whole sequences of ctx_len - 1 tokens, the three text arrays, one
    progress marker per shard; shard files exact, the whole directory within the allowance."""
    from helpers.synthetic import tiny_corpus

    from sae_dist.harvest import harvest
    from sae_dist.harvest.lm import load_lm

    model, tok = load_lm(tiny_lm_dir)
    tokens, ctx, spc, sps = 1000 + random.randrange(200), 16, 4, 16
    out = harvest(model=model, tokenizer=tok, hook_name="blocks.1.hook_resid_post", docs=tiny_corpus(),
                  store_path=str(tmp_path / "h"), tokens=tokens, ctx_len=ctx, batch_size=8, seqs_per_chunk=spc,
                  seqs_per_shard=sps, dtype="bfloat16", progress=False)
    want = harvest_store_bytes(tokens, model.config.hidden_size, dtype="bfloat16", ctx_len=ctx,
                               seqs_per_chunk=spc, seqs_per_shard=sps)
    assert out["n_tokens"] == want["tokens"] == -(-tokens // (ctx - 1)) * (ctx - 1)  # the corpus did not run out
    data, total = _disk(tmp_path / "h")
    meta = want["bytes"]["metadata"]
    assert data == want["total_bytes"] - meta
    assert meta - STORE_META_TOLERANCE <= total - data <= meta, (total - data, meta)
    # sae-plan's default harvest: 1M tokens of 64-token contexts, 504-token chunks, 64512-token shards
    d = harvest_store_bytes(10**6, 4096)
    assert (d["tokens"], d["chunk_tokens"], d["shard_tokens"], d["shards"]) == (1_000_062, 504, 64512, 16)
    # 15 full shards of 128 chunks, then 32,382 tokens in 65 chunks; 8192 bytes per token; indices of
    # 128 x 16 bytes + a crc32c
    assert d["bytes"]["activations"] == 15 * (128 * (504 * 8192 + 4) + 2052) + 65 * (504 * 8192 + 4) + 2052



@pytest.mark.parametrize("ema, density", [(True, True), (False, False)])
def test_checkpoint_bytes_equal_a_written_checkpoint(tmp_path, ema, density):
    """checkpoint_bytes' tensor bytes are exactly what a trained run's checkpoint records, and the files on
    disk fit within its total (the tp = 2 x dp = 2 case: tests/integration/parallel/test_parallel_train.py)."""
    from helpers.checkpoint import checkpoint_on_disk
    from helpers.synthetic import train_on_synthetic

    from sae_dist.plan import checkpoint_bytes
    from sae_dist.sae import SAEConfig

    d, n = 12, 40
    train_on_synthetic(tmp_path, SAEConfig(d_in=d, d_sae=n, k=3), n_store_tokens=2048, tokens=8 * 128,
                       batch_tokens=128, seed=0, ema=ema, feature_density_every_steps=2 if density else 0,
                       checkpoint_every_steps=4, keep_checkpoints=1)
    (ck,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    tensors, on_disk, _ = checkpoint_on_disk(ck)
    r = checkpoint_bytes(d, n, ema=ema, density=density)
    assert tensors == r["total_bytes"] - r["bytes"]["overhead"]
    assert tensors < on_disk <= r["total_bytes"] == r["writer_bytes"]
    big = checkpoint_bytes(4096, 2**24, tp=64)
    assert big["bytes"]["model"] + big["bytes"]["optimizer"] == 3 * (2 * 4096 * 2**24 + 2**24 + 4096) * 4 + 16
    with pytest.raises(ValueError, match="parallel.tp=3 must divide d_sae=40"):
        checkpoint_bytes(d, n, tp=3)
