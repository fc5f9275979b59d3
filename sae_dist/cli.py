"""Console scripts: Hydra apps over one config tree (`conf/`, installed as `sae_dist.conf`).

`sae-harvest`, `sae-train`, `sae-eval` and `sae-pipeline` (harvest -> train -> eval in one run dir).
Every option is a Hydra override; `--help` lists the config groups. The resolved config of every run
is saved by Hydra under `<run_dir>/.hydra/`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_dist import CONF_DIR
from sae_dist.extras import require_extra

#: `hydra/launcher=` choices of conf/hydra/launcher/ that run through submitit (the [slurm] extra)
SUBMITIT_LAUNCHERS = ("slurm", "local")


def check_launcher_extra(argv: list[str]) -> None:
    """MissingExtraError naming the [slurm] extra when `argv` selects a submitit launcher
    (`hydra/launcher=slurm|local`) and hydra-submitit-launcher is not installed (Hydra itself would
    fail later with a bare "Could not find 'hydra/launcher/submitit_slurm'")."""
    for arg in argv:
        name, _, value = arg.partition("=")
        if name.lstrip("+~") == "hydra/launcher" and value in SUBMITIT_LAUNCHERS:
            require_extra("slurm", f"hydra/launcher={value}")


def check_run_dir(argv: list[str]) -> None:
    """NotADirectoryError when `run_dir=PATH` names an existing file (Hydra would fail creating its
    output directory there with a bare "File exists")."""
    for arg in argv:
        name, _, value = arg.partition("=")
        if name.lstrip("+~") == "run_dir" and value and os.path.exists(value) and not os.path.isdir(value):
            raise NotADirectoryError(f"run_dir={value} is an existing file, not a directory: choose another "
                                     "run_dir (every output of the run goes under it)")


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "sae-dist"


def _user_errors_first(fn):
    """Run `fn`; a user error (sae_dist.errors) prints its one-line message and exits with status 2,
    unless tracebacks were asked for (SAE_DIST_DEBUG=1 / HYDRA_FULL_ERROR=1). Other errors propagate."""
    from sae_dist.errors import USER_ERROR_EXIT_CODE, debug_errors, is_user_error, report_user_error

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if debug_errors() or not is_user_error(e):
                raise
            report_user_error(_prog(), e)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapped


def _app(fn):
    # the task runs inside Hydra's job (which would print a traceback before the message): user errors
    # are reported there; checks of the command line run before Hydra starts
    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_user_errors_first(fn))

    @functools.wraps(fn)
    def main(*args, **kwargs):
        def checks():
            check_launcher_extra(sys.argv[1:])
            check_run_dir(sys.argv[1:])

        _user_errors_first(checks)()
        return app(*args, **kwargs)

    return main


def _exit_if_preempted(summary) -> None:
    """Exit with PREEMPTED_EXIT_CODE when the job stopped on SIGTERM (state saved; rerun to resume)."""
    if isinstance(summary, dict) and summary.get("preempted"):
        from sae_dist.preempt import PREEMPTED_EXIT_CODE

        raise SystemExit(PREEMPTED_EXIT_CODE)


def _out_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_device(device: str) -> str:
    """Map the `device` option (cpu | cuda | cuda:N | auto) to a torch device string.

    Raises ValueError for an unknown value or when CUDA is asked for but not available.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun worker
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
        return device
    raise ValueError(f"device={device!r} is not one of cpu, cuda, cuda:N, auto")


