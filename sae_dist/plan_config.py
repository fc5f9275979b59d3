"""The typed configuration of `sae-plan` (the root of conf/plan.yaml): the sae / trainer / parallel /
harvest / data nodes of sae_dist.config, and the planner's own `cluster.*` (from `plan.Cluster`),
`estimate.*` (from `plan.plan`'s keyword defaults), `compare.*`, `topk_exchange` and `output`.
Registered with Hydra's ConfigStore as `schema/plan`; conf/plan.yaml sets only what differs
(`harvest.tokens: null`).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

from sae_dist.config import (
    DataConfig,
    HarvestConfig,
    ParallelConfig,
    TrainerNode,
    copy_fields,
    make_node_class,
    omegaconf_type,
    option,
    register_configs,
)
from sae_dist.plan import OUTPUTS, TOPK_EXCHANGES, Cluster, plan

__all__ = ["PlanConfig", "ClusterConfig", "EstimateConfig", "CompareConfig", "register_plan_configs"]

_CLUSTER_DOCS = {
    "nodes": "nodes of the cluster",
    "gpus_per_node": "GPUs per node",
    "gpu_memory_gib": "memory of one GPU, GiB (H100 80GB: nvidia-smi reports 81559 MiB)",
    "intra_node_gbytes_per_s": "GB/s per GPU per direction inside a node (NVLink 4 through NVSwitch)",
    "inter_node_gbytes_per_s": "GB/s per GPU between nodes (InfiniBand NDR 400 Gb/s, one NIC per GPU)",
    "bf16_tflops": "dense bf16 tensor-core peak (H100 SXM); tf32 495, fp32 (no tensor cores) 67",
    "hbm_gbytes_per_s": "HBM bandwidth (H100 SXM HBM3)",
    "hbm_efficiency": "fraction of the HBM bandwidth memory-bound kernels reach, in (0, 1]",
    "mfu": "fraction of bf16_tflops the fused encoder matmul reaches, in (0, 1]",
    "latency_us": "latency of one ring step of a collective, microseconds",
    "pcie_gbytes_per_s": "host <-> GPU GB/s per GPU (trainer.offload_optimizer only)",
    "host_gbytes_per_s": "host-memory GB/s of one GPU's share of the CPUs running Adam (offload only)",
}

#: estimate.* = these keyword arguments of plan.plan, with their defaults
_ESTIMATE_DOCS = {
    "latent_chunk": "the fused encoder's latent_chunk (the trainer uses encode_topk's default)",
    "candidate_buffer_bytes": "cap of the Triton encoder split candidate buffers (encoder_topk.CANDIDATE_BUFFER_BYTES)",
    "allgather_chunk_bytes": "the all-gather fallback's chunk of gathered values (tp.GATHER_CHUNK_BYTES)",
    "decode_compact": "true (code): each rank decodes only its own winners; false (what-if): every local candidate",
    "decode_scan_slots": "compacted (code): kept entries moved to the front, m slots scanned; full: all w slots",
    "encoder_bwd_drop_zeros": "true (code): the encoder backward drops zero-gradient entries; false (what-if)",
    "bf16_operand_copies": "null: follow trainer.bf16 (bf16 copies of W_enc and x under autocast); true / false to "
                           "force",
    "dead_fraction": "fraction of a rank's latents that are dead, in [0, 1] (the AuxK pass's compute)",
    "topk_value_bytes": "bytes of an exchanged TopK candidate value (the code: fp32)",
    "input_buffers": "fp32 [B/dp, d] batches resident (current + prefetched)",
    "workspace_gib": "CUDA context, NCCL buffers, allocator slack, GiB",
    "zero_bucket_elements": "DeepSpeed reduce_bucket_size (fp32 elements) under ZeRO",
    "heldout_lm_gib": "GiB of the held-out evaluation's LM on each GPU of the first replica, counted when "
                      "trainer.eval_every_steps > 0 (an 8B LM in bf16: 14.9); 0: not counted",
}


def _estimate_node() -> type:
    params = inspect.signature(plan).parameters
    hints = typing.get_type_hints(plan)
    specs = []
    for name, doc in _ESTIMATE_DOCS.items():
        if name == "bf16_operand_copies":  # null here: follow trainer.bf16 (plan() takes the resolved bool)
            specs.append((name, bool | None, option(None, doc)))
        else:
            specs.append((name, omegaconf_type(hints[name]), option(params[name].default, doc)))
    return make_node_class("EstimateConfig", specs,
                           "sae-plan's modelling switches (`estimate.*`): plan.plan's defaults.")


ClusterConfig = make_node_class("ClusterConfig", copy_fields(Cluster, docs=_CLUSTER_DOCS),
                      "sae-plan's cluster shape (`cluster.*`): plan.Cluster's fields and defaults.")
EstimateConfig = _estimate_node()


@dataclass
class CompareConfig:
    """sae-plan's comparison report (`compare.*`): lists print one row per combination instead of the plan."""

    tp: list[int] | None = option(None, "parallel.tp values to compare, e.g. [8,16,32,64]")
    zero_stage: list[int] | None = option(None, "0 = trainer.engine torch, 1 / 2 = deepspeed with that ZeRO stage")
    topk_exchange: list[str] | None = option(None, "topk_exchange values to compare")
    latent_chunk: list[int] | None = option(None, "estimate.latent_chunk values to compare")
    batch_tokens: list[int] | None = option(None, "trainer.batch_tokens values to compare")


@dataclass
class PlanConfig:
    """The root of sae-plan (conf/plan.yaml)."""

    sae: Any = option(None, "")
    trainer: TrainerNode = option(TrainerNode(), "")
    parallel: ParallelConfig = option(ParallelConfig(), "")
    harvest: HarvestConfig = option(HarvestConfig(), "")
    data: DataConfig = option(DataConfig(), "")
    topk_exchange: str = option(inspect.signature(plan).parameters["topk_exchange"].default,
                                f"exact global TopK over the tp ranks: {' | '.join(TOPK_EXCHANGES)}")
    output: str = option(OUTPUTS[0], f"{' | '.join(OUTPUTS)}")
    compare: CompareConfig = option(CompareConfig(), "")
    cluster: ClusterConfig = option(ClusterConfig(), "")
    estimate: EstimateConfig = option(EstimateConfig(), "")


def register_plan_configs() -> None:
    """Register `schema/plan` (and the shared schemas) with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(group="schema", name="plan", node=PlanConfig)


register_plan_configs()
