"""DeepSpeed ZeRO-1/2 optimisation engine (`trainer.engine=deepspeed`), a drop-in for `TorchEngine`.

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
section 5.1/5.2) shards over the data-parallel (dp) group: stage 1 the Adam state (and the fp32 master
weights), stage 2 also the reduced gradients. It runs over OUR dp group only: the latents are already
sharded over tp by `parallelize_sae`, and DeepSpeed is told so through an `mpu` object (`MeshMPU`):
data-parallel group = the mesh's "dp" dim, model-parallel group = the mesh's "tp" dim. Stage 3 (which
shards the parameters themselves over dp and gathers them in every forward) is refused: it would
re-partition the latent shards that tp already owns and the training step reads `W_dec` / `W_enc`
directly outside a DeepSpeed forward.

One `step(loss)` does exactly what `TorchEngine.step` does, with the same numbers:
1. backward through `deepspeed_engine.backward`; a tensor hook on `W_dec` removes from each rank's
   LOCAL gradient the component parallel to each decoder row (g_i -= (g_i . w_i) w_i, Gao et al.
   2024 section 2.4.1). The projection is linear in g and every dp rank holds the same rows, so
   projecting before DeepSpeed's reduction equals projecting the reduced gradient. Tensor hooks run
   before autograd accumulates into `.grad`, i.e. before ZeRO's post-accumulate-grad hooks that
   reduce (stage 1 at the end of backward, stage 2 bucketed during backward).
2. DeepSpeed SUMS the gradients over dp (`gradient_allreduce_op: "sum"`): the per-rank losses of the
   sharded model are shares of the global loss, so the dp sum is the single-process gradient (the
   same reduction `sync_grads_over_dp` does for the torch engine, which is not called here).
3. optional clipping to `tcfg.grad_clip_norm` by DeepSpeed (`gradient_clipping`): the norm is
   summed over the dp partitions and, for tp > 1, over the tp group with only the latent-sharded
   parameters counted on every tp rank and the replicated `b_dec` counted once (the shards are marked
   `tensor_model_parallel`, DeepSpeed's `is_model_parallel_parameter`): the same global norm as
   `sae_dist.train.engine.clip_grad_norm_` (DeepSpeed accumulates it in float64; measured relative difference
   to an independent fp64 norm ~1e-7). Coefficient max_norm / (norm + 1e-6), capped at 1, as torch.
4. the client `torch.optim.Adam` (`sae_dist.train.engine.make_optimizer`: betas, eps 6.25e-10, no
   weight decay, fused) steps on this rank's fp32 ZeRO partition; DeepSpeed all-gathers the updated
   weights over dp into the module's parameters.
5. `model.normalize_decoder_()` renormalises the W_dec rows of the module's parameters.

ZeRO keeps fp32 master partitions separate from the module's parameters (even in fp32 mode), so any
in-place change of the module's weights between steps (the renormalisation of step 5, b_dec
initialisation, a checkpoint load) would be overwritten by the next optimizer step. `step()`
therefore first copies the module's weights into the master partitions (`refresh_fp32_params`):
between steps the module's parameters are the source of truth, as with `TorchEngine`. They must be
changed in place (`copy_`, `load_state_dict`, DCP load), never rebound (`p.data = ...`): DeepSpeed's
flat buffers back them.

Precision: DeepSpeed runs in fp32 mode (no `fp16` / `bf16` section): parameters, gradients, master
weights and Adam state are fp32; the trainer's bf16 autocast on CUDA wraps the forward as it does for
the torch engine. Parameters must be float32 (`sae.dtype=float32`).

Optimizer-state CPU offload (`offload_optimizer=True` -> `zero_optimization.offload_optimizer.device
= "cpu"`): the fp32 master partition, its gradient and the Adam state live in host memory and the
client torch Adam steps there (`zero_force_ds_cpu_optimizer: false`). DeepSpeedCPUAdam (a compiled
op, faster on many-core hosts) is deliberately not used: torch Adam keeps the results identical to the
torch engine and needs no op build, so the option also works on CPU-only hosts (where it is a no-op
for memory, the state being on the host already).

Devices and process groups:
- DeepSpeed's accelerator must match the parameters' device. When DeepSpeed is not yet imported and
  `DS_ACCELERATOR` is unset, this module sets `DS_ACCELERATOR` to the parameters' device type ("cpu"
  or "cuda") before importing it, so a CPU run on a GPU host stays on the CPU (gloo) and a CUDA run
  uses NCCL. If DeepSpeed was already imported with another accelerator, the constructor raises.
- DeepSpeed needs `LOCAL_RANK` (torchrun sets it); when absent it is set to the parameters' CUDA index
  (or 0 on CPU).
- Distributed runs need the process group and mesh of `init_parallel`. A single process (`ctx.mesh`
  is None) still needs a process group for DeepSpeed: if torch.distributed is not initialised the
  engine creates a 1-rank group (gloo, plus NCCL for CUDA tensors) over an in-memory HashStore (no
  port). It lives until `close()`: call it when training ends, or a later `init_parallel` in the same
  process (a second run, a Hydra multirun job) finds an initialised group and builds a 1 x 1 mesh.
- On the CPU accelerator the engine marks DeepSpeed's shared-memory comm op unavailable (see
  `_import_deepspeed`): otherwise DeepSpeed JIT-compiles it (~30 s, a C++ toolchain) for nothing.

Collectives: DeepSpeed's reductions and all-gathers are synchronous here (`overlap_comm: false`).
`full_optimizer_state()` all-reduces each tensor over dp (DeepSpeed's `safe_get_full_optimizer_state`), so
every dp rank must call it, in the same order. `optimizer_state()` and `load_optimizer_state` are local
(except on CUDA with the optimizer offloaded, below).

Checkpoints: like `TorchEngine`'s, `optimizer_state()` returns the live Adam state, no copies: each moment
is a view into this rank's ZeRO partition, of the parameter's shape at dp = 1 and a
`sae_dist.parallel.state.RankPart` (the rank's contiguous range of the flattened parameter) at dp > 1,
which the checkpoint saves and loads in place as boxes at their global offsets. No rank gathers a
moment, so a checkpoint needs no memory beyond the step's, and it loads at any mesh or engine. The one
exception: with `offload_optimizer` on CUDA the partition is in host memory, and host tensors inside
DTensors of the CUDA mesh have not been tried on a GPU, so there `optimizer_state()` is
`full_optimizer_state()`: gathered copies on the GPU, all at once (8 bytes per local parameter at every
checkpoint save and resume; `sae_dist.plan` counts it as checkpoint_peak_bytes), collective over dp.
After loading a checkpoint into what `optimizer_state()` returned, hand it back with
`load_optimizer_state(state)`: it sets the step count and copies what is not already in place (a no-op
for the torch engine, so a trainer can always do it).

Tests: tests/integration/train/test_deepspeed_engine_gloo.py (single process and dp x tp meshes against the torch
engine, optimizer-state round trip, checkpoints in pieces across meshes and engines),
tests/unit/train/test_deepspeed_engine.py (argument checks).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from sae_dist.extras import require_extra
from sae_dist.parallel.mesh import ParallelContext
from sae_dist.parallel.state import RankPart
from sae_dist.train.engine import make_optimizer

__all__ = ["DeepSpeedEngine", "MeshMPU", "ZERO_STAGES"]

#: ZeRO stages this engine supports (1: optimizer state sharded over dp, 2: + gradients).
ZERO_STAGES = (1, 2)

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce / all-gather bucket size (elements)


class MeshMPU:
    """DeepSpeed's "model parallelism unit" for our dp x tp mesh (the object `deepspeed.initialize(
    mpu=...)` queries; Megatron-LM's `mpu` API that DeepSpeed 0.19 reads in `utils/groups.py`,
    `runtime/engine.py` and `runtime/zero/stage_1_and_2.py`).

    Data parallel = the mesh's "dp" dim: a real process group even when dp == 1 (DeviceMesh keeps a
    1-rank group per rank), so DeepSpeed never falls back to the world group; the (1-rank) world
    group in a single process (build the MPU after torch.distributed is initialised). Model (tensor)
    parallel = the mesh's "tp" dim (None when tp == 1, which DeepSpeed treats as "no model
    parallelism"). No pipeline or sequence parallelism.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        if ctx.mesh is not None:
            self._dp_group = ctx.mesh.get_group("dp")
        else:
            if dist.is_initialized() and dist.get_world_size() != 1:
                raise ValueError(
                    f"single-process ParallelContext (mesh None) but torch.distributed has world size "
                    f"{dist.get_world_size()}: build the context with sae_dist.parallel.init_parallel"
                )
            self._dp_group = dist.group.WORLD  # the 1-rank world group
        self._tp_group = ctx.tp_group

    # data parallel
    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        if self._dp_group is None:
            return [self.ctx.rank]
        return dist.get_process_group_ranks(self._dp_group)

    # model (tensor) parallel: the latent shards
    def get_model_parallel_group(self):
        return self._tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 of this rank's tp group (tp ranks are consecutive global ranks)."""
        return self.ctx.rank - self.ctx.tp_rank

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class _LossPassthrough(torch.nn.Module):
    """The module handed to DeepSpeed: owns the SAE (so DeepSpeed manages its parameters) and whose
    forward is the identity on an already computed loss. Calling the DeepSpeed engine on the loss
    runs DeepSpeed's per-step forward bookkeeping (backward-state reset, backward prologue hooks) with
    the public API although the SAE's training forward (`training_step_losses`) ran outside it."""

    def __init__(self, sae: torch.nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _project_out_rows(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g - (g_i . w_i) w_i for every row i (the `TopKSAE.remove_parallel_grads_` projection, Gao et
    al. 2024 section 2.4.1), out of place: g, w [n, d] -> [n, d] in g's dtype."""
    w = w.detach().to(g.dtype)
    coef = torch.einsum("nd,nd->n", g, w)
    return g.addcmul(coef.unsqueeze(-1), w, value=-1.0)


def _import_deepspeed(device: torch.device):
    """Import deepspeed with its accelerator matching `device` (module docstring: Devices)."""
    want = "cuda" if device.type == "cuda" else "cpu"
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"trainer.engine=deepspeed supports cpu and cuda parameters, got {device}")
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", want)
    require_extra("deepspeed", "trainer.engine=deepspeed")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    have = get_accelerator().device_name()
    if have != want:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {have!r} but the SAE parameters are on {device}: set "
            f"DS_ACCELERATOR={want} in the environment before deepspeed is first imported "
            f"(it was imported earlier in this process, or "
            f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r})"
        )
    if want == "cpu":
        # DeepSpeed's CPU communication backend JIT-compiles its shared-memory all-reduce op when it
        # first wraps the process group (~30 s and a C++ toolchain on a fresh host); that op only
        # serves DeepSpeed's inference all-reduce under its own launcher (LOCAL_SIZE), never ZeRO
        # training, so it is marked unavailable before the wrapper exists (gloo does every collective).
        import deepspeed.comm.comm as ds_comm

        if ds_comm.cdb is None:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _check_engine_inputs(params: list, zero_stage) -> torch.device:
    """The one device of the SAE parameters [(name, param)]; ValueError for an unsupported ZeRO stage,
    non-float32 parameters or parameters on several devices."""
    if isinstance(zero_stage, bool) or zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"trainer.zero_stage={zero_stage!r} is not supported by trainer.engine=deepspeed: use 1 "
            "(Adam state sharded over dp) or 2 (+ gradients). ZeRO stage 3 would also shard the "
            "parameters over dp, which conflicts with the latent sharding over tp (parallel.tp) that "
            "already partitions W_enc / b_enc / W_dec; stage 0 is plain data parallelism: use "
            "trainer.engine=torch"
        )
    bad = [f"{n}: {p.dtype}" for n, p in params if p.dtype != torch.float32]
    if bad:
        raise ValueError(
            f"trainer.engine=deepspeed runs DeepSpeed in fp32 mode and needs float32 parameters, got "
            f"{', '.join(bad)}: set sae.dtype=float32 (bf16 compute comes from trainer.bf16 autocast)"
        )
    devices = {p.device for _, p in params}
    if len(devices) != 1:
        raise ValueError(f"all SAE parameters must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _set_local_rank(device: torch.device) -> None:
    """LOCAL_RANK for DeepSpeed (which places the model on cuda:LOCAL_RANK): set from `device` when unset;
    ValueError when it names another GPU than the parameters'."""
    if "LOCAL_RANK" not in os.environ:
        idx = device.index if device.type == "cuda" and device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else 0)
        os.environ["LOCAL_RANK"] = str(idx)
    if device.type == "cuda" and int(os.environ["LOCAL_RANK"]) != (
            device.index if device.index is not None else torch.cuda.current_device()):
        raise ValueError(
            f"DeepSpeed places the model on cuda:{os.environ['LOCAL_RANK']} (LOCAL_RANK) but the SAE "
            f"parameters are on {device}: put the SAE on cuda:LOCAL_RANK (init_parallel does)"
        )


def _deepspeed_config(zero_stage: int, offload_optimizer: bool, clip: float | None, numel: int,
                      device: torch.device) -> dict:
    """The DeepSpeed config of `DeepSpeedEngine` (module docstring): ZeRO `zero_stage` with synchronous
    reductions, DeepSpeed's default bucket (5e8 elements, a 2 GB fp32 buffer allocated every step) capped
    at this rank's parameter count `numel` (even: DeepSpeed's all-gather alignment), gradient SUM over dp,
    DeepSpeed's clipping at `clip` (None: off), optional optimizer-state CPU offload."""
    bucket = int(min(_DEFAULT_BUCKET, numel + numel % 2))
    zero = {
        "stage": zero_stage,
        "overlap_comm": False,         # every reduction / gather synchronous
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": 1,   # batching is the trainer's; DeepSpeed sees one loss
        "gradient_accumulation_steps": 1,
        "gradient_allreduce_op": "sum",        # per-rank losses are shares of the global loss
        "gradient_clipping": float(clip) if clip is not None else 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # torch Adam on the offloaded partition
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2 over the dp group with the interface of `TorchEngine` (module docstring).

    Args:
      model: an SAE, whole or a latent shard under `parallelize_sae` (float32 parameters W_enc, b_enc,
        W_dec, b_dec on one device; `normalize_decoder_()`). Its parameters become views into
        DeepSpeed's flat buffers; keep using the module as before (forward, export, checkpoints),
        changing weights only in place.
      lr: initial learning rate (`set_lr` changes it).
      tcfg: TrainerConfig (adam_betas, adam_eps, grad_clip_norm).
      ctx: the ParallelContext of this process (`init_parallel`); None = single process on the
        parameters' device.
      zero_stage: 1 (Adam state + fp32 master sharded over dp) or 2 (+ gradients).
      offload_optimizer: keep the fp32 master partition and Adam state in CPU memory (torch Adam
        steps there).
    Raises ValueError: zero_stage not in (1, 2) (3 would shard the parameters over dp, which
      conflicts with the latent sharding), non-float32 parameters, parameters on several devices, or a
      tp > 1 model whose replicated `b_dec` is missing.
    Raises RuntimeError: DeepSpeed's accelerator does not match the parameters' device.
    """

    def __init__(self, model: torch.nn.Module, lr: float, tcfg, ctx: ParallelContext | None = None,
                 zero_stage: int = 1, offload_optimizer: bool = False):
        params = list(model.named_parameters())
        device = _check_engine_inputs(params, zero_stage)
        if ctx is None:
            ctx = ParallelContext(device=device)
        self.model = model
        self.tcfg = tcfg
        self.ctx = ctx
        self.zero_stage = int(zero_stage)
        self.offload_optimizer = bool(offload_optimizer)
        self._names = [n for n, _ in params]
        self._params = dict(params)
        self._live: dict[tuple[str, str], object] = {}  # the moments the last optimizer_state() returned

        deepspeed = _import_deepspeed(device)
        from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

        self._get_state = safe_get_full_optimizer_state
        self._set_state = safe_set_full_optimizer_state

        _set_local_rank(device)
        self._own_group = False
        if not dist.is_initialized():
            if ctx.mesh is not None:
                raise ValueError("ctx has a device mesh but torch.distributed is not initialised")
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True

        if ctx.tp > 1:
            # latent shards count on every tp rank in the global grad norm, replicated b_dec once
            if "b_dec" not in self._params:
                raise ValueError("a tp > 1 model must have the replicated parameter b_dec (parallelize_sae)")
            for n, p in params:
                p.tensor_model_parallel = n != "b_dec"

        config = _deepspeed_config(self.zero_stage, self.offload_optimizer, tcfg.grad_clip_norm,
                                   sum(p.numel() for _, p in params), device)
        self._mpu = MeshMPU(ctx)
        self._w_dec_hook = None
        if model.unit_norm_decoder:  # e.g. not for ReLU with decoder-norm-weighted L1
            self._w_dec_hook = model.W_dec.register_hook(lambda g: _project_out_rows(g, model.W_dec))
        try:
            optimizer = make_optimizer(model, lr, tcfg)
            self._wrapper = _LossPassthrough(model)
            self.ds_engine, self.zero_optimizer, _, _ = deepspeed.initialize(
                model=self._wrapper, optimizer=optimizer, mpu=self._mpu, config=config)
            moved = [n for n, p in model.named_parameters() if p.device != device]
            if moved:
                raise RuntimeError(f"DeepSpeed moved the SAE parameters {moved} off {device}")
            self._init_adam_state()
        except BaseException:
            if self._w_dec_hook is not None:
                self._w_dec_hook.remove()
            if self._own_group:
                dist.destroy_process_group()
            raise

    # ------------------------------------------------------------------ internals
    @property
    def _adam(self) -> torch.optim.Optimizer:
        """The client torch Adam inside the ZeRO optimizer (its params: the fp32 master partitions)."""
        return self.zero_optimizer.optimizer

    def _flat_partitions(self) -> list[torch.Tensor]:
        return list(self.zero_optimizer.single_partition_of_fp32_groups)

    @torch.no_grad()
    def _init_adam_state(self) -> None:
        """Create the Adam state torch would create lazily at the first step (zeros, step 0 as a
        float32 0-d tensor on the partition's device, as fused Adam keeps it) and link it to the
        parameters' fragments, so optimizer_state()/load_optimizer_state() work before the first step
        (a resumed run loads the state before stepping)."""
        for flat in self._flat_partitions():
            st = self._adam.state[flat]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=flat.device)
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        link = getattr(self.zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is None:
            raise RuntimeError(
                f"this DeepSpeed version ({sys.modules['deepspeed'].__version__}) lacks "
                "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state (written against 0.19)"
            )
        link()

    def _step_tensor(self) -> torch.Tensor:
        """Adam's step count (0-d float32); one per flat partition, all equal (one param group)."""
        return self._adam.state[self._flat_partitions()[0]]["step"]

    # ------------------------------------------------------------------ TorchEngine interface
    def set_lr(self, lr: float) -> None:
        """Learning rate of the next step(s)."""
        for g in self._adam.param_groups:
            g["lr"] = lr

    def step(self, loss: torch.Tensor) -> None:
        """One optimisation step from this rank's loss share (0-d, requires grad): master weights
        refreshed from the module, backward with the W_dec projection hook, dp gradient sum, optional
        clipping, Adam on this rank's partition, dp all-gather of the weights, W_dec renormalisation.
        Collective over dp (and tp for the grad norm)."""
        self.zero_optimizer.refresh_fp32_params()
        loss = self.ds_engine(loss)  # DeepSpeed's forward bookkeeping; identity on the loss
        self.ds_engine.backward(loss)
        self.ds_engine.step()
        self.model.normalize_decoder_()

    def optimizer_state(self) -> dict[str, dict]:
        """{param name: {"exp_avg", "exp_avg_sq": this rank's fp32 Adam moments, live, "step": a 0-d float32
        copy}}: at dp = 1 views shaped like the parameter (its local tp shard), at dp > 1 `RankPart`s (this
        rank's range of it in its ZeRO partition). Local, no copies; on CUDA with offload_optimizer the
        gathered copies of `full_optimizer_state` instead (module docstring, "Checkpoints")."""
        if self.offload_optimizer and self.ctx.device.type == "cuda":
            return self.full_optimizer_state()
        step = self._step_tensor()
        out = {name: {key: self._live_moment(self._params[name], key) for key in _ADAM_KEYS} for name in self._names}
        self._live = {(n, k): st[k] for n, st in out.items() for k in _ADAM_KEYS}
        for name, st in out.items():
            st["step"] = step.detach().clone().to(self._params[name].device)
        return out

    def _live_moment(self, p: torch.nn.Parameter, key: str):
        """Adam moment `key` of parameter `p` in this rank's partition: a view of p's shape (dp = 1) or a
        RankPart (dp > 1; empty when the partition holds none of p)."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            flat, start = torch.empty(0, dtype=torch.float32, device=self._flat_partitions()[0].device), 0
        else:
            flat, start = mapping.get_hp_fragment(key), mapping.lp_fragment_address.start
        if self.ctx.dp == 1:
            if flat.numel() != p.numel():
                raise RuntimeError(f"DeepSpeed's partition holds {flat.numel()} of the {p.numel()} elements of a "
                                   "parameter at dp = 1")
            return flat.view(p.shape)
        return RankPart(flat, start, tuple(p.shape))

    def full_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {"exp_avg", "exp_avg_sq": fp32 tensors shaped like the parameter on this rank
        (the local tp shard), "step": 0-d float32}} gathered from the dp partitions (new tensors, not
        views: write changes back with load_optimizer_state). Collective over dp."""
        out = {}
        step = self._step_tensor()
        for name in self._names:
            p = self._params[name]
            st = {}
            for key in _ADAM_KEYS:
                t = self._get_state(p, key)
                if t is None:
                    raise RuntimeError(
                        f"DeepSpeed holds no optimizer state for {name} (not a ZeRO-1/2 parameter)")
                st[key] = t.to(p.device)
            st["step"] = step.detach().clone().to(p.device)
            out[name] = st
        return out

    @torch.no_grad()
    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set the Adam state from `state` (layout of full_optimizer_state(): every rank passes its own
        local-shard tensors, each rank keeps its dp partition of them; moments that are the live ones the
        last optimizer_state() returned are in place already). Raises KeyError for an unknown parameter
        name, ValueError for a wrong shape, a RankPart this engine did not return, or different "step"
        values (ZeRO keeps one step count for the whole flat partition)."""
        steps = set()
        for name, st in state.items():
            if name not in self._params:
                raise KeyError(f"optimizer state for unknown parameter {name!r}; have {self._names}")
            p = self._params[name]
            for key in _ADAM_KEYS:
                if key not in st or self._live.get((name, key)) is st[key]:
                    continue
                v = st[key]
                if isinstance(v, RankPart):
                    raise ValueError(f"optimizer state {name}.{key} is a RankPart this engine's last "
                                     "optimizer_state() did not return; pass whole local tensors")
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{key} has shape {tuple(v.shape)}, "
                                     f"parameter has {tuple(p.shape)}")
                self._set_state(p, v.to(p.device, torch.float32), key)
            if "step" in st:
                steps.add(float(st["step"]))
        if len(steps) > 1:
            raise ValueError(f"optimizer state has different step counts {sorted(steps)}; ZeRO keeps one")
        if steps:
            (s,) = steps
            for f in self._flat_partitions():
                self._adam.state[f]["step"].fill_(s)

    def close(self) -> None:
        """Remove the W_dec hook and DeepSpeed's gradient hooks, and destroy the 1-rank process group
        if this engine created it. The engine is unusable afterwards."""
        if self._w_dec_hook is not None:
            self._w_dec_hook.remove()
        destroy = getattr(self.ds_engine, "destroy", None)
        if destroy is not None:
            destroy()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
