"""sae-plan: capacity planner for a latent-sharded TopK SAE on a GPU cluster.

For an SAE config (d_in, d_sae, k, k_aux, batch) and a cluster shape (nodes x GPUs per node, GPU
memory, interconnect and HBM bandwidths, bf16 FLOP/s) it computes, per GPU and per optimizer step:
memory (parameters, gradients, optimizer state, activations, workspace), FLOPs and HBM bytes of every
component of the step, the bytes every collective moves, and an estimated step time and tokens/s. It
refuses a shape that does not fit, saying by how many GiB and which trainer settings would fit.
With harvest.tokens=T it also sizes the activation store a harvest of T tokens writes
(`harvest_store_bytes`: exact shard files, a metadata allowance), and it always sizes one training
checkpoint on disk (`checkpoint_bytes`: exact tensor bytes, an allowance for headers and metadata).

These are MODEL ESTIMATES from the formulas below, not measurements (`python -m sae_dist.bench`
measures a step on one device). The defaults model the code as it is: `TopKSAE.
training_step_losses` under `sae_dist.parallel.tp.parallelize_sae`, the Triton kernels of `sae_dist.kernels`
(`encoder_topk`, `sparse_decode`) and the trainer's bf16 autocast on CUDA. The `estimate.*` switches
marked "what-if" below model changes that are not in the code.

Layout planned for (docs/parallel.md): a dp x tp mesh, tp innermost (the tp ranks of a
group are consecutive GPUs, inside one node when tp divides gpus_per_node). tp shards the latents:
rank r holds latents [r*n/tp, (r+1)*n/tp) (`shard_shapes`); b_dec is replicated. Every tp
rank of a dp group sees the same B/dp tokens. fp32 master weights, Adam's two fp32 moments, fp32
gradients.

Notation, per GPU: Bl = B/dp tokens, nl = n/tp latents, P = parameters (`shard_shapes`), d = d_in,
ks = k (4k with Multi-TopK), ka = k_aux (AuxK widths planned in full: >= k_aux dead latents on every
rank, the worst case; the code uses min(k_aux, global dead count)), wm = min(ks, nl) and wa = min(ka, nl)
the local candidate slots per token, nd = round(dead_fraction*nl) the rank's dead latents (the
compute of the AuxK dead-latent pass only), vb = bytes of the encoder's operands and values (2 with
bf16_operand_copies, else 4), TD = ceil(d/64) feature tiles and CB = ceil(w/8) code blocks of the
Triton sparse-decode kernels (BLOCK_D 64, BLOCK_K 8).

Exact global TopK (`sae_dist.parallel.tp.global_keep`), for one selection of exchange width wx and mask
widths ms (main TopK: wx = wm, ms = (k,) or (4k, k) with Multi-TopK; AuxK: wx = ka, ms = (ka,)):
  alltoall (the code, when Bl is divisible by tp): one all_to_all_single of every rank's candidate
    values, fp32 [Bl, wx] per rank, no indices (each rank receives [Bl/tp, tp*wx] for its token
    block), a local torch.topk per width m, then one all_to_all_single per m sending uint8 keep masks
    back, [Bl, wx] bytes per rank. Wire: values Bl*wx*4 bytes sent per rank, masks Bl*wx*1 per m;
    (tp-1)/tp of each crosses links. Memory (forward transient): the fp32 send copy when the values
    are bf16, the received block and its [Bl/tp, tp*wx] transpose (8*Bl*wx), mask, its send copy and
    the received masks (3*Bl*wx), torch.topk's [Bl/tp, m] outputs (12 bytes each).
  allgather (the code's fallback when Bl % tp != 0; chosen automatically then): all-gather of the
    fp32 values, tp*Bl*wx*4 bytes gathered per rank in chunks of R tokens (`tp._allgather_keep`;
    R = max(1, min(Bl, allgather_chunk_bytes // (tp*wx*4))), ceil(Bl/R) collectives, each paying
    the ring latency); per chunk C = R*tp*wx*4 bytes: the tp parts and their concatenation (2C),
    then the concatenation, one bool [R, tp*wx] mask per m and torch.topk's [R, m] outputs (12 bytes
    each): max(2C, C + len(ms)*R*tp*wx + 12*R*max(ms)) <= 4.5 x allgather_chunk_bytes whatever tp is
    (unless one token's tp*wx values alone exceed the cap).
  Kept for the backward either way: one bool [Bl, wx] keep mask per m.

Compute. kind "matmul": FLOPs / (bf16 FLOP/s * mfu); "memory": HBM bytes / (HBM B/s * efficiency);
"fused": counted, hidden in the fused encoder kernel (its cost is in the mfu derate); "host" / "pcie":
optimizer offload (host memory bandwidth / PCIe bandwidth).
  bf16_operand_casts   bf16 copies of W_enc, b_enc and x each step (the fused encoder's compute_dtype
                       under autocast, `sae_dist.sae.topk.encoder_compute_dtype`)
  encoder_matmul       2*Bl*d*nl          the encoder's dense matmul (Gao et al. 2024, eq. 3)
  topk_select          Bl*nl*(2 [+1])     bias add, running-top-k compares [+ the dead-masked AuxK
                       ones of the torch backend; the Triton kernel keeps only the ks main slots]
  split_candidate_topk reading the Triton split candidate buffer (below) for the final torch.topk
  auxk_dead_matmul, auxk_dead_gather_topk (Triton backend, AuxK on; `encoder_topk._select_dead`): the
                       AuxK candidates from the nd dead latents' W_enc columns, gathered a chunk of
                       C = min(max(latent_chunk, 2*ka), nd) at a time, in blocks of
                       R = DEAD_PASS_ELEMENTS // (ka + C) tokens (DEAD_PASS_ELEMENTS = 2^27): one
                       addmm [R, C] each, 2*Bl*d*nd FLOPs in all (a dense matmul at mfu), merged
                       into the running [Bl, ka] result by one topk over ka + C; HBM: the gather
                       from the fp32 parameter (8*d*nd, read + write; + 6*d*nd for the bf16 cast),
                       the blocks and the merges (`_dead_pass`; rough).
  topk_merge/auxk_merge  the exchange's local selection, masks, and the keep masks applied (tp > 1)
  decode_compaction, multi_topk_/auxk_decode_compaction (`sae_dist.parallel.tp.compact_kept`, when m < w):
                       the rank's kept entries moved to the front of every row and the width cut to
                       m (below). HBM per call: Bl*w*_COMPACT_SORT_BYTES (= 32, rough: the keep mask
                       cast to uint8 and its per-row count for the max, torch.sort's input copy,
                       int64 index fill and one read+write pass of the (uint8, int64) pairs) +
                       Bl*m*(42 + 2*vb) (three gathers of the mask, values and ids by the int64
                       order: order, source and output) + Bl*m*17 (where(keep, ids, -1) on m
                       slots). Its backward (`*_compaction_bwd`): the values gather's scatter into a
                       zero-filled [Bl, w] gradient, Bl*w*vb + Bl*m*(2*vb + 8). Not modelled: the
                       host sync of int(max) (one per call).
  decode, multi_topk_decode, auxk_decode (Triton `sparse_decode`), per call with w local slots,
                       m scanned slots, r rows:
                       r = decoded W_dec rows: decode_compact=True (the code: another shard's winners
                       are index -1) r = Bl*k/tp (Bl*4k/tp, Bl*ka/tp) on average; False (what-if, the
                       code before): every local slot, r = Bl*w.
                       m = slots per token the kernels scan: decode_scan_slots="compacted" (the
                       code) m = `kept_width(K, tp, w, Bl)`, the largest per-row kept count of the
                       batch with K = k (4k, ka) global winners per token: each winner on this rank
                       with probability 1/tp (latents spread evenly), so a row's count is
                       Binomial(K, 1/tp) capped at w, and m = the smallest count c >= ceil(K/tp)
                       (>= 1) with Bl * P(count > c) <= 0.01 (union bound: the batch max exceeds m
                       with probability <= 1 %); tp = 1: m = K. "full" (the code before the
                       compaction, for comparison): m = w, every slot, padding included.
                       forward 2*r*d FLOPs; HBM r*d*4 (rows) + S*8*TD (int64 indices, re-read by every
                       feature tile) + Bl*d*4 (output), S = Bl*m slots (padding inside the m
                       included).
  *_bwd                4*r*d FLOPs; grad of values: grad_out read CB = ceil(m/8) times (Bl*d*4*CB)
                       + rows + indices and value gradients over Bl*m slots;
                       grad of W_dec (atomic kernel): a dense fp32 [nl, d] buffer zero-filled per
                       call (4*nl*d), indices re-read per feature tile, r*d*8 atomic
                       read-modify-writes.
  decoder_grad_accumulate  12*nl*d per extra decode call (autograd sums the [nl, d] W_dec gradients)
  encoder_sparse_bwd   grad W_enc over E (token, latent) entries (`encoder_topk._grad_w_enc`), 2*E*d
                       FLOPs, E_all = Bl*(wm + wa) local candidate slots. encoder_bwd_drop_zeros=True
                       (the code): when fewer than 90 % of the slots have a nonzero gradient
                       (`encoder_topk.DROP_ZEROS_BELOW`), the backward keeps only those, E = the
                       winners Ew = Bl*(ks + ka)/tp (the rank's share of the exact global selections;
                       ReLU zeros not subtracted), in the CSR path below; that is when Ew < 0.9*E_all,
                       e.g. under tp > 1, where most AuxK slots are other shards' winners. False
                       (what-if, the CUDA code before that filter): never.
                       Otherwise, on the Triton backend with fp32 operands (bf16_operand_copies=False):
                       one atomic-scatter kernel into a zero-filled fp32 [d, nl] gradient over every
                       slot, E = E_all; HBM 4*d*nl (zero fill) + Bl*d*4 (x, once per tile) +
                       E_all*12*TD (ids, values) + E*d*8 (atomic read-modify-writes) + E_all*40
                       (masks, concatenations, b_enc grad; rough).
                       CSR x dense (dropping zeros; bf16 operands, the trainer's default; the torch
                       backend; deterministic algorithms): HBM
                       E*d*4 (gathered fp32 input rows) + E_all*60 (every slot: the masked fp32
                       gradients, the concatenated ids, token ids, the nonzero scan, the b_enc
                       gradient's index_add_; rough) + E*320 (the filter's gathers, stable argsort ~8
                       radix passes, gathers; rough) + nl*d*12 (fp32 products), in products of C =
                       min(nl, max(latent_chunk, GRAD_CHUNK_BYTES // (4*d))) latents (2^28 B).
                       With bf16 operands both paths first upcast the saved bf16 input (Bl*d*6 bytes).
  b_dec_grad           2*d*nl (-W_enc @ grad b_enc in fp32, a latent chunk at a time: reads the fp32
                       W_enc, 4*d*nl bytes)
  decoder_grad_projection 4*nl*d; decoder_renorm 3*nl*d (section 2.4.1)
  adam                 12 FLOPs, 28 HBM bytes per parameter it updates (P, or P/dp under ZeRO)

Communication (ring model; S = buffer bytes, p = group size, alpha = latency per ring step):
  all_reduce 2(p-1)/p*S/bw + 2(p-1)*alpha; all_gather (S = gathered total) and reduce_scatter (S =
  input) (p-1)/p*S/bw + (p-1)*alpha; all_to_all (S = bytes each rank sends, its own block included)
  (p-1)/p*S/bw + (p-1)*alpha; broadcast (pipelined along the ring) S/bw + (p-1)*alpha. bw = intra-node
  bandwidth when the group lies in one node, else the inter-node bandwidth (per-GPU NIC; a collective
  crossing nodes runs at its slowest link).
  tp: the batch, read by the group's first rank and broadcast in the store's dtype (after a 4-byte status),
  the TopK exchange above (main and AuxK), all-reduce of the partial reconstructions [Bl, d] fp32
  (main, Multi-TopK, AuxK), of the dead-latent count and of the b_dec gradient [d].
  dp: gradient all-reduce of the local shard (trainer.engine=torch) or reduce-scatter + parameter
  all-gather (DeepSpeed ZeRO-1/2); dead-latent "fired" flags [nl] uint8; the loss statistics (the
  global-batch variance: a [d] sum and a scalar, for the loss and for AuxK).

Step time = compute + communication (no overlap: every collective on the critical path, as the
synchronous collectives of `sae_dist.parallel` and DeepSpeed's overlap_comm=false are);
`step_time_overlapped_s` = max(compute, communication) is the perfect-overlap lower bound.
tokens/s = B / step time.

Memory per GPU: params 4P; grads 4P (ZeRO-2: none kept whole); Adam moments 8P, or under ZeRO-1/2 (8
+ 4 + 4)*P/dp (moments, DeepSpeed's fp32 master partition, its fp32 gradient partition) plus a
reduce bucket; with optimizer offload those partitions live in host memory. A checkpoint save or resume
(between steps: no activations) saves and loads each rank's ZeRO partition in place, except with optimizer
offload, where DeepSpeed's optimizer_state() gathers the rank's whole fp32 Adam moments onto the GPU, 8P
(`checkpoint_peak_bytes`; the plan must fit both). EMA 4P when trainer.ema;
dead-latent state 9 bytes per latent; activations = what the forward keeps for the backward (inputs,
[Bl, d] buffers, the encoder's saved input and selections, keep masks, the masked main TopK values
[Bl, wm] the step returns, the decode calls' compacted values and -1-padded int64 ids [Bl, m] and
the gathers' int64 order [Bl, m]) + the larger of the forward's and the backward's transient peaks
(`transient_bytes`):
  forward: the Triton split candidate buffers [Bl, splits * wm] fp32 values + int32 ids (8 bytes per
    entry; `triton_encoder_splits`: splits = ceil(nl / span), span = latent_chunk widened so that
    the buffers stay under candidate_buffer_bytes = 1 GiB, `CANDIDATE_BUFFER_BYTES`, then rounded up
    to the kernel's BLOCK_N (128 for bf16 dots, 64 for IEEE fp32 dots); one split when even that is
    over the cap), with bf16 operands beside the kernel's bf16 copy of W_enc and b_enc (2*d*nl +
    2*nl, freed before the dead pass; the backward holds only the fp32 parameters) and, when d_in is not a
    multiple of 16 (`ENCODER_ROW_ALIGN`), the kernel's copy of x - b_dec in padded rows; the AuxK
    dead-latent pass (Triton; the candidate buffers and the main selection are still alive then):
    its [Bl, ka] result, the [d, C] gathered columns (and, with bf16 operands, their fp32 gather
    before the cast) and one token block's pre-activations, merge and topk (`_dead_pass`; planned
    for the worst case over dead counts, not for nd); on the torch backend its [Bl, latent_chunk]
    chunk buffers and one cast [d, latent_chunk] W_enc chunk; or the exchange buffers; whichever is
    largest;
  backward: the encoder backward's transients: CSR path, its index arrays (E_all*16 + E*40 bytes)
    and its last [C, d] fp32 product (C above; still referenced when the b_dec gradient runs); atomic
    path, the masked gradients and ids (E_all*16) and the b_enc gradient (4*nl); either path with
    bf16 operands, the fp32 upcast of the saved input (Bl*d*4); or one extra [nl, d] fp32 W_dec
    gradient when two or more decode calls run; whichever is larger;
plus a workspace margin (CUDA context, NCCL buffers, allocator slack), and the held-out evaluation's LM
(`estimate.heldout_lm_gib`, when trainer.eval_every_steps > 0: every GPU of the first replica holds it).

Console script `sae-plan` (a Hydra app over `conf/plan.yaml`), e.g.
    sae-plan sae.d_in=4096 sae.d_sae=16777216 trainer.batch_tokens=131072 parallel.tp=64 \\
        cluster.nodes=8 output=json
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

from sae_dist import CONF_DIR

__all__ = [
    "Cluster",
    "PlanDoesNotFit",
    "check_fits",
    "plan",
    "shard_shapes",
    "params_per_gpu",
    "triton_encoder_splits",
    "render",
    "render_compare",
    "main",
    "GiB",
    "ENGINES",
    "TOPK_EXCHANGES",
    "CANDIDATE_BUFFER_BYTES",
    "ENCODER_BLOCK_N",
    "ENCODER_ROW_ALIGN",
    "DEAD_PASS_ELEMENTS",
    "GRAD_CHUNK_BYTES",
    "DEAD_FRACTION",
    "DECODE_SCANS",
    "kept_width",
    "ALLGATHER_CHUNK_BYTES",
    "store_bytes",
    "harvest_store_bytes",
    "STORE_DTYPE_BYTES",
    "checkpoint_bytes",
]

GiB = 2**30  # memory sizes are binary (GiB)
GB = 1e9  # bandwidths are decimal (GB/s)
ENGINES = ("torch", "deepspeed")
ZERO_STAGES = (1, 2)  # DeepSpeed stages `sae_dist.train.deepspeed_engine` runs
TOPK_EXCHANGES = ("alltoall", "allgather")
#: estimate.decode_scan_slots: "compacted" (the code), "full" (the code before `compact_kept`
#: compacted the kept entries, for comparison).
DECODE_SCANS = ("compacted", "full")
KERNEL_BACKENDS = ("auto", "triton", "torch")
#: The Triton encoder's cap on its split candidate buffers (mirrors
#: `sae_dist.kernels.encoder_topk.CANDIDATE_BUFFER_BYTES`; tests check they agree).
CANDIDATE_BUFFER_BYTES = 1 << 30
#: The Triton encoder's latent-split alignment per dot precision on a GPU: the BLOCK_N of its offline default
#: (mirrors `encoder_topk.encoder_launch_config` without a measured entry: 16-bit and TF32 dots 128, IEEE fp32
#: dots 64; every tuning candidate's BLOCK_N divides it; tests check).
ENCODER_BLOCK_N = {"bf16": 128, "tf32": 128, "ieee": 64}
#: The Triton encoder copies x - b_dec into rows padded to a multiple of this many elements when d_in is not one
#: (mirrors `encoder_topk.ROW_ALIGN`; tests check they agree).
ENCODER_ROW_ALIGN = 16
#: Bound of one token block of the AuxK dead-latent pass's [rows, ka + chunk] merge, in elements
#: (mirrors `encoder_topk.DEAD_PASS_ELEMENTS`; tests check they agree).
DEAD_PASS_ELEMENTS = 1 << 27
#: Bound of the CSR W_enc-gradient path's per-chunk [chunk, d] fp32 product on CUDA, in bytes
#: (mirrors `encoder_topk.GRAD_CHUNK_BYTES`; tests check they agree).
GRAD_CHUNK_BYTES = 1 << 28
#: Planned fraction of a rank's latents that are dead (`plan(dead_fraction=)`, estimate.dead_fraction).
DEAD_FRACTION = 0.05
#: The all-gather fallback's cap on the fp32 candidate values it gathers at a time (mirrors
#: `sae_dist.parallel.tp.GATHER_CHUNK_BYTES`; tests check they agree).
ALLGATHER_CHUNK_BYTES = 1 << 28
_DEC_BLOCK_D, _DEC_BLOCK_K = 64, 8  # tiles of the Triton sparse-decode kernels (sparse_decode.BLOCK_*)
#: HBM bytes per [Bl, w] slot of `compact_kept`'s mask cast, count and stable uint8 sort (rough).
_COMPACT_SORT_BYTES = 32
#: `kept_width`: allowed probability that a batch's largest per-row kept count exceeds the planned m.
KEPT_WIDTH_TAIL = 0.01
_INDEX_WORK_BYTES = 320  # HBM bytes per CSR entry of the encoder backward's index work (rough, see docstring)
_SLOT_WORK_BYTES = 60  # HBM bytes per candidate slot of the encoder backward's pre-filter work (rough)
_ATOMIC_SLOT_WORK_BYTES = 40  # the same for the atomic W_enc-gradient path (no token ids, no filter; rough)
#: The encoder backward drops zero-gradient entries (and takes the CSR path) when fewer than this
#: fraction of its slots are nonzero (mirrors `encoder_topk.DROP_ZEROS_BELOW`; tests check they agree).
ENCODER_BWD_DROP_BELOW = 0.9
#: Kept activations still alive when the encoder backward runs (the step's last backward op).
KEPT_TO_ENCODER_BWD = ("inputs_fp32", "encoder_saved_input", "selections")


@dataclass(frozen=True)
class Cluster:
    """A homogeneous GPU cluster. Defaults: one node of 8 H100 SXM 80GB (NVLink + InfiniBand NDR).

    Fields (units in the names; GB = 1e9 bytes, GiB = 2^30 bytes):
      nodes, gpus_per_node: world size = nodes * gpus_per_node.
      gpu_memory_gib: usable memory of one GPU (H100 80GB: nvidia-smi reports 81559 MiB = 79.6 GiB).
      intra_node_gbytes_per_s: per-GPU, per-direction bandwidth inside a node (NVLink 4 through
        NVSwitch: 900 GB/s bidirectional, 450 per direction).
      inter_node_gbytes_per_s: per-GPU network bandwidth between nodes (InfiniBand NDR 400 Gb/s,
        one NIC per GPU: 50 GB/s).
      bf16_tflops: dense bf16 tensor-core peak (H100 SXM: 989).
      hbm_gbytes_per_s: HBM bandwidth (H100 SXM HBM3: 3350).
      hbm_efficiency: fraction of hbm_gbytes_per_s the memory-bound kernels reach, in (0, 1].
      mfu: fraction of bf16_tflops the fused encoder matmul reaches, in (0, 1].
      latency_us: latency of one ring step of a collective, microseconds.
      pcie_gbytes_per_s: host <-> GPU bandwidth per GPU (optimizer offload only; PCIe 5 x16).
      host_gbytes_per_s: host-memory bandwidth one GPU's share of the CPUs reaches when running Adam
        on an offloaded partition (optimizer offload only; a rough figure).

    Raises ValueError naming the bad field.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.6
    intra_node_gbytes_per_s: float = 450.0
    inter_node_gbytes_per_s: float = 50.0
    bf16_tflops: float = 989.0
    hbm_gbytes_per_s: float = 3350.0
    hbm_efficiency: float = 0.7
    mfu: float = 0.5
    latency_us: float = 5.0
    pcie_gbytes_per_s: float = 50.0
    host_gbytes_per_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"cluster.{name}={v!r} must be a positive int")
        for name in ("gpu_memory_gib", "intra_node_gbytes_per_s", "inter_node_gbytes_per_s",
                     "bf16_tflops", "hbm_gbytes_per_s", "pcie_gbytes_per_s", "host_gbytes_per_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"cluster.{name}={v!r} must be a positive number")
        for name in ("mfu", "hbm_efficiency"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
                raise ValueError(f"cluster.{name}={v!r} must be in (0, 1]")
        if not isinstance(self.latency_us, (int, float)) or self.latency_us < 0:
            raise ValueError(f"cluster.latency_us={self.latency_us!r} must be >= 0")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Cluster":
        """Build from a mapping (e.g. the Hydra `cluster:` block); unknown keys raise ValueError."""
        d = dict(d or {})
        names = [f.name for f in fields(cls)]
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown cluster keys {sorted(unknown)}; valid: {names}")
        return cls(**d)


def shard_shapes(d_in: int, d_sae: int, tp: int) -> dict[str, tuple[int, ...]]:
    """Per-rank parameter shapes of the latent-sharded TopK SAE (docs/parallel.md).

    tp rank r holds latents [r*n/tp, (r+1)*n/tp): W_enc [d_in, n/tp], b_enc [n/tp],
    W_dec [n/tp, d_in]; b_dec [d_in] is replicated on every rank. Names follow the export contract.

    Raises ValueError when an argument is not a positive int or d_sae is not divisible by tp.
    """
    for name, v in (("d_in", d_in), ("d_sae", d_sae), ("tp", tp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    from sae_dist.parallel.mesh import shard_range

    lo, hi = shard_range(d_sae, tp, 0)  # the trainer's own split; raises when tp does not divide n
    nl = hi - lo
    return {"W_enc": (d_in, nl), "b_enc": (nl,), "W_dec": (nl, d_in), "b_dec": (d_in,)}


def params_per_gpu(d_in: int, d_sae: int, tp: int) -> int:
    """Number of parameters one rank holds: the sum over `shard_shapes` (= 2*d*n/tp + n/tp + d)."""
    return sum(math.prod(s) for s in shard_shapes(d_in, d_sae, tp).values())


class PlanDoesNotFit(ValueError):
    """The planned step needs more memory than one GPU has; the message says by how many GiB."""


def check_fits(result: dict) -> dict:
    """Return `result` (a `plan` dict) when it fits, else raise PlanDoesNotFit with its message."""
    if not result["fits"]:
        raise PlanDoesNotFit(result["message"])
    return result


# ------------------------------------------------------------------------------------ the model
def triton_encoder_splits(tokens: int, n_local: int, k: int, latent_chunk: int = 4096,
                          cap_bytes: int = CANDIDATE_BUFFER_BYTES, block_n: int = 128) -> int:
    """Number of latent splits the Triton fused encoder (`encoder_topk.encoder_launch`) launches for
    `tokens` x `n_local` latents selecting k (the main TopK only: ks = k, or 4k with Multi-TopK; the
    AuxK candidates come from a separate pass, `_select_dead`). Its split candidate buffers are
    [tokens, splits * k] fp32 values + int32 ids: tokens * splits * k * 8 bytes.

    max_splits = max(1, cap_bytes // (tokens * k * 8)); span = max(latent_chunk, ceil(n_local /
    max_splits)) rounded up to block_n (the BLOCK_N of `encoder_launch_config`'s offline default, whatever
    configuration a measured table picks: 128 for bf16 and TF32 dots on a GPU, 64 for IEEE fp32 dots, 32
    under the CPU interpreter; see ENCODER_BLOCK_N). The buffers stay under cap_bytes unless one split alone is larger.
    Returns ceil(n_local / span) (an int >= 1).
    Raises ValueError when an argument is not a positive int.
    """
    for name, v in (("tokens", tokens), ("n_local", n_local), ("k", k), ("latent_chunk", latent_chunk),
                    ("cap_bytes", cap_bytes), ("block_n", block_n)):
        _posint(name, v)
    max_splits = max(1, cap_bytes // (tokens * k * 8))
    span = max(latent_chunk, -(-n_local // max_splits))
    span = -(-span // block_n) * block_n
    return -(-n_local // span)


def kept_width(K: int, tp: int, w: int, rows: int, tail: float = KEPT_WIDTH_TAIL) -> int:
    """Planned decode width m of `sae_dist.parallel.tp.compact_kept`: the largest per-row count of this
    rank's kept entries over a batch of `rows` tokens.

    K global winners per token (k, Multi-TopK's factor*k, or k_aux), each on this rank with
    probability 1/tp (latents spread evenly over the shards; real winners are correlated, so a
    skewed batch can need more, up to w). A row's count is modelled as Binomial(K, 1/tp), capped at
    the rank's w local slots; returns the smallest c in [max(1, ceil(K/tp)), w] with
    rows * P(count > c) <= tail (union bound: the batch maximum exceeds c with probability <= tail),
    or w. tp = 1: every winner is local, m = min(K, w). Example: K = 2048, tp = 64, 2^17 rows: the
    mean count is 32, m = 65.
    Raises ValueError for non-positive K, tp, w, rows or a tail outside (0, 1).
    """
    for name, v in (("K", K), ("tp", tp), ("w", w), ("rows", rows)):
        _posint(name, v)
    if not 0 < tail < 1:
        raise ValueError(f"tail={tail!r} must be in (0, 1)")
    lo = min(w, max(1, -(-K // tp)))
    if tp == 1 or lo >= w:
        return min(K, w) if tp == 1 else w
    p = 1.0 / tp
    # pmf(j) in log space (lgamma), upper tail summed from the top
    logp, log1p = math.log(p), math.log1p(-p)
    lg = math.lgamma

    def pmf(j: int) -> float:
        return math.exp(lg(K + 1) - lg(j + 1) - lg(K - j + 1) + j * logp + (K - j) * log1p)

    upper = min(K, w)
    above = 0.0  # P(count > c) for c = upper, upper-1, ...
    best = upper
    for c in range(upper - 1, lo - 1, -1):
        above += pmf(c + 1)
        if rows * above > tail:
            break
        best = c
    return best


def _collective(name, group, op, size, p, link, bw_gbytes, latency_us, what, count=1, calls=1):
    """`count` collectives of `size` bytes under the ring model; bytes_per_gpu = what one GPU sends
    (= receives) over links in all of them. calls > 1: each of them is split into that many
    collectives (chunks) of size / calls bytes on average: the same bytes, calls times the latency."""
    if op == "all_reduce":
        moved, steps = 2 * (p - 1) / p * size, 2 * (p - 1)
    elif op in ("all_gather", "reduce_scatter", "all_to_all"):
        moved, steps = (p - 1) / p * size, p - 1
    elif op == "broadcast":  # pipelined along the ring: every rank but the root receives the whole buffer
        moved, steps = size, p - 1
    else:  # pragma: no cover - internal
        raise ValueError(op)
    return {
        "name": name, "group": group, "op": op, "group_size": p, "link": link, "count": count,
        "size_bytes": int(size), "bytes_per_gpu": int(round(count * moved)), "calls": calls,
        "time_s": count * (moved / (bw_gbytes * GB) + calls * steps * latency_us * 1e-6), "what": what,
    }


def _gather_rows(tokens: int, tp: int, w: int, value_bytes: int, cap: int) -> int:
    """Tokens per chunk of the all-gather fallback (`sae_dist.parallel.tp.gather_chunk_rows`)."""
    return max(1, min(tokens, cap // (tp * w * value_bytes)))


def _dead_pass(tokens: int, d: int, n_local: int, k_aux: int, latent_chunk: int, vb: int,
               n_dead: int) -> dict[str, int]:
    """The Triton backend's AuxK pass (`encoder_topk._select_dead`) over a rank's dead latents: chunks
    of C = min(max(latent_chunk, 2*ka), nd) dead W_enc columns ([d, C] index_select of the fp32
    parameter, cast to the operand dtype), each in blocks
    of R = DEAD_PASS_ELEMENTS // (ka + C) tokens: one addmm [R, C] in the operand dtype (vb bytes)
    merged into the running [tokens, ka] result (the first chunk: topk(ka) of the [R, C] block;
    later ones: concatenation with the held ka values, topk(ka) over ka + C, the ids recovered by
    gather / index / where).

    Compute over n_dead dead latents (ka = min(k_aux, n_dead), as the code passes): matmul_flops =
    2*tokens*d*n_dead; select_flops: one compare per topk input (tokens*(nd + (chunks-1)*ka));
    hbm_bytes (rough): the gather (8*d*nd: fp32 read + write; with bf16 operands + 6*d*nd for the
    cast); per token every block written and read, the first
    chunk's topk outputs and ids, and per later chunk the concatenation written and read, topk
    outputs copied, and the id arithmetic (7 int64 passes over ka).
    transient_bytes, the worst case over dead counts (every latent dead: ka = k_aux, C widest):
    the int64 dead ids (8*n_local), the [d, C] gathered columns and C biases, the [tokens, ka]
    result (values + int64 ids), plus the largest of: the fp32 columns gathered before their cast
    (4*(d + 1)*C, bf16 operands only), and a block's phases: the first chunk's block and
    its topk outputs (R*(C*vb + ka*(vb + 8))); when some dead count needs a second chunk (C <
    n_local), a merge's block and concatenation (R*vb*(ka + 2C)), the concatenation and topk's
    outputs (R*((ka + C)*vb + ka*(vb + 8))), and topk's outputs with the id temporaries
    (R*ka*(vb + 25)). An upper bound (tests check it against the code's CPU allocations).
    Returns {chunk, rows, matmul_flops, select_flops, hbm_bytes, transient_bytes}."""
    def shape(ka: int, nd: int) -> tuple[int, int]:
        C = max(1, min(max(latent_chunk, 2 * ka), nd))
        return C, min(tokens, max(1, DEAD_PASS_ELEMENTS // (ka + C)))

    ka = min(k_aux, n_local)
    C, R = shape(ka, n_local)
    # the fp32 columns gathered from the parameter before their cast (bf16), then each phase of a block
    phases = [4 * (d + 1) * C if vb < 4 else 0, R * (C * vb + (ka * (vb + 8) if C > ka else 0))]
    if C < n_local:  # later chunks are merged (some dead count gives more than one chunk)
        phases += [R * vb * (ka + 2 * C), R * ((ka + C) * vb + ka * (vb + 8)), R * ka * (vb + 25)]
    out = {"chunk": C, "rows": R, "matmul_flops": 2 * tokens * d * n_dead, "select_flops": 0,
           "hbm_bytes": 0, "transient_bytes": 8 * n_local + (d + 1) * C * vb + tokens * ka * (vb + 8)
           + max(phases)}
    if n_dead:
        ka = min(k_aux, n_dead)
        Cp, _ = shape(ka, n_dead)
        later = -(-n_dead // Cp) - 1  # chunks merged with the held result
        per_token = (2 * n_dead * vb + ka * (3 * vb + 24)
                     + later * (3 * (ka + Cp) * vb + ka * (3 * vb + 8 * 7)))
        out["select_flops"] = tokens * (n_dead + later * ka)
        out["hbm_bytes"] = d * n_dead * (8 + (6 if vb < 4 else 0)) + tokens * per_token
    return out


def _encoder_backward(Bl: int, d: int, nl: int, e_all: int, e_win: int, latent_chunk: int, bf16: bool,
                      atomic: bool, drop_zeros: bool) -> dict[str, Any]:
    """The encoder backward (`encoder_topk._EncodeTopK.backward`, `_grad_w_enc`) of one rank over
    e_all candidate slots of which e_win are its winners (the nonzero gradients).

    atomic (Triton backend computing in fp32, unless the CSR path drops zeros below): grad W_enc is
    one atomic-scatter kernel
    (`sparse_decode`'s W_dec-gradient kernel through the [nl, d] view of a zero-filled fp32 [d, nl]
    gradient) over every slot: the kernel masks only invalid ids, so the zero gradients of the
    candidates another shard won issue their atomics too (E = e_all). HBM: the zero fill (4*d*nl),
    x read once per tile (Bl*d*4), ids and values re-read per 64-feature tile, E*d*8 atomic
    read-modify-writes (as the decode's W_dec gradient), E_all*_ATOMIC_SLOT_WORK_BYTES (rough).
    Transient: the masked fp32 gradients and ids and their concatenations (16 bytes per slot) and
    the b_enc gradient (4*nl); no index arrays, no product. bf16 (the saved bf16 input x - b_dec,
    either path): its fp32 upcast, Bl*d*4 bytes held and Bl*d*6 moved.
    Otherwise, and whenever drop_zeros and e_win < 0.9*e_all (the code checks the nonzero count first,
    `encoder_topk.DROP_ZEROS_BELOW`: under tp > 1 most AuxK slots are other shards' winners), the CSR
    path: E = e_win when it drops zeros, else e_all; products of
    C = min(nl, max(latent_chunk, GRAD_CHUNK_BYTES // (4*d))) latents (CUDA); formulas in the module
    docstring. Returns {atomic, entries, flops, hbm_bytes, transient_bytes}."""
    upcast = (Bl * d * 4, Bl * d * 6) if bf16 else (0, 0)  # fp32 copy of the bf16 input: bytes held, moved
    drop = drop_zeros and e_win < ENCODER_BWD_DROP_BELOW * e_all
    if atomic and not drop:
        td = -(-d // _DEC_BLOCK_D)
        return {"atomic": True, "entries": e_all, "flops": 2 * e_all * d,
                "transient_bytes": e_all * 16 + nl * 4 + upcast[0],
                "hbm_bytes": 4 * d * nl + Bl * d * 4 + e_all * 12 * td + e_all * d * 8
                + e_all * _ATOMIC_SLOT_WORK_BYTES + upcast[1]}
    e = e_win if drop else e_all
    gchunk = min(nl, max(latent_chunk, GRAD_CHUNK_BYTES // (4 * d)))
    # index arrays (g, ids, their concatenation; repeat_interleave, nonzero, argsort, gathers), CSR
    # row pointers, the last [gchunk, d] fp32 product, the fp32 input
    transient = e_all * 16 + e * 40 + (nl + 1) * 16 + nl * 4 + gchunk * d * 4 + upcast[0]
    hbm = e * d * 4 + e_all * _SLOT_WORK_BYTES + e * _INDEX_WORK_BYTES + nl * d * 12 + upcast[1]
    return {"atomic": False, "entries": e, "flops": 2 * e * d, "hbm_bytes": hbm, "transient_bytes": transient}


def _posint(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive int")


def plan(
    *, d_in: int, d_sae: int, k: int, batch_tokens: int, tp: int = 1, cluster: Cluster | dict | None = None,
    k_aux: int | None = None, auxk: bool = True, multi_topk: bool = False, multi_topk_factor: int = 4,
    engine: str = "torch", zero_stage: int = 1, offload_optimizer: bool = False, ema: bool = False,
    topk_exchange: str = "alltoall", decode_compact: bool = True, decode_scan_slots: str = "compacted",
    encoder_bwd_drop_zeros: bool = True, kernels: bool = True, kernel_backend: str = "auto",
    latent_chunk: int = 4096, candidate_buffer_bytes: int = CANDIDATE_BUFFER_BYTES,
    allgather_chunk_bytes: int = ALLGATHER_CHUNK_BYTES, bf16_operand_copies: bool = True,
    dead_fraction: float = DEAD_FRACTION, topk_value_bytes: int = 4, input_buffers: int = 2,
    workspace_gib: float = 2.0, zero_bucket_elements: int = 500_000_000, heldout_lm_gib: float = 0.0,
    store_dtype: str = "float16", suggest: bool = True,
) -> dict[str, Any]:
    """Plan one training step of a latent-sharded TopK SAE; a pure function of its arguments.

    Keyword arguments: every field of `_PlanOptions` (documented there: the sae.* / trainer.* options,
    parallelism, kernels and the estimate.* what-ifs), with the defaults above (the code as it is).
    Phases: `_resolve` (checks, per-GPU shapes) -> `_memory` -> `_compute` -> `_comms` -> `_result`
    (step time, fit), then `_suggestions` when it does not fit.

    Returns a JSON-serialisable dict:
      config: the resolved inputs plus world, dp, tokens_per_gpu (Bl), latents_per_gpu (nl), k_aux
        (0 when AuxK is off), k_select (ks), topk_exchange (the one planned) and
        topk_exchange_requested, encoder_splits (Triton path, else 0), decode_rows {call: W_dec rows per rank},
        decode_slots {call: local slots per token w}, decode_scan_width {call: slots per token
        the kernels scan, m}, encoder_bwd_entries (E), encoder_bwd_grad_w ("csr" | "atomic"),
        dead_fraction, dead_latents_per_gpu (nd), auxk_dead_chunk (C of the AuxK dead pass, 0 without
        it), tp_link / dp_link ("intra" | "inter" | "none").
      cluster: the Cluster fields.
      shard_shapes: {name: [dims]} per GPU; params_per_gpu: int.
      memory_bytes: {params, grads, optimizer, ema, dead_latent_state,
        activations, zero_buckets, workspace, heldout_lm, total} per GPU in bytes; memory_gib: the same in GiB;
        host_memory_bytes: per GPU on the host (optimizer offload), else 0.
      checkpoint_peak_bytes: per GPU at a checkpoint save or resume (no activations; with
        engine="deepspeed" and offload_optimizer plus the gathered fp32 Adam moments of the rank's
        parameters, 8P): the plan fits when both it and memory_bytes' total fit.
      activation_bytes: {component: bytes} kept for the backward; transient_bytes: {phase: {component:
        bytes}} for the phases "forward", "decode_backward" and "encoder_backward"; activation_phases:
        {phase: kept + largest transient, bytes}; activation_peak_phase: the largest (memory_bytes'
        activations).
      flops: {component: {phase, kind, flops, hbm_bytes, time_s}}; flops_total; matmul_flops (every
        dense matmul costed at mfu: the encoder's and the AuxK dead pass's; matmul_s their time).
      comm: list of {name, group, op, group_size, link, count, size_bytes, bytes_per_gpu, calls (the
        collectives one of them is split into: the chunked all-gather fallback), time_s, what};
        comm_bytes_per_gpu (sum of bytes_per_gpu).
      compute_s, matmul_s, tp_comm_s, dp_comm_s, comm_s, step_time_s (compute + comm),
      step_time_overlapped_s (max of the two), tokens_per_s, tokens_per_s_overlapped, comm_fraction
      (comm_s / step_time_s), step_over_matmul, input_bytes_per_gpu (fp32 batch bytes per step).
      gpu_memory_gib, fits, excess_gib (> 0 iff not fits; of the larger of the step's total and
      checkpoint_peak_bytes), headroom_gib, message ("" when it fits,
      else the refusal, with the excess in GiB), suggestions (when it does not fit: up to 3
      {overrides, total_gib, step_time_s, tokens_per_s} that fit, highest tokens/s first), assumptions.

    Raises ValueError naming the bad option and the fix (tp not dividing the world or n, B not
    divisible by dp, k > n, an unknown engine / zero stage / exchange, ...). A shape that does not
    fit is not an error here: see `fits` / `message`, or call `check_fits`.
    """
    options = _PlanOptions(**locals())  # every keyword argument above, by name
    s = _resolve(options)
    result = _result(s, _memory(s), _compute(s), _comms(s))
    if not result["fits"]:
        result["suggestions"] = _suggestions(_suggestion_kwargs(s)) if suggest else []
        result["message"] = _refusal(result)
    return result


@dataclass(frozen=True)
class _PlanOptions:
    """The keyword arguments of `plan`, by name; their defaults are in `plan`'s signature.

    SAE and trainer (the sae.* / trainer.* options of the same names):
      d_in, d_sae, k: SAE width, latents, active latents per token.
      batch_tokens: global batch B in tokens; each dp rank gets B/dp.
      k_aux: AuxK latents per token; None -> `sae_dist.sae.config.default_k_aux(d_in)` capped at n
        (a power of two near d_in/2). Planned in full (>= k_aux dead latents on every rank).
      auxk: False when AuxK is off (sae.auxk_coef == 0).
      multi_topk, multi_topk_factor: Multi-TopK (L(k) + L(4k)/8): the encoder selects factor*k.
      engine, zero_stage, offload_optimizer: trainer.engine "torch" (fused Adam, gradients
        all-reduced over dp) or "deepspeed" (ZeRO zero_stage 1 or 2 over dp; zero_stage is ignored
        with engine="torch"); offload_optimizer keeps DeepSpeed's partitions on the host.
      ema: trainer.ema (one more fp32 copy of the parameters).
    Parallelism and kernels (defaults: the code as it is; "what-if" = not in the code):
      tp: latent shards (parallel.tp); dp = world / tp.
      cluster: a `Cluster` or a dict of its fields (default: one node of 8 H100 80GB).
      topk_exchange: "alltoall" (token-sharded, the code) or "allgather" (the code's fallback).
        When B/dp is not divisible by tp the code always gathers, and so does the plan
        (config["topk_exchange"] is then "allgather", config["topk_exchange_requested"] the input).
      allgather_chunk_bytes: the fallback gathers the fp32 values of at most this many bytes at a
        time, in chunks of tokens (`sae_dist.parallel.tp.GATHER_CHUNK_BYTES`).
      decode_compact: True (the code): each rank decodes only its own winners (the others are index
        -1); False (what-if): every local candidate's W_dec row is read.
      decode_scan_slots: "compacted" (the code, `sae_dist.parallel.tp.compact_kept`): the kept entries
        are moved to the front and the codes cut to m = `kept_width` slots per token, which the
        sparse-decode kernels scan (padding inside the m included), plus the sort / gather cost;
        "full" (the code before that compaction, for comparison): they scan all w local slots,
        padding included, and nothing is sorted.
      encoder_bwd_drop_zeros: True (the code): the
        encoder backward drops the zero-gradient entries (candidates another shard won) when they
        are over 10 % of its slots, so its CSR holds the rank's winners, Bl*(ks + ka)/tp on average;
        False (what-if, the CUDA code before that filter): every local candidate, Bl*(wm + wa). The
        atomic path (Triton, fp32 operands, when nothing is dropped) scatters every slot, zeros included.
      kernels, kernel_backend, latent_chunk, candidate_buffer_bytes: sae.kernels, sae.kernel_backend,
        the fused encoder's `latent_chunk` (the trainer uses the default 4096) and its candidate
        buffer cap. "auto" plans the Triton path (a GPU plan; `triton_encoder_splits`, the tile
        BLOCK_N of bf16 dots, or of IEEE fp32 dots with fp32 operands: torch's default fp32 matmul
        precision) with the AuxK dead-latent pass; "torch": [Bl, latent_chunk] chunk buffers;
        kernels=False: dense [Bl, nl] fp32 pre-activations.
      dead_fraction: estimate.dead_fraction, the fraction of a rank's latents that are dead, in
        [0, 1] (default 0.05): the Triton backend's AuxK pass over the dead latents
        (`encoder_topk._select_dead`) costs a matmul of 2*Bl*d*round(dead_fraction*nl) FLOPs plus
        its gather and top-k passes. Its memory is planned for the worst case over dead counts, and
        the AuxK widths (exchange, decode) for >= k_aux dead latents, whatever dead_fraction is.
        ValueError outside [0, 1].
      bf16_operand_copies: True (the code under the trainer's bf16 autocast on CUDA,
        `sae_dist.sae.topk.encoder_compute_dtype`): the fused encoder computes on bf16 copies of W_enc,
        b_enc and x that its forward casts and frees (the gradients stay fp32); False: fp32 operands
        (trainer.bf16=false: pass the tf32 / fp32 rate as cluster.bf16_tflops).
      topk_value_bytes: bytes of one exchanged candidate value (the code: 4, fp32).
      input_buffers: fp32 [Bl, d] batches resident (current + prefetched).
      workspace_gib: memory margin for the CUDA context, NCCL buffers and allocator slack.
      zero_bucket_elements: DeepSpeed's reduce bucket (fp32 elements) under ZeRO.
      heldout_lm_gib: the held-out evaluation's LM during training (trainer.eval_every_steps > 0), GiB on
        each GPU of the first data-parallel replica, the fullest GPU (an 8B LM in bf16: 14.9); 0 counts none.
      store_dtype: the training batches' dtype as read (harvest.dtype: the store's, or the LM stream's
        buffer): under tp > 1 the tp group's first rank broadcasts each [Bl, d] batch in it.
      suggest: when the plan does not fit, search tp / engine / ZeRO stage / batch size settings of
        the same cluster that fit.
    """

    d_in: int
    d_sae: int
    k: int
    batch_tokens: int
    tp: int
    cluster: Cluster | dict | None
    k_aux: int | None
    auxk: bool
    multi_topk: bool
    multi_topk_factor: int
    engine: str
    zero_stage: int
    offload_optimizer: bool
    ema: bool
    topk_exchange: str
    decode_compact: bool
    decode_scan_slots: str
    encoder_bwd_drop_zeros: bool
    kernels: bool
    kernel_backend: str
    latent_chunk: int
    candidate_buffer_bytes: int
    allgather_chunk_bytes: int
    bf16_operand_copies: bool
    dead_fraction: float
    topk_value_bytes: int
    input_buffers: int
    workspace_gib: float
    zero_bucket_elements: int
    heldout_lm_gib: float
    store_dtype: str
    suggest: bool


@dataclass(frozen=True)
class _Step:
    """One planned step's resolved shapes, in the notation of the module docstring (per GPU).

    o: the options; c: the cluster; shapes: `shard_shapes`; k_aux: the resolved sae.k_aux (AuxK on
    or off); ks: the main selection width (k, or factor*k with Multi-TopK); ka: k_aux, 0 when AuxK is
    off; d, n, B: d_in, d_sae, batch_tokens; Bl, nl: tokens and latents per GPU; P: parameters
    per GPU, part: its ZeRO partition (rounded up); zero: the ZeRO stage, 0 with the torch engine;
    tp_link / dp_link: "intra" | "inter" | "none", link_bw: GB/s per link; exchange: the TopK
    exchange planned (the all-gather fallback when Bl % tp); backend: the resolved kernel backend,
    triton: the Triton path planned; vb / vx: bytes of an encoder value / an exchanged value;
    bd: bytes of one fp32 [Bl, d] tensor, n_bd: the live ones; chunk: min(latent_chunk, nl);
    wm, wa: local candidate slots per token (main, AuxK); td: decode feature tiles; calls:
    `_decode_calls`; e_all, e_win: encoder-backward slots and winners; ebw: `_encoder_backward`;
    n_dead: the rank's dead latents, dead: `_dead_pass` (Triton with AuxK) or None; selections:
    (prefix, exchange width wx, mask widths ms) per exact global selection; exchanges: {prefix:
    `_exchange_costs`} when tp > 1; splits: `triton_encoder_splits`.
    """

    o: _PlanOptions
    c: Cluster
    shapes: dict[str, tuple[int, ...]]
    world: int
    dp: int
    k_aux: int
    ks: int
    ka: int
    d: int
    n: int
    B: int
    Bl: int
    nl: int
    P: int
    part: int
    zero: int
    tp_link: str
    dp_link: str
    link_bw: dict[str, float]
    exchange: str
    backend: str
    triton: bool
    vb: int
    vx: int
    bd: int
    n_bd: int
    chunk: int
    wm: int
    wa: int
    td: int
    calls: list[tuple[str, int, float, int]]
    e_all: int
    e_win: int
    ebw: dict[str, Any]
    n_dead: int
    dead: dict[str, int] | None
    selections: list[tuple[str, int, tuple[int, ...]]]
    exchanges: dict[str, tuple[int, int, int]]
    splits: int


def _check_options(o: _PlanOptions) -> None:
    """Raise ValueError naming the first bad option that needs no shape to judge: the positive ints,
    trainer.engine / zero_stage / offload_optimizer, topk_exchange, estimate.decode_scan_slots,
    sae.kernel_backend, workspace_gib and heldout_lm_gib >= 0 and estimate.dead_fraction in [0, 1]."""
    for name in ("d_in", "d_sae", "k", "batch_tokens", "tp", "latent_chunk", "multi_topk_factor",
                 "topk_value_bytes", "input_buffers", "zero_bucket_elements", "candidate_buffer_bytes",
                 "allgather_chunk_bytes"):
        _posint(name, getattr(o, name))
    if o.engine not in ENGINES:
        raise ValueError(f"trainer.engine={o.engine!r}; valid: {ENGINES}")
    if o.engine == "deepspeed" and o.zero_stage not in ZERO_STAGES:
        raise ValueError(f"trainer.zero_stage={o.zero_stage!r}; valid with engine=deepspeed: {ZERO_STAGES}")
    if o.offload_optimizer and o.engine != "deepspeed":
        raise ValueError("trainer.offload_optimizer=true needs trainer.engine=deepspeed")
    if o.topk_exchange not in TOPK_EXCHANGES:
        raise ValueError(f"topk_exchange={o.topk_exchange!r}; valid: {TOPK_EXCHANGES}")
    if o.decode_scan_slots not in DECODE_SCANS:
        raise ValueError(f"estimate.decode_scan_slots={o.decode_scan_slots!r}; valid: {DECODE_SCANS} "
                         "(\"compacted\" is the code)")
    if o.kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"sae.kernel_backend={o.kernel_backend!r}; valid: {KERNEL_BACKENDS}")
    if o.store_dtype not in STORE_DTYPE_BYTES:
        raise ValueError(f"harvest.dtype={o.store_dtype!r} (the store's dtype); valid: {tuple(STORE_DTYPE_BYTES)}")
    for name in ("workspace_gib", "heldout_lm_gib"):
        v = getattr(o, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"estimate.{name}={v!r} must be a number of GiB >= 0")
    df = o.dead_fraction
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not 0 <= df <= 1:
        raise ValueError(f"estimate.dead_fraction={df!r} must be a number in [0, 1] (the fraction "
                         "of a rank's latents that are dead, e.g. 0.05)")


def _resolve(o: _PlanOptions) -> _Step:
    """Check the options against each other and the cluster (ValueError naming the bad one and the
    fix: tp dividing the world and n, B divisible by dp, k, k_aux and factor*k within n) and resolve
    the step's shapes (`_shape_step`)."""
    c = o.cluster if isinstance(o.cluster, Cluster) else Cluster.from_dict(o.cluster)
    _check_options(o)
    world, tp, n = c.world, o.tp, o.d_sae
    if tp > world or world % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide the world size {world} (= cluster.nodes {c.nodes} x "
            f"cluster.gpus_per_node {c.gpus_per_node}); divisors: "
            f"{[t for t in range(1, world + 1) if world % t == 0]}"
        )
    dp = world // tp
    shapes = shard_shapes(o.d_in, n, tp)  # raises when tp does not divide n
    if o.batch_tokens % dp:
        raise ValueError(f"trainer.batch_tokens={o.batch_tokens} is not divisible by dp={dp} "
                         f"(= world {world} / tp {tp}); use a multiple of {dp}")
    if o.k > n:
        raise ValueError(f"sae.k={o.k} > sae.d_sae={n}: lower sae.k")
    k_aux = o.k_aux
    if k_aux is None:
        from sae_dist.sae.config import default_k_aux

        k_aux = min(default_k_aux(o.d_in), n)
    if not isinstance(k_aux, int) or isinstance(k_aux, bool) or not 1 <= k_aux <= n:
        raise ValueError(f"sae.k_aux={k_aux!r} must be an int in [1, d_sae={n}]")
    ks = o.multi_topk_factor * o.k if o.multi_topk else o.k
    if ks > n:
        raise ValueError(f"Multi-TopK selects multi_topk_factor*k = {ks} > d_sae={n}")
    return _shape_step(o, c, shapes, dp, k_aux, ks)


def _shape_step(o: _PlanOptions, c: Cluster, shapes: dict, dp: int, k_aux: int, ks: int) -> _Step:
    """The `_Step` of validated options: per-GPU sizes, links, the exchange and kernel path planned,
    the decode calls, the encoder backward, the AuxK dead pass and the exchanges' costs."""
    d, n, B, tp = o.d_in, o.d_sae, o.batch_tokens, o.tp
    nl, Bl = n // tp, B // dp
    P = params_per_gpu(d, n, tp)
    ka = k_aux if o.auxk else 0
    gpn, world = c.gpus_per_node, c.world
    backend = "triton" if o.kernel_backend == "auto" else o.kernel_backend
    triton = o.kernels and backend == "triton"
    vb = 2 if o.bf16_operand_copies else 4  # encoder operand / value bytes
    wm, wa = min(ks, nl), min(ka, nl)  # local candidate slots per token (main, AuxK)
    exchange = o.topk_exchange if (tp == 1 or Bl % tp == 0) else "allgather"  # the code's fallback
    e_all = Bl * (wm + wa)  # encoder-backward candidate slots (gradients, ids) before the filter
    e_win = min(e_all, -(-Bl * (ks + ka) // tp))  # the rank's winners (nonzero gradients), on average
    n_dead = int(round(o.dead_fraction * nl)) if ka else 0  # the rank's dead latents (the AuxK pass)
    selections = [("topk", wm, (ks, o.k) if o.multi_topk else (o.k,))]
    if ka:
        selections.append(("auxk", ka, (ka,)))
    exchanges = {prefix: _exchange_costs(Bl, tp, wx, ms, vb, o.topk_value_bytes, exchange,
                                         o.allgather_chunk_bytes)
                 for prefix, wx, ms in selections} if tp > 1 else {}
    return _Step(
        o=o, c=c, shapes=shapes, world=world, dp=dp, k_aux=k_aux, ks=ks, ka=ka, d=d, n=n, B=B, Bl=Bl, nl=nl,
        P=P, part=-(-P // dp), zero=o.zero_stage if o.engine == "deepspeed" else 0,
        tp_link="none" if tp == 1 else ("intra" if gpn % tp == 0 else "inter"),
        dp_link="none" if dp == 1 else ("intra" if world <= gpn else "inter"),
        link_bw={"intra": c.intra_node_gbytes_per_s, "inter": c.inter_node_gbytes_per_s},
        exchange=exchange, backend=backend, triton=triton, vb=vb, vx=o.topk_value_bytes, bd=Bl * d * 4,
        # live fp32 [Bl, d] tensors: loss path (partial decode, its all-reduced copy, x_hat, x - x_hat,
        # its grad), AuxK the same for e / e_hat, Multi-TopK 3 more
        n_bd=4 + (4 if ka else 0) + (3 if o.multi_topk else 0),
        chunk=min(o.latent_chunk, nl), wm=wm, wa=wa, td=-(-d // _DEC_BLOCK_D),
        calls=_decode_calls(o, Bl, ks, ka, wm, wa), e_all=e_all, e_win=e_win,
        ebw=_encoder_backward(Bl, d, nl, e_all, e_win, o.latent_chunk, o.bf16_operand_copies,
                              triton and not o.bf16_operand_copies, o.encoder_bwd_drop_zeros),
        n_dead=n_dead, dead=_dead_pass(Bl, d, nl, wa, o.latent_chunk, vb, n_dead) if (triton and ka) else None,
        selections=selections, exchanges=exchanges,
        splits=triton_encoder_splits(Bl, nl, wm, o.latent_chunk, o.candidate_buffer_bytes,
                                     ENCODER_BLOCK_N["bf16" if o.bf16_operand_copies else "ieee"]),
    )


def _decode_calls(o: _PlanOptions, Bl: int, ks: int, ka: int, wm: int, wa: int) -> list[tuple[str, int, float, int]]:
    """The step's sparse-decode calls, [(name, w local slots per token, r W_dec rows decoded, m scanned
    slots per token)]: "decode" (k winners), "multi_topk_decode" (ks, Multi-TopK only) and
    "auxk_decode" (ka, AuxK only). decode_compact: r = Bl*K/tp (own winners only), else Bl*w;
    decode_scan_slots "compacted": m = `kept_width` (kept entries moved to the front), "full": m = w."""
    def call(name: str, K: int, w: int) -> tuple[str, int, float, int]:
        m = kept_width(K, o.tp, w, Bl) if o.decode_scan_slots != "full" else w
        return name, w, (Bl * K / o.tp if o.decode_compact else Bl * w), m

    calls = [call("decode", o.k, wm)]
    if o.multi_topk:
        calls.append(call("multi_topk_decode", ks, wm))
    if ka:
        calls.append(call("auxk_decode", ka, wa))
    return calls


def _exchange_costs(Bl: int, tp: int, wx: int, ms: tuple[int, ...], vb: int, vx: int, exchange: str,
                    cap: int) -> tuple[int, int, int]:
    """One exact global selection's exchange on one rank (tp > 1), exchange width wx, mask widths ms:
    (forward transient bytes, merge FLOPs, merge HBM bytes). alltoall: the fp32 send copy of bf16
    values, the received block and its transpose, the masks and topk outputs; allgather: chunks of
    R = `_gather_rows` tokens, C = R*tp*wx*vx bytes gathered at a time (`tp._allgather_keep`)."""
    send = Bl * wx * vx if vb != vx else 0  # fp32 copy of bf16 values (none when already fp32)
    if exchange == "alltoall":
        return (send + 2 * Bl * wx * vx + 3 * Bl * wx + -(-Bl // tp) * max(ms) * 12,
                len(ms) * Bl * wx, Bl * wx * (2 * vx + 9 * len(ms)))
    R = _gather_rows(Bl, tp, wx, vx, cap)
    cb = R * tp * wx * vx
    return (send + max(2 * cb, cb + len(ms) * R * tp * wx + R * max(ms) * 12),
            len(ms) * tp * Bl * wx, tp * Bl * wx * (2 * vx + 6 * len(ms)) + len(ms) * Bl * wx)


# ------------------------------------------------------------------ memory
class _Memory(NamedTuple):
    """Per-GPU memory of a step (`plan`'s memory_bytes, host_memory_bytes, activation_bytes,
    transient_bytes, activation_phases and activation_peak_phase)."""

    per_gpu: dict[str, int]
    host: int
    kept: dict[str, int]
    transient: dict[str, dict[str, int]]
    phases: dict[str, int]
    peak_phase: str
    checkpoint_peak: int


def _memory(s: _Step) -> _Memory:
    """Memory per GPU (module docstring, "Memory per GPU"): the persistent state, the activations
    (what the forward keeps + the largest transient of the peak phase), ZeRO buckets, workspace, held-out LM."""
    o = s.o
    mem = _state_memory(s)
    kept = _kept_activations(s)
    transient = _transients(s)
    kept_all = sum(kept.values())
    kept_enc = sum(kept[key] for key in KEPT_TO_ENCODER_BWD)  # the rest is freed by then
    phases = {ph: (kept_enc if ph == "encoder_backward" else kept_all) + max(t.values(), default=0)
              for ph, t in transient.items()}
    peak_phase = max(phases, key=phases.get)
    mem["activations"] = phases[peak_phase]
    mem["zero_buckets"] = 4 * o.zero_bucket_elements if s.zero else 0
    mem["workspace"] = int(round(o.workspace_gib * GiB))
    mem["heldout_lm"] = int(round(o.heldout_lm_gib * GiB))
    mem["total"] = sum(mem.values())
    # offload_optimizer is DeepSpeed's (`_check_options`), so a ZeRO partition: master + its grad + 2 moments, fp32
    host = 16 * s.part if o.offload_optimizer else 0
    # between steps, at a checkpoint or resume: no activations; the Adam moments are saved and loaded in place
    # (the torch engine's live state, ZeRO's partitions), except that with offload DeepSpeed's optimizer_state()
    # gathers this rank's whole fp32 moments (8 bytes per local parameter) onto the GPU
    gathered = 8 * s.P if o.offload_optimizer else 0
    return _Memory(mem, host, kept, transient, phases, peak_phase, mem["total"] - mem["activations"] + gathered)


def _state_memory(s: _Step) -> dict[str, int]:
    """Bytes per GPU of the persistent state: params, grads, optimizer, ema and dead_latent_state
    (fp32 master weights, Adam moments; ZeRO partitions of `part` elements)."""
    o, P, part, zero = s.o, s.P, s.part, s.zero
    return {
        "params": 4 * P,
        "grads": (4 * P if zero < 2 else 0) + (4 * part if zero and not o.offload_optimizer else 0),
        "optimizer": (12 * part if not o.offload_optimizer else 0) if zero else 8 * P,
        "ema": 4 * P if o.ema else 0,
        "dead_latent_state": 9 * s.nl,  # int64 tokens-since-fired + bool ever-fired
    }


def _kept_activations(s: _Step) -> dict[str, int]:
    """Bytes per GPU the forward keeps for the backward, by component (`activation_bytes`)."""
    Bl, d, vb = s.Bl, s.d, s.vb
    return {
        "inputs_fp32": s.o.input_buffers * s.bd,
        "dense_Bxd_buffers": s.n_bd * s.bd,
        "encoder_saved_input": Bl * d * vb,  # x - b_dec in the operand dtype, saved for the backward
        "selections": s.e_all * (vb + 8),  # the encoder's values + int64 ids (main and AuxK)
        "keep_masks": sum(len(ms) * Bl * wx for _, wx, ms in s.selections),  # bool [Bl, wx] per width
        # masked main values [Bl, wm] (returned); per call the compacted values + -1-padded int64 ids
        # [Bl, m] the decode saves, and the gathers' int64 order [Bl, m] (only when m < w)
        "decode_inputs": Bl * s.wm * vb + sum(Bl * m * (vb + 8) + (Bl * m * 8 if m < w else 0)
                                              for _, w, _, m in s.calls),
    }


def _transients(s: _Step) -> dict[str, dict[str, int]]:
    """Transient bytes per GPU by phase ("forward", "decode_backward", "encoder_backward") and
    component (`transient_bytes`)."""
    o, Bl, wm, vb = s.o, s.Bl, s.wm, s.vb
    # bf16: the encoder's cast copy of W_enc and b_enc, whole for the Triton kernel (freed before the
    # dead pass), a chunk at a time on the torch backend
    cast = 2 * (s.d + 1) if o.bf16_operand_copies else 0  # bytes per latent of a bf16 W_enc, b_enc copy
    fwd: dict[str, int] = {}
    if not o.kernels:
        fwd["dense_preacts"] = cast * s.nl + Bl * s.nl * 4 * (2 if s.ka else 1)
    elif s.backend == "torch":
        fwd["encoder_chunk_buffers"] = (cast * s.chunk + Bl * s.chunk * vb * (2 if s.ka else 1)
                                        + Bl * (8 * wm + 2 * s.wa) * 12)
    if s.triton:  # + xc's copy in padded rows when d_in is not a multiple of ENCODER_ROW_ALIGN
        padded = Bl * -(-s.d // ENCODER_ROW_ALIGN) * ENCODER_ROW_ALIGN * vb if s.d % ENCODER_ROW_ALIGN else 0
        fwd["encoder_split_candidates"] = cast * s.nl + Bl * s.splits * wm * 8 + padded
    if s.dead:  # with the candidate buffers and the main selection, still referenced by _select_triton
        fwd["auxk_dead_pass"] = s.dead["transient_bytes"] + Bl * s.splits * wm * 8 + Bl * wm * 20
    for prefix, (exchange_bytes, _, _) in s.exchanges.items():
        fwd[f"{prefix}_exchange"] = exchange_bytes
    return {
        "forward": fwd,
        # a second dense fp32 [nl, d] W_dec gradient (atomic kernel) before autograd sums them, and
        # the value gradients [Bl, w]
        "decode_backward": {"decode_grad_buffers": (4 * s.nl * s.d if len(s.calls) > 1 else 0)
                            + max(Bl * m * vb + (Bl * w * vb if m < w else 0) for _, w, _, m in s.calls)},
        "encoder_backward": {"encoder_backward": s.ebw["transient_bytes"]},  # `_encoder_backward`
    }


# ------------------------------------------------------------------ compute
class _Costs:
    """The step's components, {name: {phase, kind, flops, hbm_bytes, time_s}} in `rows`, timed at the
    cluster's rates by kind (module docstring, "Compute")."""

    def __init__(self, c: Cluster) -> None:
        self.rates = {"matmul": c.bf16_tflops * 1e12 * c.mfu,
                      "memory": c.hbm_gbytes_per_s * GB * c.hbm_efficiency,
                      "pcie": c.pcie_gbytes_per_s * GB, "host": c.host_gbytes_per_s * GB}
        self.rows: dict[str, dict] = {}

    def add(self, name: str, phase: str, fl: float, nbytes: float, kind: str) -> None:
        """Add a component: "matmul" timed by FLOPs, "memory" / "pcie" / "host" by bytes, "fused" free."""
        t = 0.0 if kind == "fused" else (fl if kind == "matmul" else nbytes) / self.rates[kind]
        self.rows[name] = {"phase": phase, "kind": kind, "flops": int(fl), "hbm_bytes": int(nbytes), "time_s": t}


def _compute(s: _Step) -> dict[str, dict]:
    """FLOPs, HBM bytes and time of every component of the step, in step order (`plan`'s flops)."""
    costs = _Costs(s.c)
    _encoder_costs(s, costs)
    _decode_costs(s, costs)
    _backward_costs(s, costs)
    _optimizer_costs(s, costs)
    return costs.rows


def _encoder_costs(s: _Step, costs: _Costs) -> None:
    """The encoder forward: operand casts, the matmul, the top-k selection and the AuxK dead pass."""
    o, Bl, d, nl, vb, ka = s.o, s.Bl, s.d, s.nl, s.vb, s.ka
    if o.bf16_operand_copies:
        costs.add("bf16_operand_casts", "fwd", d * nl + nl + Bl * d, 6 * (d * nl + nl + Bl * d), "memory")
    costs.add("encoder_matmul", "fwd", 2 * Bl * d * nl, 0, "matmul")
    sel_fl = Bl * nl * (3 if ka and not s.triton else 2)  # bias add, running top-k [+ dead-masked AuxK]
    if not o.kernels:  # dense pre-activations written, then read by torch.topk (and the AuxK masked copy)
        costs.add("topk_select", "fwd", sel_fl, Bl * nl * 4 * (4 if ka else 2), "memory")
    elif s.backend == "torch":  # [Bl, chunk] buffers written by addmm and read by the chunk top-k
        costs.add("topk_select", "fwd", sel_fl, Bl * nl * vb * (3 if ka else 2), "memory")
    else:
        costs.add("topk_select", "fwd", sel_fl, 0, "fused")
        costs.add("split_candidate_topk", "fwd", Bl * s.splits * s.wm, Bl * s.splits * s.wm * 8, "memory")
        if s.dead and s.n_dead:  # the AuxK candidates: a pass over the dead latents' gathered columns
            costs.add("auxk_dead_matmul", "fwd", s.dead["matmul_flops"], 0, "matmul")
            costs.add("auxk_dead_gather_topk", "fwd", s.dead["select_flops"], s.dead["hbm_bytes"], "memory")


def _decode_costs(s: _Step, costs: _Costs) -> None:
    """The forward after the encoder: the exchanges' merges, the keep masks applied, `compact_kept`'s
    compaction, the sparse decodes and the loss's elementwise passes."""
    Bl, d, vb = s.Bl, s.d, s.vb
    for prefix, (_, merge_flops, merge_bytes) in s.exchanges.items():
        costs.add(f"{prefix}_merge", "fwd", merge_flops, merge_bytes, "memory")
    # keep masks applied: values * keep on all w slots, where(keep, ids, -1) on the m decoded slots
    costs.add("keep_apply", "fwd", sum(Bl * (w + m) for _, w, _, m in s.calls),
              sum(Bl * w * (2 * vb + 1) + Bl * m * 17 for _, w, _, m in s.calls), "memory")
    for name, w, _, m in s.calls:  # compact_kept's sort of the keep mask and gathers (when m < w)
        if m < w:
            costs.add(name + "_compaction", "fwd", Bl * w,
                      Bl * w * _COMPACT_SORT_BYTES + Bl * m * (42 + 2 * vb), "memory")
    for name, _, r, m in s.calls:  # the kernels scan Bl*m code slots, padding inside the m included
        costs.add(name, "fwd", 2 * r * d, r * d * 4 + Bl * m * 8 * s.td + s.bd, "memory")
    costs.add("loss_elementwise", "fwd+bwd", 3 * s.n_bd * Bl * d, 3 * s.n_bd * s.bd, "memory")


def _backward_costs(s: _Step, costs: _Costs) -> None:
    """The backward: the sparse decodes' (and their compactions'), the W_dec gradient sums, the
    encoder's sparse backward and the b_dec gradient."""
    Bl, d, nl, vb = s.Bl, s.d, s.nl, s.vb
    for name, w, r, m in s.calls:
        go_reads = Bl * d * 4 * -(-m // _DEC_BLOCK_K)  # grad_out tile re-read per 8-slot code block
        grad_values = go_reads + r * d * 4 + Bl * m * 8 + Bl * m * vb
        grad_wdec = nl * d * 4 + s.bd + Bl * m * 8 * s.td + r * d * 8
        costs.add(name + "_bwd", "bwd", 4 * r * d, grad_values + grad_wdec, "memory")
        if m < w:  # the values gather's backward: scatter into a zero-filled [Bl, w] gradient
            costs.add(name + "_compaction_bwd", "bwd", Bl * m, Bl * w * vb + Bl * m * (2 * vb + 8), "memory")
    extra = len(s.calls) - 1
    if extra:
        costs.add("decoder_grad_accumulate", "bwd", extra * nl * d, extra * 12 * nl * d, "memory")
    costs.add("encoder_sparse_bwd", "bwd", s.ebw["flops"], s.ebw["hbm_bytes"], "memory")
    costs.add("b_dec_grad", "bwd", 2 * d * nl, d * nl * 4, "memory")  # reads the fp32 W_enc


def _optimizer_costs(s: _Step, costs: _Costs) -> None:
    """The optimizer step: the decoder-gradient projection, Adam (on the GPU or offloaded), the ZeRO
    master copies, the decoder renorm, the EMA and the dead-latent update."""
    o, d, nl, P = s.o, s.d, s.nl, s.P
    costs.add("decoder_grad_projection", "opt", 4 * nl * d, 3 * nl * d * 4, "memory")
    p_opt = s.part if s.zero else P
    if o.offload_optimizer:  # DeepSpeed's, on a ZeRO partition
        costs.add("offload_pcie_copies", "opt", 0, 8 * p_opt, "pcie")  # gradient partition down, weights up
        costs.add("adam_on_host", "opt", 12 * p_opt, 28 * p_opt, "host")
    else:
        costs.add("adam", "opt", 12 * p_opt, 28 * p_opt, "memory")
    if s.zero:  # module weights -> master partition before the step, updated partition -> weights after
        costs.add("zero_master_copies", "opt", 0, 16 * p_opt, "memory")
    costs.add("decoder_renorm", "opt", 3 * nl * d, 3 * nl * d * 4, "memory")
    if o.ema:
        costs.add("ema", "opt", 3 * P, 12 * P, "memory")
    costs.add("dead_latent_update", "opt", 2 * nl, 18 * nl, "memory")


# ------------------------------------------------------------------ communication
def _comms(s: _Step) -> list[dict]:
    """Every collective of the step (module docstring, "Communication"): the tp group's, then dp's."""
    return (_tp_comms(s) if s.o.tp > 1 else []) + (_dp_comms(s) if s.dp > 1 else [])


def _group_collective(s: _Step, group: str, name: str, op: str, size: int, what: str, **kw) -> dict:
    """`_collective` over the "tp" or "dp" group of the step, at its link's bandwidth."""
    p, link = (s.o.tp, s.tp_link) if group == "tp" else (s.dp, s.dp_link)
    return _collective(name, group, op, size, p, link, s.link_bw[link], s.c.latency_us, what, **kw)


def _exchange_comms(s: _Step, prefix: str, wx: int, ms: tuple[int, ...], what: str) -> list[dict]:
    """The collectives of one exact global selection (exchange width wx, mask widths ms)."""
    Bl, tp, vx = s.Bl, s.o.tp, s.vx
    if s.exchange == "alltoall":
        return [_group_collective(s, "tp", f"{prefix}_values_alltoall", "all_to_all", Bl * wx * vx,
                                  f"{what}: fp32 candidate values [Bl, {wx}] to the ranks selecting their "
                                  "token blocks"),
                _group_collective(s, "tp", f"{prefix}_masks_alltoall", "all_to_all", Bl * wx,
                                  f"{what}: uint8 keep masks [Bl, {wx}] back, one per width {list(ms)}",
                                  count=len(ms))]
    chunks = -(-Bl // _gather_rows(Bl, tp, wx, vx, s.o.allgather_chunk_bytes))
    return [_group_collective(s, "tp", f"{prefix}_allgather", "all_gather", tp * Bl * wx * vx,
                              f"{what}: every rank's {wx} candidate values of {Bl} tokens, in {chunks} "
                              "chunk(s) of tokens", calls=chunks)]


def _tp_comms(s: _Step) -> list[dict]:
    """The tp group's collectives: the batch its first rank reads and broadcasts (a status, then the batch),
    the TopK (and AuxK) exchanges and the all-reduces of the partial reconstructions, the dead-latent count and
    the b_dec gradient."""
    _, wm, ms = s.selections[0]
    comm = [_group_collective(s, "tp", "batch_status_broadcast", "broadcast", 4,
                              "whether the reading rank got its batch (int32)"),
            _group_collective(s, "tp", "batch_broadcast", "broadcast", s.Bl * s.d * STORE_DTYPE_BYTES[s.o.store_dtype],
                              f"the batch [Bl, d] {s.o.store_dtype}, read once per tp group")]
    comm += _exchange_comms(s, "topk", wm, ms, "exact global TopK")
    comm.append(_group_collective(s, "tp", "recon_allreduce", "all_reduce", s.bd,
                                  "partial reconstructions [Bl, d] fp32"))
    if s.o.multi_topk:
        comm.append(_group_collective(s, "tp", "multi_topk_recon_allreduce", "all_reduce", s.bd,
                                      "Multi-TopK partial reconstructions [Bl, d] fp32"))
    if s.ka:
        comm.append(_group_collective(s, "tp", "dead_count_allreduce", "all_reduce", 8,
                                      "global number of dead latents (int64)"))
        comm += _exchange_comms(s, "auxk", s.ka, (s.ka,), "exact AuxK top-k_aux over dead latents")
        comm.append(_group_collective(s, "tp", "auxk_recon_allreduce", "all_reduce", s.bd,
                                      "partial AuxK reconstructions [Bl, d] fp32"))
    comm.append(_group_collective(s, "tp", "b_dec_grad_allreduce", "all_reduce", 4 * s.d,
                                  "b_dec gradient through the encoder [d] fp32"))
    return comm


def _dp_comms(s: _Step) -> list[dict]:
    """The dp group's collectives: loss statistics, the gradients (all-reduce, or ZeRO's
    reduce-scatter + parameter all-gather) and the dead-latent fired flags."""
    comm = [_group_collective(s, "dp", "loss_stats_allreduce", "all_reduce", 4 * s.d,
                              "global-batch mean [d] and variance (scalar), loss and AuxK",
                              count=4 if s.ka else 2)]
    if s.zero:
        comm.append(_group_collective(s, "dp", "grad_reduce_scatter", "reduce_scatter", 4 * s.P,
                                      "ZeRO: fp32 gradients of the local shard"))
        comm.append(_group_collective(s, "dp", "param_allgather", "all_gather", 4 * s.P,
                                      "ZeRO: updated fp32 parameters of the local shard"))
    else:
        comm.append(_group_collective(s, "dp", "grad_allreduce", "all_reduce", 4 * s.P,
                                      "fp32 gradients of the local shard"))
    comm.append(_group_collective(s, "dp", "dead_latent_allreduce", "all_reduce", s.nl,
                                  "fired flags [nl] uint8 (MAX)"))
    return comm


# ------------------------------------------------------------------ step time and the result
def _step_times(flops: dict[str, dict], comm: list[dict], B: int) -> dict[str, float]:
    """Step time = compute + communication (no overlap); the perfect-overlap bound max(compute,
    comm); tokens/s = B / step time (module docstring, "Step time")."""
    compute_s = sum(v["time_s"] for v in flops.values())
    matmul_s = sum(v["time_s"] for v in flops.values() if v["kind"] == "matmul")  # encoder + AuxK dead pass
    tp_comm_s = sum(x["time_s"] for x in comm if x["group"] == "tp")
    dp_comm_s = sum(x["time_s"] for x in comm if x["group"] == "dp")
    comm_s = tp_comm_s + dp_comm_s
    step = compute_s + comm_s
    step_ov = max(compute_s, comm_s)
    return {"compute_s": compute_s, "matmul_s": matmul_s, "tp_comm_s": tp_comm_s, "dp_comm_s": dp_comm_s,
            "comm_s": comm_s, "step_time_s": step, "step_time_overlapped_s": step_ov,
            "tokens_per_s": B / step, "tokens_per_s_overlapped": B / step_ov,
            "comm_fraction": comm_s / step, "step_over_matmul": step / matmul_s}


def _result(s: _Step, m: _Memory, flops: dict[str, dict], comm: list[dict]) -> dict[str, Any]:
    """`plan`'s result dict (documented there) without the refusal: message "" and no suggestions,
    which `plan` adds when the step does not fit."""
    excess = max(m.per_gpu["total"], m.checkpoint_peak) - s.c.gpu_memory_gib * GiB
    return {
        "config": _config(s),
        "cluster": asdict(s.c),
        "shard_shapes": {k_: list(v) for k_, v in s.shapes.items()},
        "params_per_gpu": s.P,
        "memory_bytes": m.per_gpu,
        "memory_gib": {k_: v / GiB for k_, v in m.per_gpu.items()},
        "host_memory_bytes": m.host,
        "activation_bytes": m.kept,
        "transient_bytes": m.transient,
        "activation_phases": m.phases,
        "activation_peak_phase": m.peak_phase,
        "checkpoint_peak_bytes": m.checkpoint_peak,
        "flops": flops,
        "flops_total": sum(v["flops"] for v in flops.values()),
        "matmul_flops": sum(v["flops"] for v in flops.values() if v["kind"] == "matmul"),
        "comm": comm,
        "comm_bytes_per_gpu": sum(x["bytes_per_gpu"] for x in comm),
        **_step_times(flops, comm, s.B),
        "input_bytes_per_gpu": s.bd,
        "gpu_memory_gib": s.c.gpu_memory_gib,
        "fits": excess <= 0,
        "excess_gib": max(0.0, excess / GiB),
        "headroom_gib": max(0.0, -excess / GiB),
        "message": "",
        "assumptions": _assumptions(s),
    }


def _config(s: _Step) -> dict[str, Any]:
    """`plan`'s config: the resolved inputs and the derived per-GPU shapes (documented in `plan`)."""
    o = s.o
    return {
        "d_in": s.d, "d_sae": s.n, "k": o.k, "k_aux": s.ka, "k_select": s.ks, "auxk": bool(s.ka),
        "multi_topk": o.multi_topk, "batch_tokens": s.B, "tp": o.tp, "dp": s.dp, "world": s.world,
        "tokens_per_gpu": s.Bl, "latents_per_gpu": s.nl, "engine": o.engine, "zero_stage": s.zero,
        "offload_optimizer": bool(o.offload_optimizer), "ema": o.ema, "topk_exchange": s.exchange,
        "topk_exchange_requested": o.topk_exchange,
        "decode_compact": o.decode_compact, "decode_scan_slots": o.decode_scan_slots,
        "decode_rows": {name: int(round(r)) for name, _, r, _ in s.calls},
        "decode_slots": {name: w for name, w, _, _ in s.calls},
        "decode_scan_width": {name: m for name, _, _, m in s.calls},
        "encoder_bwd_drop_zeros": o.encoder_bwd_drop_zeros, "encoder_bwd_entries": s.ebw["entries"],
        "kernels": o.kernels, "kernel_backend": s.backend, "latent_chunk": o.latent_chunk,
        "candidate_buffer_bytes": o.candidate_buffer_bytes, "allgather_chunk_bytes": o.allgather_chunk_bytes,
        "encoder_splits": s.splits if s.triton else 0,
        "dead_fraction": o.dead_fraction, "dead_latents_per_gpu": s.n_dead,
        "auxk_dead_chunk": s.dead["chunk"] if s.dead else 0,
        "encoder_bwd_grad_w": "atomic" if s.ebw["atomic"] else "csr",
        "bf16_operand_copies": o.bf16_operand_copies, "topk_value_bytes": s.vx,
        "input_buffers": o.input_buffers, "workspace_gib": o.workspace_gib,
        "heldout_lm_gib": o.heldout_lm_gib, "tp_link": s.tp_link,
        "dp_link": s.dp_link,
    }


def _assumptions(s: _Step) -> list[str]:
    """`plan`'s assumptions: the modelling choices behind the numbers, in words."""
    o = s.o
    assumptions = [
        "model estimates from formulas, not measurements",
        "tp innermost in the mesh: a tp group lies in one node iff tp divides gpus_per_node",
        "no overlap: every collective on the critical path (step_time_overlapped_s: perfect-overlap bound)",
        "ring collectives at the slowest link of the group (per-GPU NIC across nodes)",
        f"k_aux={s.ka} AuxK candidates per token on every rank (worst case: >= k_aux dead latents per rank)",
        "selected latents spread evenly over the tp ranks",
        "decode width m: the batch's largest per-row kept count, each winner on a rank with probability "
        f"1/tp (Binomial), exceeded with probability <= {KEPT_WIDTH_TAIL:g}; correlated winners can need up to w",
        "top-k selection fused into the encoder matmul (its cost is in the mfu derate; the kernel keeps "
        "k slots per row)",
        f"AuxK candidates (Triton): a pass over dead_fraction={o.dead_fraction:g} of the rank's latents "
        f"({s.n_dead:,}); its memory planned for the worst case over dead counts",
        "encoder matmul at cluster.bf16_tflops * cluster.mfu" + (
            "" if o.bf16_operand_copies else " (fp32 operands: pass the tf32 or fp32 rate)"),
        "activations: the largest of three phase peaks (forward, decode backward, encoder backward), "
        "each = the tensors alive then + that phase's largest transient",
    ]
    if s.exchange != o.topk_exchange:
        assumptions.append(f"B/dp = {s.Bl} is not divisible by tp = {o.tp}: the code falls back to the all-gather "
                           "exchange, and so does this plan")
    return assumptions


def _suggestion_kwargs(s: _Step) -> dict[str, Any]:
    """`plan` keyword arguments of this step for `_suggestions`: the options with the cluster and
    k_aux resolved, without `suggest`."""
    kw = {f.name: getattr(s.o, f.name) for f in fields(s.o) if f.name != "suggest"}
    return {**kw, "cluster": s.c, "k_aux": s.k_aux}


def _suggestions(kw: dict, limit: int = 3) -> list[dict]:
    """Trainer settings of the same cluster that fit, highest tokens/s first: parallel.tp >= the given
    tp (dividing world and n), trainer.engine torch or DeepSpeed ZeRO-1/2, trainer.batch_tokens B,
    B/2 or B/4; and with a held-out evaluation LM counted, the same settings with that evaluation off
    (trainer.eval_every_steps=0). Returns up to `limit` {overrides, total_gib, step_time_s, tokens_per_s}."""
    c: Cluster = kw["cluster"]
    world, n, B0 = c.world, kw["d_sae"], kw["batch_tokens"]
    cur_engine = (kw["engine"], kw["zero_stage"] if kw["engine"] == "deepspeed" else 0)
    found = []
    if kw["heldout_lm_gib"] > 0:
        r = plan(**{**kw, "heldout_lm_gib": 0.0}, suggest=False)
        if r["fits"]:
            found.append({"overrides": "trainer.eval_every_steps=0", "total_gib": r["memory_gib"]["total"],
                          "step_time_s": r["step_time_s"], "tokens_per_s": r["tokens_per_s"]})
    for tp in (t for t in range(kw["tp"], world + 1) if world % t == 0 and n % t == 0):
        dp = world // tp
        engines = {cur_engine, ("torch", 0)} | ({("deepspeed", 1), ("deepspeed", 2)} if dp > 1 else set())
        for (engine, zero), B in itertools.product(sorted(engines), (B0, B0 // 2, B0 // 4)):
            if B < 1 or B % dp or (tp, (engine, zero), B) == (kw["tp"], cur_engine, B0):
                continue
            r = plan(**{**kw, "tp": tp, "engine": engine, "zero_stage": zero or 1, "batch_tokens": B,
                        "offload_optimizer": kw["offload_optimizer"] and engine == "deepspeed"},
                     suggest=False)
            if not r["fits"]:
                continue
            ov = []
            if tp != kw["tp"]:
                ov.append(f"parallel.tp={tp}")
            if (engine, zero) != cur_engine:
                ov.append(f"trainer.engine={engine}" + (f" trainer.zero_stage={zero}" if zero else ""))
            if B != B0:
                ov.append(f"trainer.batch_tokens={B}")
            found.append({"overrides": " ".join(ov), "total_gib": r["memory_gib"]["total"],
                          "step_time_s": r["step_time_s"], "tokens_per_s": r["tokens_per_s"]})
    found.sort(key=lambda s: -s["tokens_per_s"])
    return found[:limit]


def _refusal(r: dict) -> str:
    g, cfg = r["memory_gib"], r["config"]
    parts = ", ".join(f"{k} {g[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "heldout_lm")
                      if g[k] > 0)
    phase = r["activation_peak_phase"]
    tr = max(r["transient_bytes"][phase].items(), key=lambda kv: kv[1])
    gpu, ck = r["gpu_memory_gib"], r["checkpoint_peak_bytes"] / GiB
    moments = ck - (g["total"] - g["activations"])  # what `_memory` adds to the state between steps
    gathered = (f"DeepSpeed's optimizer_state() gathers the rank's fp32 Adam moments, {moments:.1f} GiB, onto "
                "the GPU besides its state")
    if g["total"] > gpu:
        msg = (
            f"does not fit: tp={cfg['tp']} x dp={cfg['dp']} needs {g['total']:.1f} GiB per GPU, "
            f"{g['total'] - gpu:.1f} GiB more than cluster.gpu_memory_gib={gpu:g} "
            f"({parts} GiB; activation peak in the {phase.replace('_', ' ')}, largest transient: {tr[0]} "
            f"{tr[1] / GiB:.1f} GiB)."
        )
        if ck > max(gpu, g["total"]):
            msg += f" At every checkpoint save and resume it needs {ck:.1f} GiB ({gathered})."
    else:
        msg = (f"does not fit: tp={cfg['tp']} x dp={cfg['dp']} needs {ck:.1f} GiB per GPU at every checkpoint save "
               f"and resume, {ck - gpu:.1f} GiB more than cluster.gpu_memory_gib={gpu:g} (the step itself: "
               f"{g['total']:.1f} GiB): {gathered}.")
    if r.get("suggestions"):
        msg += " Settings that fit: " + "; ".join(
            f"{s['overrides']} ({s['total_gib']:.1f} GiB, {s['tokens_per_s']:,.0f} tokens/s predicted)"
            for s in r["suggestions"]
        ) + "."
    else:
        msg += (" No tp / ZeRO stage / batch size (B, B/2, B/4) of this cluster fits: add nodes, lower "
                "trainer.batch_tokens further, or use GPUs with more memory.")
    return msg


# ------------------------------------------------------------------------------------ activation store
#: Bytes of one activation value per store dtype (docs/formats.md#activation-store).
STORE_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Bytes per row of the text arrays a harvest writes beside the activations (int32, int64, int32).
STORE_TEXT_ARRAYS = {"token_ids": 4, "seq_index": 8, "position": 4}
#: Metadata allowance, upper bounds of the group's zarr.json with its attributes, one zarr.json per
#: array and one harvest progress marker per shard (measured 0.5-0.8 KiB, 1.0-1.1 KiB and 0.2 KiB).
STORE_META_BYTES = {"group": 2048, "array": 1280, "marker": 512}
_SHARD_INDEX_ENTRY, _CRC = 16, 4  # zarr sharding index: (offset, nbytes) uint64 per inner chunk; crc32c


def _sharded_array_bytes(rows: int, row_bytes: int, chunk: int, shard: int, crc: bool) -> int:
    """On-disk bytes of the shard files of one uncompressed, token-chunked zarr v3 array: every
    written inner chunk is stored whole (chunk * row_bytes, edge chunks padded, + a crc32c when
    `crc`), and every shard file ends with its index (16 bytes per inner chunk slot + its crc32c)."""
    full, rem = divmod(rows, shard)
    slots = shard // chunk
    per_chunk = chunk * row_bytes + (_CRC if crc else 0)
    index = _SHARD_INDEX_ENTRY * slots + _CRC
    return full * (slots * per_chunk + index) + ((-(-rem // chunk)) * per_chunk + index if rem else 0)


def store_bytes(tokens: int, d_in: int, *, dtype: str = "float16", chunk_tokens: int = 4096,
                shard_tokens: int = 65536, text_arrays: bool = True, checksum: bool = True,
                markers: bool = False) -> dict[str, Any]:
    """Size on disk of an activation store of `tokens` rows of width `d_in` (docs/formats.md): the
    layout `sae_dist.store.create_store` writes, uncompressed (its default; compression="zstd" is
    not modelled: about 6 % smaller on fp16 activations).

    Args:
      tokens, d_in: rows and width of `activations`; dtype: "float16" | "bfloat16" | "float32".
      chunk_tokens, shard_tokens: the inner-chunk and shard-file rows (shard a multiple of chunk).
      text_arrays: token_ids, seq_index and position are stored too (a harvest: 16 bytes per token).
      checksum: a crc32c per inner chunk (the default). markers: one harvest progress marker per shard.
    Returns {tokens, d_in, dtype, chunk_tokens, shard_tokens, shards, bytes: {array or "metadata":
    bytes}, total_bytes, total_gib, bytes_per_token}. The shard files are exact (a test compares
    them with stores the project writes); "metadata" (zarr.json files, markers) is an allowance.
    Raises ValueError for a non-positive size, an unknown dtype or shard_tokens % chunk_tokens != 0.
    """
    for name, v in (("tokens", tokens), ("d_in", d_in), ("chunk_tokens", chunk_tokens),
                    ("shard_tokens", shard_tokens)):
        _posint(name, v)
    if dtype not in STORE_DTYPE_BYTES:
        raise ValueError(f"store dtype {dtype!r}; valid: {sorted(STORE_DTYPE_BYTES)}")
    if shard_tokens % chunk_tokens:
        raise ValueError(f"shard_tokens={shard_tokens} must be a multiple of chunk_tokens={chunk_tokens}")
    rows = {"activations": d_in * STORE_DTYPE_BYTES[dtype], **(STORE_TEXT_ARRAYS if text_arrays else {})}
    out = {name: _sharded_array_bytes(tokens, rb, chunk_tokens, shard_tokens, checksum) for name, rb in rows.items()}
    shards = -(-tokens // shard_tokens)
    m = STORE_META_BYTES
    out["metadata"] = m["group"] + m["array"] * len(rows) + (m["marker"] * shards if markers else 0)
    total = sum(out.values())
    return {"tokens": tokens, "d_in": d_in, "dtype": dtype, "chunk_tokens": chunk_tokens,
            "shard_tokens": shard_tokens, "shards": shards, "bytes": out, "total_bytes": total,
            "total_gib": total / GiB, "bytes_per_token": total / tokens}


def harvest_store_bytes(tokens: int, d_in: int, *, dtype: str = "float16", ctx_len: int = 64,
                        seqs_per_chunk: int | None = None, seqs_per_shard: int = 1024) -> dict[str, Any]:
    """Size on disk of the store `sae-harvest harvest.tokens=<tokens>` writes for an LM of width
    d_in (harvest.dtype, data.ctx_len, harvest.seqs_per_chunk, harvest.seqs_per_shard; defaults:
    conf/harvest/default.yaml and conf/data/stdlib.yaml).

    A harvest stores ctx_len - 1 tokens per sequence (never BOS), rounds `tokens` up to whole
    sequences, chunks by seqs_per_chunk and shards by seqs_per_shard sequences, writes the three text
    arrays and one progress marker per shard. Returns `store_bytes`'s dict plus tokens_requested and
    ctx_len. Raises ValueError for non-positive sizes, ctx_len < 2, an unknown dtype or
    seqs_per_shard % seqs_per_chunk != 0. seqs_per_chunk None: a new store's (harvester.DEFAULT_SEQS_PER_CHUNK).
    """
    if seqs_per_chunk is None:
        from sae_dist.harvest.harvester import DEFAULT_SEQS_PER_CHUNK

        seqs_per_chunk = DEFAULT_SEQS_PER_CHUNK
    for name, v in (("tokens", tokens), ("seqs_per_chunk", seqs_per_chunk), ("seqs_per_shard", seqs_per_shard)):
        _posint(name, v)
    if not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"data.ctx_len={ctx_len!r} must be an int >= 2")
    body = ctx_len - 1
    r = store_bytes(-(-tokens // body) * body, d_in, dtype=dtype, chunk_tokens=seqs_per_chunk * body,
                    shard_tokens=seqs_per_shard * body, text_arrays=True, checksum=True, markers=True)
    return {**r, "tokens_requested": tokens, "ctx_len": ctx_len}


# ------------------------------------------------------------------------------------ checkpoint
#: Allowances of a checkpoint's size on disk, bytes: per stored item (torch.distributed.checkpoint writes every
#: tensor shard with torch.save: 1.5-1.6 KiB of headers measured, plus alignment), and for the .metadata file
#: and the pickled trainer state (a fixed part plus a part per item).
CHECKPOINT_ITEM_BYTES = 2048
CHECKPOINT_META_BYTES = {"fixed": 65536, "item": 1024}


def checkpoint_bytes(d_in: int, d_sae: int, *, tp: int = 1, param_bytes: int = 4, ema: bool = False,
                     density: bool = False) -> dict[str, Any]:
    """Size on disk of one sae-train checkpoint of a TopK SAE (a `checkpoints/step_*` directory:
    torch.distributed.checkpoint in the layout of `sae_dist.parallel.state`), written once whatever dp is.

    Args: d_in, d_sae; tp: latent shards (each tp rank's shard is written by one rank of its dp group);
      param_bytes: bytes per parameter value (4: the fp32 master weights; Adam's moments and the EMA copy
      take the parameters' dtype); ema: trainer.ema; density: trainer.feature_density_every_steps > 0.
    Returns {bytes: {model, optimizer, ema, dead_latents, density, overhead}, total_bytes, total_gib,
    writer_bytes (the most one rank writes: a latent shard, the replicated tensors and the overhead),
    items (stored tensor shards)}. Tensor bytes are exact (a test reads them from written checkpoints);
    "overhead" (torch.save headers, .metadata, trainer state) is an allowance. With trainer.engine=deepspeed
    at dp > 1 every dp rank writes its own pieces of the Adam moments (`sae_dist.parallel.state.RankPart`):
    the same bytes, in more items, so writer_bytes is then an upper bound.
    Raises ValueError for non-positive sizes or a tp that does not divide d_sae."""
    for name, v in (("d_in", d_in), ("d_sae", d_sae), ("tp", tp), ("param_bytes", param_bytes)):
        _posint(name, v)
    if d_sae % tp:
        raise ValueError(f"parallel.tp={tp} must divide d_sae={d_sae}")
    latent = {"model": (2 * d_in + 1) * param_bytes, "optimizer": 2 * (2 * d_in + 1) * param_bytes,
              "ema": (2 * d_in + 1) * param_bytes if ema else 0, "dead_latents": 8 + 1, "density": 8 if density else 0}
    # b_dec (with its two moments and EMA copy) and the four 0-d float32 Adam step counts are replicated
    replicated = {"model": d_in * param_bytes, "optimizer": 2 * d_in * param_bytes + 4 * 4,
                  "ema": d_in * param_bytes if ema else 0, "dead_latents": 0, "density": 0}
    sharded_tensors = 3 + 6 + (3 if ema else 0) + 2 + (1 if density else 0)  # W_enc, b_enc, W_dec, moments, ...
    items = tp * sharded_tensors + 3 + 4 + (1 if ema else 0) + 1  # b_dec + moments, steps, EMA b_dec, trainer
    out = {key: d_sae * latent[key] + replicated[key] for key in latent}
    overhead = items * (CHECKPOINT_ITEM_BYTES + CHECKPOINT_META_BYTES["item"]) + CHECKPOINT_META_BYTES["fixed"]
    out["overhead"] = overhead
    total = sum(out.values())
    writer = d_sae // tp * sum(latent.values()) + sum(replicated.values()) + overhead
    return {"bytes": out, "total_bytes": total, "total_gib": total / GiB, "writer_bytes": writer, "items": items}


# ------------------------------------------------------------------------------------ rendering
def format_bytes(b: float) -> str:
    """b bytes for people: "1.25 GiB", "3.10 MiB", "12.00 KiB" or "512 B" (powers of 1024)."""
    if b >= GiB / 10:
        return f"{b / GiB:,.2f} GiB"
    if b >= 2**20 / 10:
        return f"{b / 2**20:,.2f} MiB"
    return f"{b / 2**10:,.2f} KiB" if b >= 1024 else f"{b:,.0f} B"


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:,.2f} ms"


def _header(r: dict) -> str:
    c, cl = r["config"], r["cluster"]
    zero = f" zero_stage={c['zero_stage']}" if c["engine"] == "deepspeed" else ""
    zero += " offload_optimizer" if c["offload_optimizer"] else ""
    return (
        f"n={c['d_sae']:,} d_in={c['d_in']} k={c['k']} k_aux={c['k_aux']} B={c['batch_tokens']:,} | "
        f"mesh tp={c['tp']} x dp={c['dp']} on {cl['nodes']} x {cl['gpus_per_node']} GPUs | "
        f"engine={c['engine']}{zero} | {_switches(c)}"
    )


def _switches(c: dict) -> str:
    """The modelling switches of a plan's config, as one line (header of both reports)."""
    ex = c["topk_exchange"] + ("" if c["topk_exchange"] == c["topk_exchange_requested"]
                               else f" (fallback: B/dp % tp != 0; asked {c['topk_exchange_requested']})")
    return (f"topk_exchange={ex} decode_compact={c['decode_compact']} "
            f"decode_scan_slots={c['decode_scan_slots']} encoder_bwd_drop_zeros={c['encoder_bwd_drop_zeros']} "
            f"bf16_operand_copies={c['bf16_operand_copies']} latent_chunk={c['latent_chunk']} "
            f"dead_fraction={c['dead_fraction']:g}")


# A table: (title, [(column, "l" | "r")], rows of strings)
_Table = tuple[str, list[tuple[str, str]], list[list[str]]]


def plan_tables(r: dict) -> list[_Table]:
    """The tables `render` prints for one plan: memory, compute, communication, step estimate."""
    out: list[_Table] = []
    rows = []
    for key, v in r["memory_bytes"].items():
        if key == "total" or v == 0:
            continue
        rows.append([key, format_bytes(v)])
        if key == "activations":
            rows[-1][0] = f"activations (peak: {r['activation_peak_phase'].replace('_', ' ')})"
            rows += [[f"  kept: {ak}" + ("" if ak in KEPT_TO_ENCODER_BWD else " (freed before the encoder bwd)"),
                      format_bytes(av)] for ak, av in r["activation_bytes"].items() if av]
            for phase, total in r["activation_phases"].items():
                rows.append([f"  {phase.replace('_', ' ')} peak", format_bytes(total)])
                rows += [[f"    transient: {tk}", format_bytes(tv)]
                         for tk, tv in r["transient_bytes"][phase].items() if tv]
    rows.append(["total", format_bytes(r["memory_bytes"]["total"])])
    if r["config"]["engine"] == "deepspeed" and r["config"]["offload_optimizer"]:
        rows.append(["at a checkpoint (no activations; Adam moments gathered)",
                     format_bytes(r["checkpoint_peak_bytes"])])
    rows.append(["GPU memory", f"{r['gpu_memory_gib']:,.2f} GiB"])
    if r["host_memory_bytes"]:
        rows.append(["host memory (offloaded optimizer)", format_bytes(r["host_memory_bytes"])])
    out.append(("memory per GPU", [("item", "l"), ("size", "r")], rows))

    rows = [[name, v["phase"], v["kind"], f"{v['flops'] / 1e9:,.1f}", f"{v['hbm_bytes'] / 1e9:,.2f}",
             _fmt_s(v["time_s"])] for name, v in r["flops"].items()]
    rows.append(["total", "", "", f"{r['flops_total'] / 1e9:,.1f}",
                 f"{sum(v['hbm_bytes'] for v in r['flops'].values()) / 1e9:,.2f}", _fmt_s(r["compute_s"])])
    out.append(("compute per GPU per step", [("component", "l"), ("phase", "l"), ("kind", "l"),
                                             ("GFLOP", "r"), ("HBM GB", "r"), ("time", "r")], rows))
    if r["comm"]:
        rows = [[x["name"] + (f" x{x['count']}" if x["count"] > 1 else ""), f"{x['group']}({x['group_size']})",
                 x["link"], x["op"], format_bytes(x["size_bytes"]), format_bytes(x["bytes_per_gpu"]),
                 _fmt_s(x["time_s"])] for x in r["comm"]]
        rows.append(["total", "", "", "", "", format_bytes(r["comm_bytes_per_gpu"]), _fmt_s(r["comm_s"])])
        out.append(("communication per GPU per step", [("collective", "l"), ("group", "l"), ("link", "l"),
                                                       ("op", "l"), ("payload", "r"), ("moved/GPU", "r"),
                                                       ("time", "r")], rows))
    rows = [
        ["compute", _fmt_s(r["compute_s"])],
        ["  of which dense matmuls (encoder, AuxK dead pass)", _fmt_s(r["matmul_s"])],
        ["tp communication", _fmt_s(r["tp_comm_s"])],
        ["dp communication", _fmt_s(r["dp_comm_s"])],
        ["step time (no overlap)", _fmt_s(r["step_time_s"])],
        ["tokens/s (no overlap)", f"{r['tokens_per_s']:,.0f}"],
        ["step time (perfect overlap)", _fmt_s(r["step_time_overlapped_s"])],
        ["tokens/s (perfect overlap)", f"{r['tokens_per_s_overlapped']:,.0f}"],
        ["communication share", f"{100 * r['comm_fraction']:.1f} %"],
        ["memory", f"{r['memory_gib']['total']:,.2f} / {r['gpu_memory_gib']:g} GiB"],
    ]
    out.append((f"step prediction (sae-plan's model, not a measurement; encoder matmul assumed at mfu "
                f"{r['cluster']['mfu']:g})", [("quantity", "l"), ("value", "r")], rows))
    if r.get("checkpoint"):
        out.append(checkpoint_table(r["checkpoint"]))
    if r.get("store"):
        out.append(store_table(r["store"]))
    return out


def checkpoint_table(ck: dict) -> _Table:
    """One checkpoint's size on disk (`checkpoint_bytes` dict, with keep: trainer.keep_checkpoints) as a table."""
    rows = [[name, format_bytes(b)] for name, b in ck["bytes"].items() if b]
    rows += [["total", format_bytes(ck["total_bytes"])],
             ["most one rank writes", format_bytes(ck["writer_bytes"])]]
    if ck.get("keep"):
        rows.append([f"kept on disk (trainer.keep_checkpoints={ck['keep']}, +1 while the next is written)",
                     format_bytes((ck["keep"] + 1) * ck["total_bytes"])])
    return ("checkpoint on disk (tensors exact, overhead an allowance)", [("item", "l"), ("size", "r")], rows)


def store_table(st: dict) -> _Table:
    """The activation store's size on disk (`store_bytes` / `harvest_store_bytes` dict) as a table."""
    asked = st.get("tokens_requested", st["tokens"])
    rows = [["tokens stored" + (f" (harvest.tokens={asked:,})" if asked != st["tokens"] else ""), f"{st['tokens']:,}"],
            ["layout", f"{st['dtype']} activations of width {st['d_in']}, chunks of {st['chunk_tokens']:,} tokens, "
                       f"{st['shards']:,} shard file(s) of {st['shard_tokens']:,}"]]
    rows += [[name, format_bytes(b)] for name, b in st["bytes"].items()]
    rows += [["total", format_bytes(st["total_bytes"])], ["per token", f"{st['bytes_per_token']:,.1f} B"]]
    return ("activation store on disk (uncompressed; shard files exact, metadata an allowance)",
            [("item", "l"), ("size", "r")], rows)


def _fits_cell(r: dict) -> str:
    """ "yes", or "no, +<excess GiB>", marked "(checkpoint)" when the checkpoint (not the step) needs more."""
    if r["fits"]:
        return "yes"
    ck = " (checkpoint)" if r["checkpoint_peak_bytes"] > r["memory_bytes"]["total"] else ""
    return f"no, +{r['excess_gib']:.1f}{ck}"


def compare_table(results: list[dict]) -> _Table:
    """One row per plan: mesh, memory (state = params + grads + optimizer + EMA + dead-latent state,
    act = activations, GiB), fit (or the excess in GiB, marked "(checkpoint)" when DeepSpeed's checkpoint
    needs more than the step), compute / communication / step time, tokens/s, communication share;
    "enc splits" = the Triton encoder's latent splits."""
    cols = [("B", "r"), ("tp x dp", "l"), ("tp link", "l"), ("ZeRO", "r"), ("exchange", "l"),
            ("enc splits", "r"), ("state GiB", "r"), ("act GiB", "r"), ("total GiB", "r"), ("fits", "l"),
            ("compute ms", "r"), ("tp comm ms", "r"), ("dp comm ms", "r"), ("step ms", "r"), ("tokens/s", "r"),
            ("comm %", "r")]
    rows = []
    for r in results:
        c, g = r["config"], r["memory_gib"]
        rows.append([
            f"{c['batch_tokens']:,}", f"{c['tp']} x {c['dp']}", c["tp_link"],
            str(c["zero_stage"]) if c["engine"] == "deepspeed" else "-", c["topk_exchange"],
            f"{c['encoder_splits']}",
            f"{g['params'] + g['grads'] + g['optimizer'] + g['ema'] + g['dead_latent_state']:,.1f}",
            f"{g['activations']:,.1f}", f"{g['total']:,.1f}",
            _fits_cell(r),
            f"{r['compute_s'] * 1e3:,.0f}", f"{r['tp_comm_s'] * 1e3:,.0f}", f"{r['dp_comm_s'] * 1e3:,.0f}",
            f"{r['step_time_s'] * 1e3:,.0f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['comm_fraction']:.0f}",
        ])
    mfu = results[0]["cluster"]["mfu"] if results else Cluster().mfu
    return (f"plans (sae-plan predictions, not measurements; encoder matmul assumed at mfu {mfu:g})", cols, rows)


def _md_indent(cell: str) -> str:
    """Leading spaces of a table cell as &nbsp; (markdown collapses plain spaces)."""
    stripped = cell.lstrip(" ")
    return "&nbsp;" * (len(cell) - len(stripped)) + stripped


def _print_tables(tables: list[_Table], markdown: bool) -> None:
    if markdown:  # GitHub-flavoured markdown, for pasting into docs
        for title, cols, rows in tables:
            print(f"\n**{title}**\n")
            print("| " + " | ".join(c for c, _ in cols) + " |")
            print("|" + "|".join("---:" if j == "r" else "---" for _, j in cols) + "|")
            for row in rows:
                print("| " + " | ".join(_md_indent(cell) for cell in row) + " |")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # piped output gets a fixed wide console so tables do not wrap
    con = Console() if sys.stdout.isatty() else Console(width=220)
    for title, cols, rows in tables:
        t = Table(title=title, box=box.HEAVY_HEAD)
        for c, j in cols:
            t.add_column(c, justify="right" if j == "r" else "left")
        for row in rows:
            t.add_row(*row)
        con.print(t)


def render(r: dict, markdown: bool = False) -> None:
    """Print one plan: a header, the `plan_tables` (rich, or markdown with markdown=True), and
    "fits" or the refusal."""
    cfg = r["config"]
    print(_header(r))
    print(f"per GPU: {cfg['tokens_per_gpu']:,} tokens, {cfg['latents_per_gpu']:,} latents, "
          f"{r['params_per_gpu']:,} params, shards {r['shard_shapes']}")
    _print_tables(plan_tables(r), markdown)
    print("\nfits" if r["fits"] else f"\nREFUSED: {r['message']}")


def render_compare(results: list[dict], markdown: bool = False) -> None:
    """Print the `compare_table` of several plans (rich, or markdown with markdown=True)."""
    if results:
        c, cl = results[0]["config"], results[0]["cluster"]
        print(f"n={c['d_sae']:,} d_in={c['d_in']} k={c['k']} k_aux={c['k_aux']} on {cl['nodes']} x "
              f"{cl['gpus_per_node']} GPUs ({cl['gpu_memory_gib']:g} GiB each) | {_switches(c)}")
        st = results[0].get("store")
        if st:
            print(f"activation store of {st['tokens']:,} tokens ({st['dtype']}): {format_bytes(st['total_bytes'])} "
                  "on disk")
    _print_tables([compare_table(results)], markdown)


# ------------------------------------------------------------------------------------ Hydra app
OUTPUTS = ("table", "markdown", "json")
_COMPARE_KEYS = {"tp": int, "zero_stage": int, "topk_exchange": str, "latent_chunk": int, "batch_tokens": int}


def plan_from_cfg(cfg, **overrides) -> dict:
    """`plan(...)` from a Hydra config composed from conf/plan.yaml: sae.* (d_in, d_sae, k,
    k_aux, auxk_coef, multi_topk, multi_topk_factor, kernels, kernel_backend), trainer.* (batch_tokens,
    ema, engine, zero_stage, offload_optimizer, bf16, eval_every_steps), parallel.tp, topk_exchange, cluster.*,
    estimate.* (estimate.bf16_operand_copies null: follow trainer.bf16, as the trainer's autocast does).
    `overrides` replace plan() keyword arguments. The result has two more keys: store, the
    `harvest_store_bytes` dict for harvest.tokens (`store_from_cfg`), or None when that is null; checkpoint,
    the `checkpoint_bytes` dict of one checkpoint (fp32 weights; trainer.ema, trainer.feature_density_every_steps)
    plus keep (trainer.keep_checkpoints).
    Raises ValueError when sae.d_in is null."""
    from omegaconf import OmegaConf

    # sae and trainer are the typed nodes of sae_dist.config (SAE_<arch>, TrainerNode): every key present
    s, t, e = cfg.sae, cfg.trainer, cfg.estimate
    if s.d_in is None:
        raise ValueError("sae.d_in is null: the planner has no activation store to read d_model from; "
                         "pass it, e.g. sae.d_in=4096")
    kw = dict(
        d_in=int(s.d_in), d_sae=int(s.d_sae), k=int(s.k),
        k_aux=None if s.k_aux is None else int(s.k_aux),
        auxk=float(s.auxk_coef) > 0,
        multi_topk=bool(s.multi_topk), multi_topk_factor=int(s.multi_topk_factor),
        kernels=bool(s.kernels), kernel_backend=str(s.kernel_backend),
        batch_tokens=int(t.batch_tokens), ema=bool(t.ema),
        engine=str(t.engine), zero_stage=int(t.zero_stage),
        offload_optimizer=bool(t.offload_optimizer),
        tp=int(cfg.parallel.tp), cluster=OmegaConf.to_container(cfg.cluster, resolve=True),
        topk_exchange=str(cfg.topk_exchange),
        decode_compact=bool(e.decode_compact), decode_scan_slots=str(e.decode_scan_slots),
        encoder_bwd_drop_zeros=bool(e.encoder_bwd_drop_zeros), latent_chunk=int(e.latent_chunk),
        candidate_buffer_bytes=int(e.candidate_buffer_bytes),
        allgather_chunk_bytes=int(e.allgather_chunk_bytes),
        bf16_operand_copies=bool(t.bf16 if e.bf16_operand_copies is None else e.bf16_operand_copies),
        dead_fraction=float(e.dead_fraction),
        topk_value_bytes=int(e.topk_value_bytes),
        input_buffers=int(e.input_buffers), workspace_gib=float(e.workspace_gib),
        zero_bucket_elements=int(e.zero_bucket_elements), store_dtype=str(cfg.harvest.dtype),
        # the held-out evaluation's LM is loaded only when it runs
        heldout_lm_gib=float(e.heldout_lm_gib) if int(t.eval_every_steps) > 0 else 0.0,
    )
    kw.update(overrides)
    r = plan(**kw)
    r["store"] = store_from_cfg(cfg)
    r["checkpoint"] = {**checkpoint_bytes(kw["d_in"], kw["d_sae"], tp=kw["tp"], ema=kw["ema"],
                                          density=int(t.feature_density_every_steps) > 0),
                       "keep": int(t.keep_checkpoints)}
    return r


def store_from_cfg(cfg) -> dict | None:
    """`harvest_store_bytes` for the composed config: sae.d_in, harvest.tokens / dtype /
    seqs_per_chunk / seqs_per_shard (conf/harvest/default.yaml, as sae-harvest) and data.ctx_len;
    None when harvest.tokens is null (conf/plan.yaml's default)."""
    h = cfg.harvest
    if h.get("tokens") is None:
        return None
    return harvest_store_bytes(int(h.tokens), int(cfg.sae.d_in), dtype=str(h.dtype), ctx_len=int(cfg.data.ctx_len),
                               seqs_per_chunk=h.get("seqs_per_chunk"), seqs_per_shard=int(h.seqs_per_shard))


def _run(cfg) -> int:
    """Plan (or compare) from the composed config, print it; returns the exit code."""
    output = str(cfg.output)
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}; valid: {OUTPUTS}")
    cmp = cfg.compare
    grid = {key: list(cmp[key]) for key in _COMPARE_KEYS if cmp[key] is not None}
    if grid:  # a comparison report: one row per combination, exit 0
        results = []
        for values in itertools.product(*grid.values()):
            ov = {key: _COMPARE_KEYS[key](v) for key, v in zip(grid, values, strict=True)}
            if "zero_stage" in ov:  # 0: the torch engine, 1 / 2: DeepSpeed ZeRO
                ov["engine"] = "deepspeed" if ov["zero_stage"] else "torch"
                ov["zero_stage"] = ov["zero_stage"] or 1
                if ov["engine"] == "torch":
                    ov["offload_optimizer"] = False
            results.append(plan_from_cfg(cfg, suggest=False, **ov))
        if output == "json":
            print(json.dumps({"plans": results}))
        else:
            render_compare(results, markdown=output == "markdown")
        return 0
    r = plan_from_cfg(cfg)
    if output == "json":
        print(json.dumps(r))
    else:
        render(r, markdown=output == "markdown")
    if not r["fits"]:
        print(f"sae-plan: {r['message']}", file=sys.stderr)
        return 1
    return 0


def _hydra_entry():
    import hydra

    from sae_dist.plan_config import register_plan_configs

    register_plan_configs()  # the schemas conf/plan.yaml extends

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
    def _app(cfg) -> None:
        code = _run(cfg)
        if code:
            raise SystemExit(code)

    return _app


def main() -> None:
    """Console script `sae-plan`: a Hydra app over conf/plan.yaml (see there for every option).

    Prints the plan (output=table | markdown | json); exits 1 with the refusal on stderr when the
    shape does not fit one GPU's memory. With compare.tp / compare.zero_stage / compare.topk_exchange /
    compare.latent_chunk / compare.batch_tokens lists it prints one row per combination instead (exit 0).
    A wrong key or type fails first with one line naming the key (sae_dist.cli.check_command_line)."""
    from sae_dist.cli import check_command_line, user_errors_first
    from sae_dist.config import upgrade_overrides
    from sae_dist.plan_config import register_plan_configs

    def checks():
        register_plan_configs()
        sys.argv[1:] = upgrade_overrides(sys.argv[1:], warn=lambda m: print(f"sae-plan: {m}", file=sys.stderr))
        check_command_line(sys.argv[1:], config_name="plan")

    user_errors_first(checks)()
    _hydra_entry()()


if __name__ == "__main__":
    main()