def _dist_env() -> tuple[int, int]:
    """(rank, world_size) from the torchrun / slurm environment; (0, 1) when launched plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _load_lm(cfg: DictConfig, device: str):
    from sae_dist.harvest.lm import load_lm

    return load_lm(
        cfg.model.name,
        gguf_file=cfg.model.gguf_file,
        dtype=cfg.model.dtype,
        device=device,
        device_map=cfg.model.device_map,
    )


def _hook_name(cfg: DictConfig, model) -> str:
    from sae_dist.harvest.hooks import default_hook_name, resolve_hook

    name = cfg.hook if cfg.hook is not None else default_hook_name(model)
    resolve_hook(model, name)  # raises with the list of valid names
    return name


def _model_name(cfg: DictConfig) -> str:
    """The model name recorded in store attrs, cfg.json and eval.json."""
    from sae_dist.harvest.lm import model_display_name

    return model_display_name(cfg.model.name, cfg.model.gguf_file)


def _docs(cfg: DictConfig):
    from sae_dist.harvest.text import iter_documents

    return iter_documents(
        cfg.data.dataset,
        split=cfg.data.split,
        text_field=cfg.data.text_field,
        data_files=OmegaConf.to_container(cfg.data, resolve=True)["data_files"],
    )


# ----------------------------------------------------------------------------------------------
# the three stages, callable with a loaded LM so the pipeline loads it once


def run_harvest(cfg: DictConfig, out_dir: Path, lm=None) -> dict[str, Any]:
    """Harvest activations into `cfg.store.path`; returns the harvester's summary dict."""
    from sae_dist.harvest.harvester import harvest

    device = resolve_device(cfg.device)
    rank, world = _dist_env()
    model, tokenizer = lm if lm is not None else _load_lm(cfg, device)
    hook = _hook_name(cfg, model)
    return harvest(
        model=model,
        tokenizer=tokenizer,
        hook=hook,
        docs=_docs(cfg),
        store_path=cfg.store.path,
        tokens=int(cfg.harvest.tokens),
        ctx_len=int(cfg.data.ctx_len),
        batch_size=int(cfg.harvest.batch_size),
        dtype=cfg.harvest.dtype,
        seqs_per_chunk=int(cfg.harvest.seqs_per_chunk),
        seqs_per_shard=int(cfg.harvest.seqs_per_shard),
        rank=rank,
        world_size=world,
        eval_fraction=float(cfg.data.eval_fraction),
        attrs={"model": _model_name(cfg), "dataset": cfg.data.dataset},
        progress=rank == 0,
    )


def sae_config_from(sae: DictConfig, d_in: int):
    """SAEConfig from the `sae` config group: the keys SAEConfig has are its fields, every other key
    is an option of the architecture (`SAEConfig.options`, validated by the architecture's class,
    which names unknown ones). d_in comes from the store."""
    import dataclasses

    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.registry import architecture_class

    node = OmegaConf.to_container(sae, resolve=True)
    fields = {f.name for f in dataclasses.fields(SAEConfig)} - {"d_in", "options"}
    common = {key: node.pop(key) for key in list(node) if key in fields}
    common.setdefault("architecture", "topk")
    options = node
    sae_cfg = SAEConfig(d_in=d_in, **common, options=options)
    from sae_dist.sae.base import parse_options

    cls = architecture_class(sae_cfg.architecture)
    parse_options(cls.Options, options, sae_cfg.architecture)  # fail before any data is read
    return sae_cfg


def run_train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train an SAE on `cfg.store.path`; checkpoints under out_dir/checkpoints, export to out_dir/sae."""
    from sae_dist.store import open_store
    from sae_dist.train.trainer import TrainerConfig, train

    store_attrs = dict(open_store(cfg.store.path).attrs)
    sae_cfg = sae_config_from(cfg.sae, d_in=int(store_attrs["d_model"]))
    t = cfg.trainer
    trainer_cfg = TrainerConfig(
        tokens=int(t.tokens),
        batch_tokens=int(t.batch_tokens),
        lr=None if t.lr is None else float(t.lr),
        adam_betas=tuple(float(b) for b in t.betas),
        adam_eps=float(t.eps),
        warmup_steps=int(t.warmup_steps),
        lr_decay_frac=float(t.lr_decay_frac),
        ema=bool(t.ema),
        ema_decay=float(t.ema_decay),
        grad_clip_norm=None if t.grad_clip_norm is None else float(t.grad_clip_norm),
        checkpoint_every_steps=int(t.checkpoint_every_steps),
        keep_checkpoints=int(t.keep_checkpoints),
        log_every_steps=int(t.log_every_steps),
        bf16=bool(t.bf16),
        shuffle_shards=int(cfg.store.shuffle_shards),
        prefetch=int(cfg.store.prefetch),
        engine=str(t.get("engine", "torch")),
        zero_stage=int(t.get("zero_stage", 1)),
        offload_optimizer=bool(t.get("offload_optimizer", False)),
        deterministic=bool(t.deterministic),
    )
    from sae_dist.sweep import sweep_wandb_group

    wandb_cfg = OmegaConf.to_container(cfg.wandb, resolve=True)
    wandb_cfg["group"] = sweep_wandb_group(cfg)  # all points of a sweep share one group
    wandb_cfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    return train(
        store_path=cfg.store.path,
        out_dir=str(out_dir),
        sae_cfg=sae_cfg,
        trainer_cfg=trainer_cfg,
        device=resolve_device(cfg.device),
        seed=int(cfg.seed),
        hook_name=store_attrs.get("hook"),
        model_name=store_attrs.get("model"),
        wandb_cfg=wandb_cfg,
        tp=int(cfg.parallel.tp),
    )


def _lm_family(cfg: DictConfig, device: str) -> list[dict]:
    """The loaded members of `eval.lm_family` (equivalent compute, Gao et al. 2024 sec. 4.1): each entry
    {name, gguf_file?, compute | params + train_tokens} loaded like `model` (same dtype and device)."""
    from sae_dist.harvest.lm import load_lm, model_display_name

    members = []
    for i, entry in enumerate(cfg.eval.get("lm_family") or []):
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else dict(entry)
        if not entry.get("name"):
            raise ValueError(f"eval.lm_family[{i}] has no `name` (an HF model name or local directory): {entry}")
        model, _ = load_lm(entry["name"], gguf_file=entry.get("gguf_file"), dtype=cfg.model.dtype, device=device)
        members.append({**entry, "name": model_display_name(entry["name"], entry.get("gguf_file")), "model": model})
    return members


def _progressive_k_factors(cfg) -> list[float] | None:
    """eval.progressive (sec. 5.3 progressive recovery): the k'/k factors, or None when it is off."""
    if not cfg.eval.get("progressive", False):
        return None
    from sae_dist.eval.progressive import DEFAULT_K_FACTORS

    return list(cfg.eval.get("progressive_k_factors", DEFAULT_K_FACTORS))  # validated by evaluate


def run_eval(cfg: DictConfig, out_dir: Path, lm=None, sae_path: str | None = None) -> dict[str, Any]:
    """Evaluate the SAE at `sae_path` (default cfg.sae_path) on held-out text; writes out_dir/eval.json."""
    from sae_dist.eval.evaluate import evaluate, write_eval_json

    device = resolve_device(cfg.device)
    model, tokenizer = lm if lm is not None else _load_lm(cfg, device)
    sae_path = sae_path or cfg.sae_path
    cfg_json = Path(sae_path) / "cfg.json"
    if not cfg_json.exists():
        raise FileNotFoundError(f"no exported SAE at sae_path={sae_path!r} ({cfg_json} is missing); "
                                "train one with sae-train or point sae_path= at an export directory")
    from sae_dist.sae.formats import read_sae_cfg

    # read_sae_cfg: ours or a SAELens save (which nests hook_name under "metadata")
    hook = cfg.hook if cfg.hook is not None else read_sae_cfg(sae_path).get("hook_name")
    if hook is None:
        hook = _hook_name(cfg, model)
    result = evaluate(
        sae_path=str(sae_path),
        model=model,
        tokenizer=tokenizer,
        hook=hook,
        docs=_docs(cfg),
        ctx_len=int(cfg.data.ctx_len),
        eval_tokens=int(cfg.eval.eval_tokens),
        eval_fraction=float(cfg.data.eval_fraction),
        batch_size=int(cfg.eval.batch_size),
        device=device,
        model_name=_model_name(cfg),
        # metrics of Gao et al. 2024 sec. 4.3-5.1 (defaults = conf/eval/default.yaml, for older configs)
        probes=bool(cfg.eval.get("probes", True)),
        probe_min_count=int(cfg.eval.get("probe_min_count", 20)),
        ablation_latents=int(cfg.eval.get("ablation_latents", 16)),
        ablation_occurrences=int(cfg.eval.get("ablation_occurrences", 4)),
        ablation_positions=int(cfg.eval.get("ablation_positions", 16)),
        ablation_seed=int(cfg.eval.get("ablation_seed", 0)),
        shrinkage_tokens=int(cfg.eval.get("shrinkage_tokens", 2048)),
        shrinkage_support=str(cfg.eval.get("shrinkage_support", "active")),
        dense_threshold=float(cfg.eval.get("dense_threshold", 0.1)),
        density_bins=int(cfg.eval.get("density_bins", 32)),
        n2g_latents=int(cfg.eval.get("n2g_latents", 64)),
        n2g_max_n=int(cfg.eval.get("n2g_max_n", 4)),
        n2g_min_precision=float(cfg.eval.get("n2g_min_precision", 0.5)),
        lm_family=_lm_family(cfg, device),
        model_compute=None if cfg.eval.get("model_compute") is None else float(cfg.eval.model_compute),
        progressive_k_factors=_progressive_k_factors(cfg),
    )
    write_eval_json(result, out_dir / "eval.json")
    return result


# ----------------------------------------------------------------------------------------------
# console entry points


@_app
def harvest_main(cfg: DictConfig) -> None:
    """sae-harvest: LM + text -> activation store (zarr v3)."""
    summary = run_harvest(cfg, _out_dir())
    print(json.dumps(summary, indent=2, default=str))
    _exit_if_preempted(summary)


@_app
def train_main(cfg: DictConfig) -> None:
    """sae-train: activation store -> SAE checkpoints + export (sae/cfg.json, sae/sae_weights.safetensors);
    with `eval.after_train=true` also eval.json (global rank 0 evaluates after training).
    Under `-m` (a sweep) a failing point is recorded in its job_status.json and the sweep goes on;
    `sae_dist.sweep.SweepReport` reports the failures at the end.

    The same command runs under torchrun / slurm: `parallel.tp=P` shards latents over P ranks and dp =
    world size / P (sae_dist.parallel). Only global rank 0 prints the summary.
    """
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    from sae_dist.sweep import run_point

    def point(out: Path) -> dict:
        # record: under torchrun the failing rank's traceback goes to its error file, which torchrun's
        # failure report prints next to the rank's number
        summary = record(run_train)(cfg, out)
        if _dist_env()[0] == 0:
            if cfg.eval.get("after_train", False) and summary.get("sae_dir"):
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()  # the evaluation runs on global rank 0 alone
                summary["eval"] = run_eval(cfg, out, sae_path=summary["sae_dir"])
            print(json.dumps(summary, indent=2, default=str))
        return summary

    try:
        out = _out_dir()
        # under -m a failing point is recorded (job_status.json) and the sweep goes on (sae_dist.sweep)
        summary = run_point(lambda: point(out), out, is_main=_dist_env()[0] == 0)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    _exit_if_preempted(summary)


@_app
def eval_main(cfg: DictConfig) -> None:
    """sae-eval: SAE + LM + text -> eval.json."""
    out = _out_dir()
    result = run_eval(cfg, out)
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {out / 'eval.json'}")


@_app
def pipeline_main(cfg: DictConfig) -> None:
    """sae-pipeline: harvest -> train -> eval in one run directory, then a summary table."""
    out = _out_dir()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    lm = _load_lm(cfg, device)
    harvest_summary = run_harvest(cfg, out, lm=lm)
    _exit_if_preempted(harvest_summary)
    train_summary = run_train(cfg, out)
    _exit_if_preempted(train_summary)
    result = run_eval(cfg, out, lm=lm, sae_path=str(out / "sae"))
    wall = time.perf_counter() - t0
    print_summary(out, harvest_summary, train_summary, result, wall)


def print_summary(out: Path, harvest_summary: dict, train_summary: dict, result: dict, wall_s: float) -> None:
    """Print the pipeline's summary table (rich) and write it to out/summary.json."""
    from rich.console import Console
    from rich.table import Table

    rows = [
        ("tokens harvested", _fmt(harvest_summary.get("n_tokens"), ",")),
        ("harvest tokens/s", _fmt(harvest_summary.get("tokens_per_s"), ".0f")),
        ("tokens trained", _fmt(result.get("tokens_trained"), ",")),
        ("train tokens/s", _fmt(train_summary.get("tokens_per_s"), ".0f")),
        ("n_latents / k", f"{result.get('n_latents')} / {result.get('k')}"),
        ("fvu", _fmt(result.get("fvu"), ".4f")),
        ("normalized mse", _fmt(result.get("normalized_mse"), ".4f")),
        ("L0", _fmt(result.get("l0"), ".1f")),
        ("dead fraction", f"{_fmt(result.get('dead_fraction'), '.4f')} ({result.get('dead_fraction_window', '')})"),
        ("CE clean / SAE / zero", f"{_fmt(result.get('ce_loss_clean'), '.4f')} / "
         f"{_fmt(result.get('ce_loss_sae'), '.4f')} / {_fmt(result.get('ce_loss_zero_ablation'), '.4f')}"),
        ("CE loss score", _fmt(result.get("ce_loss_score"), ".4f")),
        ("KL(clean || SAE)", _fmt(result.get("kl_div"), ".4f")),
        ("probe loss / baseline",
         f"{_fmt(result.get('probe_loss'), '.4f')} / {_fmt(result.get('probe_baseline'), '.4f')}"),
        ("N2G precision / recall",
         f"{_fmt(result.get('n2g_precision'), '.3f')} / {_fmt(result.get('n2g_recall'), '.3f')}"),
        ("ablation sparsity", _fmt(result.get("ablation_sparsity_fraction"), ".4f")),
        ("shrinkage ratio", _fmt(result.get("shrinkage_ratio"), ".4f")),
        ("dense fraction", _fmt(result.get("dense_fraction"), ".4f")),
        ("eval tokens", _fmt(result.get("eval_tokens"), ",")),
        ("wall time", f"{wall_s:.0f} s"),
    ]
    table = Table(title=f"sae-dist pipeline: {out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    (out / "summary.json").write_text(json.dumps(dict(rows), indent=2))


def _fmt(v, spec: str) -> str:
    return "?" if v is None else format(v, spec)
