"""Console scripts: Hydra apps over one config tree (`conf/`, installed as `sae_dist.conf`).

`sae-harvest`, `sae-train`, `sae-eval` and `sae-pipeline` (harvest -> train -> eval in one run dir).
Every option is a Hydra override; `--help` lists the config groups, `--help-config` every option with
its default and doc (the typed configuration of sae_dist.config, the one source of defaults). A wrong
key, type or value fails before any work starts with one line naming the key. The resolved config of
every run is saved by Hydra under `<run_dir>/.hydra/`.
"""

from __future__ import annotations

import dataclasses
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


def user_errors_first(fn):
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


#: prints every option with its default and doc (sae_dist.config.describe), then exits
HELP_CONFIG_FLAG = "--help-config"


def _hydra_args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _composed(overrides: list[str], config_name: str = "config"):
    """The config `config_name` composed with `overrides` (Hydra's compose API, as the apps do)."""
    from hydra import compose, initialize_config_dir

    from sae_dist.config import register_configs

    register_configs()  # the schemas conf/ extends (idempotent)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _override_sets(overrides: list[str]) -> list[list[str]]:
    """The override lists a (multirun) command line stands for, linear in its sweep values: the first
    value of every sweep, and each other value of each sweep with the first of the others."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not any(o.is_sweep_override() for o in parsed):
        return [overrides]

    def line(o, value):
        return f"{o.get_key_element()}={value}"

    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else None for o in parsed]
    base = [line(o, v[0]) if v else o.input_line for o, v in zip(parsed, values, strict=True)]
    sets = [base]
    for i, (o, v) in enumerate(zip(parsed, values, strict=True)):
        for value in (v or [])[1:]:
            sets.append([*base[:i], line(o, value), *base[i + 1:]])
    return sets


def composition_message(e: BaseException) -> str:
    """One line for a Hydra composition error: `key: what is wrong` when OmegaConf names the key."""
    from omegaconf.errors import OmegaConfBaseException

    from sae_dist.config import omegaconf_message

    cause = e
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            msg = omegaconf_message(cause)
            if "not in struct" in msg or "not in" in msg and "Key '" in msg:
                msg += " (an unknown key: see --help-config for the valid ones)"
            return msg
        cause = cause.__cause__ or cause.__context__
    return " ".join(str(e).split("\n")[0:2]).strip()


def check_command_line(argv: list[str], config_name: str = "config") -> None:
    """ValueError naming the key when the config composed from `argv`'s overrides has a wrong key, type
    or value (every node converted to its object, sae_dist.config.check_config), before Hydra starts the
    job. Under -m every value of every sweep is composed (keys and types); the values are checked by each
    point (a failing point is recorded and the sweep goes on). Skipped for --help / --hydra-help / --info /
    shell completion and another config directory."""
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sae_dist.config import check_config

    try:
        args = _hydra_args(argv)
    except SystemExit:  # Hydra's own parser reports it
        return
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir
            or args.config_path or (args.config_name not in (None, config_name))):
        return
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        sets = _override_sets(overrides)
    except HydraException:
        return  # Hydra reports its syntax errors itself
    for over in sets:
        try:
            cfg = _composed(over, config_name)
        except (ConfigCompositionException, OmegaConfBaseException) as e:
            raise ValueError(composition_message(e)) from e
        # the values of a sweep (-m) are checked by each point, whose failure is recorded while the sweep
        # goes on (sae_dist.sweep); the AppConfig apps only (sae-plan's root is conf/plan.yaml)
        if not args.multirun and config_name == "config":
            check_config(cfg)


def print_help_config(argv: list[str], config_name: str = "config") -> None:
    """--help-config: every option of the composed config (argv's other overrides applied, e.g.
    `sae=relu`) with its value and one-line doc."""
    from sae_dist.config import describe, upgrade_overrides

    overrides = upgrade_overrides([a for a in argv if a != HELP_CONFIG_FLAG and not a.startswith("-")
                                   and not a.lstrip("+~").startswith("hydra")],
                                  warn=lambda m: print(f"{_prog()}: {m}", file=sys.stderr))
    print(describe(_composed(overrides, config_name)))


def hydra_app(fn):
    """Wrap a console script's task `fn(cfg)` as a Hydra app of this package's conf/ (used by every
    sae-* command, sae-browse included)."""
    # the task runs inside Hydra's job (which would print a traceback before the message): user errors
    # are reported there; checks of the command line (the whole config included) run before Hydra starts
    import sae_dist.config  # noqa: F401  (registers the structured configs with Hydra's ConfigStore)

    @functools.wraps(fn)
    def task(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from sae_dist.config import check_config

        # every node converted to its object before any work; a sweep's point checks inside its recorded
        # run (sae_dist.sweep.run_point), so that its failure does not stop the sweep
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            check_config(cfg)
        return fn(cfg)

    app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(user_errors_first(task))

    @functools.wraps(fn)
    def main(*args, **kwargs):
        from sae_dist.config import upgrade_overrides

        if HELP_CONFIG_FLAG in sys.argv[1:]:
            user_errors_first(print_help_config)(sys.argv[1:])
            return None

        def checks():
            check_launcher_extra(sys.argv[1:])
            check_run_dir(sys.argv[1:])
            sys.argv[1:] = upgrade_overrides(sys.argv[1:], warn=lambda m: print(f"{_prog()}: {m}", file=sys.stderr))
            check_command_line(sys.argv[1:])

        user_errors_first(checks)()
        sae_dist.config.register_configs()  # (again: a test or launcher may have reset Hydra's singletons)
        return app(*args, **kwargs)

    return main


def _exit_if_preempted(summary) -> None:
    """Exit with PREEMPTED_EXIT_CODE when the job stopped on SIGTERM (state saved; rerun to resume), after
    touching the file SAE_DIST_PREEMPTED_MARKER names, when set: launchers read it because torchrun exits 1
    whatever status its workers stopped with (launch/slurm.sbatch requeues on it)."""
    if isinstance(summary, dict) and summary.get("preempted"):
        from sae_dist.preempt import PREEMPTED_EXIT_CODE

        marker = os.environ.get("SAE_DIST_PREEMPTED_MARKER")
        if marker:
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).touch()
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


def load_configured_lm(cfg: DictConfig, device: str, local_files_only: bool = False):
    """(model, tokenizer) of the config's `model` node (`sae_dist.harvest.lm.load_lm`) on `device`; with
    `local_files_only` from a local directory or the local hub cache only."""
    from sae_dist.harvest.lm import load_lm

    return load_lm(cfg.model.name, **_lm_options(cfg, device), local_files_only=local_files_only)


def _lm_options(cfg: DictConfig, device: str) -> dict:
    """`load_lm` / `load_lm_structure` keywords of the config's `model` node on `device`."""
    return {"gguf_file": cfg.model.gguf_file, "dtype": cfg.model.dtype, "device": device,
            "device_map": cfg.model.device_map}


def configured_lm_structure(cfg: DictConfig, device: str):
    """The config's LM as `load_configured_lm(cfg, device)` would load it, on the meta device without weights
    (`sae_dist.harvest.lm.load_lm_structure`: its config only): for its hook points and width. Raises as
    `load_lm_structure`."""
    from sae_dist.harvest.lm import load_lm_structure

    return load_lm_structure(cfg.model.name, **_lm_options(cfg, device))


def _hook_name(cfg: DictConfig, model) -> str:
    from sae_dist.harvest.hooks import default_hook_name, resolve_hook

    name = cfg.hook_name if cfg.hook_name is not None else default_hook_name(model)
    resolve_hook(model, name)  # raises with the list of valid names
    return name


def _harvest_hooks(cfg: DictConfig, model) -> str | list[str]:
    """The hook point(s) sae-harvest fills: the list `hooks` (one store each under store.path), else hook_name.
    ValueError for an empty list or `hooks` given together with hook_name."""
    if cfg.hooks is None:
        return _hook_name(cfg, model)
    if not cfg.hooks or cfg.hook_name is not None:
        raise ValueError(f"hooks={list(cfg.hooks)} with hook_name={cfg.hook_name}: give one or the other "
                         "(hooks: a non-empty list of hook points, one store each at store.path/<hook_name>)")
    return list(cfg.hooks)


def configured_model_name(cfg: DictConfig) -> str:
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
        name=cfg.data.name,
        revision=cfg.data.revision,
        trust_remote_code=cfg.data.trust_remote_code,
    )


# ----------------------------------------------------------------------------------------------
# the three stages, callable with a loaded LM so the pipeline loads it once


def run_harvest(cfg: DictConfig, out_dir: Path, lm=None) -> dict[str, Any]:
    """Harvest activations into `cfg.store.path` (with `hooks`: one store per hook under it); returns the
    harvester's summary dict."""
    from sae_dist.config import DataConfig, HarvestConfig, node_object
    from sae_dist.harvest.harvester import harvest

    hc = node_object(cfg.harvest, HarvestConfig)
    data = node_object(cfg.data, DataConfig)
    device = resolve_device(cfg.device)
    rank, world = _dist_env()
    model, tokenizer = lm if lm is not None else load_configured_lm(cfg, device)
    hook = _harvest_hooks(cfg, model)
    if hc.tokens is None:
        raise ValueError("harvest.tokens=null: sae-harvest needs the number of activation rows to store")
    sequences = None
    if data.pretokenized is not None:
        from sae_dist.harvest.pretokenize import PretokenizedSequences

        sequences = PretokenizedSequences(data.pretokenized, ctx_len=data.ctx_len, eval_fraction=data.eval_fraction)
    return harvest(
        model=model,
        tokenizer=tokenizer,
        hook_name=hook,
        docs=_docs(cfg) if sequences is None else None,
        sequences=sequences,
        store_path=cfg.store.path,
        tokens=hc.tokens,
        ctx_len=data.ctx_len,
        batch_size=hc.batch_size,
        dtype=hc.dtype,
        seqs_per_chunk=hc.seqs_per_chunk,
        seqs_per_shard=hc.seqs_per_shard,
        row_order=hc.row_order,
        rank=rank,
        world_size=world,
        eval_fraction=data.eval_fraction,
        attrs={"model": configured_model_name(cfg), "dataset": cfg.data.dataset},
        progress=rank == 0,
    )


def sae_config_from(sae: DictConfig, d_in: int):
    """SAEConfig from the `sae` config group (sae_dist.config.sae_config); d_in comes from the store."""
    from sae_dist.config import sae_config

    return sae_config(sae, d_in=d_in)


def _lm_source(cfg: DictConfig):
    """(an `LMStream` factory for sae-train source=lm, its attributes d_in / hook_name / model): the LM of the
    `model` node on stream.lm_device (default: device) over the `data` node's text (or data.pretokenized).
    Here every rank reads only the LM's config (`configured_lm_structure`: the hook and d_in are checked before
    any work); the stream loads the weights on the ranks that run the LM (`LMStream`'s load_lm): under tp > 1
    one rank per tensor-parallel group, the others receive its batches and load none."""
    from sae_dist.config import DataConfig, HarvestConfig, StreamConfig, node_object
    from sae_dist.harvest.harvester import lm_d_model
    from sae_dist.harvest.stream import LMStream

    st, hc = node_object(cfg.stream, StreamConfig), node_object(cfg.harvest, HarvestConfig)
    data = node_object(cfg.data, DataConfig)
    device = resolve_device(st.lm_device or cfg.device)
    structure = configured_lm_structure(cfg, device)
    hook = _hook_name(cfg, structure)
    sequences = None
    if data.pretokenized is not None:
        from sae_dist.harvest.pretokenize import PretokenizedSequences

        sequences = PretokenizedSequences(data.pretokenized, ctx_len=data.ctx_len, eval_fraction=data.eval_fraction)
    attrs = {"model": configured_model_name(cfg), "dataset": cfg.data.dataset}
    factory = functools.partial(LMStream, model=structure, load_lm=functools.partial(load_configured_lm, cfg, device),
                                hook_name=hook, sequences=sequences,
                                docs=None if sequences is not None else functools.partial(_docs, cfg),
                                ctx_len=data.ctx_len, eval_fraction=data.eval_fraction,
                                buffer_tokens=st.buffer_tokens, lm_batch_size=hc.batch_size, dtype=hc.dtype,
                                attrs=attrs)
    return factory, {"d_in": lm_d_model(structure), "hook_name": hook, "model": attrs["model"]}


def _train_data(cfg: DictConfig):
    """(sae-train's data: the store path or an LM-stream factory, its attributes d_in / hook_name / model)."""
    if cfg.source == "lm":
        return _lm_source(cfg)
    from sae_dist.store import open_store, read_attrs

    return cfg.store.path, read_attrs(open_store(cfg.store.path))


def _wandb_cfg(cfg: DictConfig, name: str | None = None) -> dict:
    from sae_dist.sweep import sweep_wandb_group

    wandb_cfg = OmegaConf.to_container(cfg.wandb, resolve=True)
    wandb_cfg["group"] = sweep_wandb_group(cfg)  # all points of a sweep share one group
    if name is not None:
        wandb_cfg["name"] = wandb_cfg.get("name") or name
    wandb_cfg["config"] = OmegaConf.to_container(cfg, resolve=True)
    return wandb_cfg


def _grid_point_configs(cfg: DictConfig) -> list[DictConfig]:
    """The configs of a shared sweep's points: the job's overrides plus each combination of `cfg.grid`'s
    sweeps (Hydra's sweep syntax), composed like the job's own. ValueError for a grid key outside sae /
    trainer / wandb (the rest fixes the one batch stream) or an empty grid."""
    import itertools

    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(cfg.grid))
    if not parsed:
        raise ValueError("grid=[]: give at least one override, e.g. grid=[\"sae.k=16,32\"]")
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if not (key == "sae" or key.split(".")[0] in ("sae", "trainer", "wandb")):
            raise ValueError(f"grid entry {o.input_line!r}: a shared sweep varies the SAE and its optimisation "
                             "(sae=, sae.*, trainer.*, wandb.*); other keys fix the data that every point shares "
                             "(use a Hydra multirun, -m, to vary them)")
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    base = [o for o in HydraConfig.get().overrides.task if _override_key(o) != "grid"]
    return [compose(config_name="config", overrides=[*base, *combo]) for combo in itertools.product(*axes)]


def _train_points(cfg: DictConfig, out_dir: Path, d_in: int) -> list:
    """The GridPoints of sae-train: one in out_dir, or with `grid` one per combination in
    out_dir/<i>_n<d_sae>_k<k>; ValueError naming sae.d_in when it is not the data's `d_in`."""
    from sae_dist.config import check_config, config_error, trainer_config
    from sae_dist.train.trainer import GridPoint

    point_cfgs = _grid_point_configs(cfg) if cfg.grid is not None else [cfg]
    points = []
    for i, pc in enumerate(point_cfgs):
        if pc.sae.d_in is not None and int(pc.sae.d_in) != d_in:
            where = "the LM's hook point" if cfg.source == "lm" else f"the store at store.path={cfg.store.path}"
            raise ValueError(f"sae.d_in={pc.sae.d_in} but {where} has d_in {d_in}: sae-train takes d_in from its "
                             "data (leave sae.d_in unset)")
        check_config(pc, d_in=d_in)
        with config_error("sae"):
            sae_cfg = sae_config_from(pc.sae, d_in=d_in)
        name = None if cfg.grid is None else f"{i}_n{sae_cfg.d_sae}_k{sae_cfg.k}"
        out = out_dir if name is None else out_dir / name
        points.append(GridPoint(out, sae_cfg, trainer_config(pc), _wandb_cfg(pc, name and f"{out_dir.name}/{name}")))
    return points


def _check_after_train_fits(points: list, device: str) -> None:
    """ValueError before any training when `eval.after_train=true` could never load an exported SAE of `points`
    onto `device` (global rank 0's evaluation holds the whole SAE: `sae_dist.sae.export.check_fits_device`
    against the GPU's total memory)."""
    from sae_dist.sae.export import check_fits_device

    for p in points:
        try:
            check_fits_device(p.sae_cfg.d_in, p.sae_cfg.d_sae, device, "eval.after_train's SAE", memory="total")
        except MemoryError as e:
            raise ValueError(f"eval.after_train=true cannot evaluate this run on one GPU: {e}. Set "
                             "eval.after_train=false (the training itself is sharded and unaffected)") from None


def _reports(cfg: DictConfig) -> bool:
    """Whether this process prints sae-train's summary and evaluates: global rank 0, or with
    parallel.grid_groups > 1 the first rank of each group (for its group's points)."""
    rank, world = _dist_env()
    groups = int(cfg.parallel.grid_groups) if cfg.grid is not None else 1
    return rank % max(world // groups, 1) == 0


def _heldout_off(why: str) -> None:
    print(f"sae-train: held-out evaluation off (trainer.eval_every_steps): {why}", file=sys.stderr)


def _store_text_cfg(cfg: DictConfig, attrs: dict) -> DictConfig:
    """A copy of `cfg` whose model, text, context length and eval fraction are the store's (its attributes model,
    dataset, ctx_len, eval_fraction; a different value set on the command line is kept with a warning, as
    `apply_sae_provenance` does for sae-eval). ValueError when the store's text was local files not named."""
    ecfg = _provenance_cfg(cfg, {"model_name": attrs.get("model"), "dataset_path": attrs.get("dataset"),
                                 "context_size": attrs.get("ctx_len")}, "sae-train", source="the store")
    if attrs.get("eval_fraction") is not None:
        ecfg.data.eval_fraction = float(attrs["eval_fraction"])
    return ecfg


def heldout_eval(cfg: DictConfig, attrs: dict, lm=None, keep: dict | None = None):
    """sae-train's held-out evaluation loader: a function of the number of contexts that `train_grid` calls on the
    ranks that evaluate (dp replica 0), once it holds the run directories' locks and only when a run has an
    evaluation step ahead (`sae_dist.train.trainer._open_heldout`), returning the `HeldoutEval` (the LM and
    held-out contexts), or None (off, with a one-line notice on stderr saying why) when the LM, its hook or the
    held-out text cannot be had from local files. attrs: the training data's (d_in, hook_name; a store's model,
    dataset, ctx_len, eval_fraction). `lm`: sae-pipeline's loaded (model, tokenizer), the store's LM; else the LM
    is loaded from local files: the store's (`_store_text_cfg`), or with source=lm a second copy of the streamed
    one (the stream runs its copy in a background thread). `keep`: a dict that gets the LM it loads, for
    `eval.after_train` to use again (`_after_train_lm`): keys lm (model, tokenizer), model (the model group as a
    dict) and device."""
    import functools

    return functools.partial(_load_heldout, cfg, attrs, lm=lm, keep=keep)


def _load_heldout(cfg: DictConfig, attrs: dict, n_contexts: int, lm=None, keep: dict | None = None):
    """`heldout_eval`'s loader: the `sae_dist.train.heldout.HeldoutEval` of `n_contexts` contexts, or None with a
    notice."""
    from sae_dist.train.heldout import HeldoutEval

    try:
        ecfg = cfg if cfg.source == "lm" else _store_text_cfg(cfg, attrs)
        device = resolve_device((cfg.stream.lm_device if cfg.source == "lm" else None) or cfg.device)
        try:
            model, tokenizer = lm if lm is not None else load_configured_lm(ecfg, device, local_files_only=True)
        except (OSError, ImportError) as e:
            return _heldout_off(f"the LM model.name={ecfg.model.name} does not load from local files (a directory "
                                f"or the hub cache): {_first_line(e)}")
        held = HeldoutEval.from_text(model, tokenizer, attrs["hook_name"], _docs(ecfg), ctx_len=int(ecfg.data.ctx_len),
                                     eval_fraction=float(ecfg.data.eval_fraction), n_contexts=n_contexts,
                                     d_in=int(attrs["d_in"]))
        if lm is None and keep is not None:
            keep.update(lm=(model, tokenizer), model=OmegaConf.to_container(ecfg.model, resolve=True), device=device)
        return held
    except (OSError, ImportError, ValueError) as e:  # no local LM or text: train without it
        return _heldout_off(_first_line(e))


def _first_line(e: BaseException) -> str:
    """The text "<type>: <first line of its message>" of an exception (OSError's messages run to several lines)."""
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


def run_train(cfg: DictConfig, out_dir: Path, lm=None, keep_lm: dict | None = None) -> dict[str, Any]:
    """Train an SAE on `cfg.store.path` (or, with source=lm, on the LM's activations computed on the fly);
    checkpoints under out_dir/checkpoints, export to out_dir/sae. With `grid`, a shared sweep (`train_grid`):
    one point per combination, each in out_dir/<i>_n<d_sae>_k<k>, all on the whole mesh or, with
    parallel.grid_groups=G, point i on rank group i % G; returns {"points": [this process's points' results]}.
    The held-out evaluation (`heldout_eval`) uses `lm`, a loaded (model, tokenizer) of the store's LM, if given;
    else the LM it loads goes into `keep_lm` (a dict) when one is given."""
    from sae_dist.train.trainer import train_grid

    data, attrs = _train_data(cfg)
    points = _train_points(cfg, out_dir, int(attrs["d_in"]))
    if cfg.eval.after_train:
        _check_after_train_fits(points, resolve_device(cfg.device))
    results = train_grid(
        points=points,
        store_path=None if callable(data) else data,
        source=data if callable(data) else None,
        device=resolve_device(cfg.device),
        seed=int(cfg.seed),
        hook_name=attrs.get("hook_name"),
        model_name=attrs.get("model"),
        tp=int(cfg.parallel.tp),
        groups=int(cfg.parallel.grid_groups) if cfg.grid is not None else 1,
        heldout=heldout_eval(cfg, attrs, lm, keep=keep_lm),
    )
    if cfg.grid is None:
        return results[0]
    return {"points": results, "preempted": any(r.get("preempted") for r in results)}


def _lm_family(cfg: DictConfig, lm_family: list) -> list[dict]:
    """The loaded members of `eval.lm_family` (equivalent compute, Gao et al. 2024 sec. 4.1): each entry
    {name, gguf_file?, compute | params + train_tokens} loaded like `model` (same dtype) on the CPU, so a bad
    entry stops the command before any work; the evaluation moves one member at a time to its device."""
    from sae_dist.harvest.lm import load_lm, model_display_name

    members = []
    for i, entry in enumerate(lm_family or []):
        entry = dict(entry) if isinstance(entry, dict) else {}
        if not entry.get("name"):
            raise ValueError(f"eval.lm_family[{i}] has no `name` (an HF model name or local directory): {entry}")
        model, _ = load_lm(entry["name"], gguf_file=entry.get("gguf_file"), dtype=cfg.model.dtype, device="cpu")
        members.append({**entry, "name": model_display_name(entry["name"], entry.get("gguf_file")), "model": model})
    return members


def _progressive_k_factors(cfg) -> list[float] | None:
    """eval.progressive (sec. 5.3 progressive recovery): the k'/k factors, or None when it is off."""
    from sae_dist.config import eval_config

    ev = eval_config(cfg)
    return list(ev.progressive_k_factors) if ev.progressive else None  # validated by evaluate


#: the eval.* keys that are not keyword arguments of sae_dist.eval.evaluate.evaluate of the same name
#: (lm_family: loaded here first; progressive + progressive_k_factors: evaluate's progressive_k_factors)
EVAL_KEYS_NOT_EVALUATE_ARGS = ("after_train", "progressive", "progressive_k_factors", "lm_family")


#: (config key, the cfg.json key that records what the SAE was trained on)
_PROVENANCE = (("model.name", "model_name"), ("data.dataset", "dataset_path"), ("data.ctx_len", "context_size"))
_LOCAL_LOADERS = ("json", "csv", "text", "parquet", "arrow")  # datasets' builders for files named by data_files


def _override_key(override: str) -> str:
    """The key of a Hydra command-line override ("+a.b=1" -> "a.b")."""
    return override.lstrip("+~").split("=", 1)[0]


def _set_on_command_line(key: str) -> bool:
    """Whether this command's overrides set `key` or choose its config group (model=gpt2 for model.name)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True  # called from Python: the caller's config is taken as given
    names = {_override_key(o) for o in HydraConfig.get().overrides.task}
    return key in names or key.split(".")[0] in names


def _provenance_cfg(cfg: DictConfig, trained: dict, app: str, source: str = "the SAE's cfg.json") -> DictConfig:
    """A copy of `cfg` with `apply_sae_provenance` applied (`cfg` itself unchanged)."""
    import copy

    ecfg = copy.deepcopy(cfg)
    apply_sae_provenance(ecfg, trained, app, source=source)
    return ecfg


def apply_sae_provenance(cfg: DictConfig, trained: dict, app: str, source: str = "the SAE's cfg.json") -> None:
    """Default `cfg`'s model, dataset and context length to what the SAE was trained on (`trained`, read from
    `source`: keys model_name, dataset_path, context_size as in cfg.json). A different value given on the
    command line is kept, with a warning on stderr (another model or text than the SAE's). ValueError when
    the SAE's text was local files (a `datasets` loader such as json) that the command line does not name."""
    from sae_dist.harvest.lm import EMBEDDED_MODEL_NAME

    for key, field in _PROVENANCE:
        have = configured_model_name(cfg) if key == "model.name" else OmegaConf.select(cfg, key)
        want = trained.get(field)
        if want is None or want == have:
            continue
        if _set_on_command_line(key):
            print(f"{app}: warning: the SAE was trained with {field}={want!r} ({source}), but {key}={have!r} "
                  f"is used: the results are for another {'model' if key == 'model.name' else 'text'} than it was "
                  "trained on", file=sys.stderr)
            continue
        if key == "data.dataset" and want in _LOCAL_LOADERS and cfg.data.data_files is None:
            raise ValueError(f"{app}: the SAE was trained on local files (dataset_path={want!r}); name them with "
                             f"data.dataset={want} data.data_files=... (or evaluate on other text: data=...)")
        if key == "model.name":
            want, cfg.model.gguf_file = ("embedded" if want == EMBEDDED_MODEL_NAME else want), None
        OmegaConf.update(cfg, key, want)
        print(f"{app}: {key}={want} (from {source}: {field})", file=sys.stderr)


def run_eval(cfg: DictConfig, out_dir: Path, lm=None, sae_path: str | None = None) -> dict[str, Any]:
    """Evaluate the SAE at `sae_path` (default cfg.sae_path) on held-out text; writes out_dir/eval.json. Without
    `lm` the model, dataset and context length default to the SAE's cfg.json (`apply_sae_provenance`)."""
    from sae_dist.config import eval_config
    from sae_dist.eval.evaluate import evaluate, write_eval_json
    from sae_dist.sae.formats import read_sae_cfg
    from sae_dist.sae.hub import resolve_sae_path

    ev = eval_config(cfg)
    sae_path = str(resolve_sae_path(sae_path or cfg.sae_path))  # hf://ORG/REPO/...: the hub's local copy
    cfg_json = Path(sae_path) / "cfg.json"
    if not cfg_json.exists():
        raise FileNotFoundError(f"no exported SAE at sae_path={sae_path!r} ({cfg_json} is missing); "
                                "train one with sae-train or point sae_path= at an export directory")
    sae_cfg = read_sae_cfg(sae_path)  # ours or a SAELens save (which nests hook_name under "metadata")
    if lm is None:
        apply_sae_provenance(cfg, sae_cfg, "sae-eval")
    device = resolve_device(cfg.device)
    model, tokenizer = lm if lm is not None else load_configured_lm(cfg, device)

    hook = cfg.hook_name if cfg.hook_name is not None else sae_cfg.get("hook_name")
    if hook is None:
        hook = _hook_name(cfg, model)
    result = evaluate(
        sae_path=str(sae_path),
        model=model,
        tokenizer=tokenizer,
        hook_name=hook,
        docs=_docs(cfg),
        ctx_len=int(cfg.data.ctx_len),
        eval_fraction=float(cfg.data.eval_fraction),
        device=device,
        model_name=configured_model_name(cfg),
        lm_family=_lm_family(cfg, ev.lm_family),
        progressive_k_factors=list(ev.progressive_k_factors) if ev.progressive else None,
        # eval_tokens, batch_size and the metrics of Gao et al. 2024 sec. 4.3-5.1 (sae_dist.config.EvalConfig)
        **{k: v for k, v in dataclasses.asdict(ev).items() if k not in EVAL_KEYS_NOT_EVALUATE_ARGS},
    )
    write_eval_json(result, out_dir / "eval.json")
    return result


# ----------------------------------------------------------------------------------------------
# console entry points


@hydra_app
def harvest_main(cfg: DictConfig) -> None:
    """sae-harvest: LM + text -> activation store (zarr v3)."""
    summary = run_harvest(cfg, _out_dir())
    print(json.dumps(summary, indent=2, default=str))
    _exit_if_preempted(summary)


@hydra_app
def pretokenize_main(cfg: DictConfig) -> None:
    """sae-pretokenize: text -> packed train sequences in `data.pretokenized` (sae_dist.harvest.pretokenize),
    tokenised by `data.num_proc` processes, for `sae-harvest data.pretokenized=...`."""
    from sae_dist.config import DataConfig, node_object
    from sae_dist.harvest.lm import load_tokenizer
    from sae_dist.harvest.pretokenize import pretokenize

    data = node_object(cfg.data, DataConfig)
    if data.pretokenized is None:
        raise ValueError("data.pretokenized=null: give sae-pretokenize the output directory, "
                         "data.pretokenized=DIR")
    if _dist_env()[1] > 1:
        raise ValueError(f"sae-pretokenize runs once, not under torchrun (WORLD_SIZE={_dist_env()[1]}): it starts "
                         "data.num_proc tokenising processes itself; then every sae-harvest worker reads its share")
    tokenizer = load_tokenizer(cfg.model.name, gguf_file=cfg.model.gguf_file)
    info = pretokenize(dataset=data.dataset, tokenizer=tokenizer, out_dir=data.pretokenized, ctx_len=data.ctx_len,
                       eval_fraction=data.eval_fraction, split=data.split, text_field=data.text_field,
                       data_files=OmegaConf.to_container(cfg.data, resolve=True)["data_files"], name=data.name,
                       revision=data.revision, trust_remote_code=data.trust_remote_code, num_proc=data.num_proc,
                       tokenizer_name=configured_model_name(cfg))
    print(json.dumps(info, indent=2))


def _after_train_lm(cfg: DictConfig, sae_dir: str, keep: dict | None):
    """eval.after_train's (config, (model, tokenizer)): a copy of `cfg` with the model, text and context length the
    SAE at `sae_dir` was trained on (its cfg.json: the store's, or the streamed LM's; `apply_sae_provenance`, so a
    value set on the command line is kept, with a warning), and that LM: the one the held-out evaluation loaded on
    this process during training (`keep`, filled by `heldout_eval`) when it is the same model on the same device,
    else loaded now (`load_configured_lm`, which raises as it does for sae-eval)."""
    from sae_dist.sae.formats import read_sae_cfg

    ecfg = _provenance_cfg(cfg, read_sae_cfg(sae_dir), "sae-train eval.after_train")
    device = resolve_device(ecfg.device)
    held = keep or {}
    if (held.get("lm") is not None and held.get("device") == device
            and held.get("model") == OmegaConf.to_container(ecfg.model, resolve=True)):
        return ecfg, held["lm"]
    return ecfg, load_configured_lm(ecfg, device)


@hydra_app
def train_main(cfg: DictConfig) -> None:
    """sae-train: activation store (or, with source=lm, the LM itself) -> SAE checkpoints + export
    (sae/cfg.json, sae/sae_weights.safetensors); with `eval.after_train=true` also eval.json (global rank 0
    evaluates after training). With `grid=[...]` one job trains a shared sweep (`run_train`).
    Under `-m` (a sweep) a failing point is recorded in its job_status.json and the sweep goes on;
    `sae_dist.sweep.SweepReport` reports the failures at the end.

    The same command runs under torchrun / slurm: `parallel.tp=P` shards latents over P ranks and dp =
    world size / P (sae_dist.parallel). Only global rank 0 prints the summary.
    """
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    from sae_dist.config import check_config
    from sae_dist.sweep import run_point
    from sae_dist.train.logging import add_eval_to_wandb_run

    def point(out: Path) -> dict:
        check_config(cfg)  # before any work (under -m: this point's failure is recorded, the sweep goes on)
        # record: under torchrun the failing rank's traceback goes to its error file, which torchrun's
        # failure report prints next to the rank's number
        keep_lm: dict = {}  # the held-out evaluation's LM, for eval.after_train
        summary = record(run_train)(cfg, out, keep_lm=keep_lm if cfg.eval.after_train else None)
        if _reports(cfg):
            trained = [r for r in summary.get("points", [summary]) if r.get("sae_dir")]
            if cfg.eval.after_train and trained:
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()  # the evaluation runs on global rank 0 alone
                ecfg, lm = _after_train_lm(cfg, trained[0]["sae_dir"], keep_lm)
                wandb_cfg = _wandb_cfg(cfg)
                for r in trained:  # each point of a grid writes eval.json in its own directory
                    r["eval"] = run_eval(ecfg, Path(r["out_dir"]), lm=lm, sae_path=r["sae_dir"])
                    add_eval_to_wandb_run(r["out_dir"], wandb_cfg, r["eval"])
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


@hydra_app
def eval_main(cfg: DictConfig) -> None:
    """sae-eval: SAE + LM + text -> eval.json."""
    out = _out_dir()
    result = run_eval(cfg, out)
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {out / 'eval.json'}")


@hydra_app
def pipeline_main(cfg: DictConfig) -> None:
    """sae-pipeline: harvest -> train -> eval in one run directory, then a summary table."""
    out = _out_dir()
    if cfg.source != "store" or cfg.grid is not None:
        raise ValueError(f"source={cfg.source}, grid={cfg.grid}: sae-pipeline harvests a store and trains one SAE on "
                         "it; train from the LM (source=lm) or a shared sweep (grid=[...]) with sae-train")
    if cfg.hooks is not None:
        raise ValueError(f"hooks={list(cfg.hooks)}: sae-pipeline trains one SAE on one store; set hook_name, or "
                         "run sae-harvest hooks=[...] and then sae-train store.path=<store.path>/<hook_name>")
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    lm = load_configured_lm(cfg, device)
    harvest_summary = run_harvest(cfg, out, lm=lm)
    _exit_if_preempted(harvest_summary)
    train_summary = run_train(cfg, out, lm=lm)
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
        ("d_sae / k", f"{result.get('d_sae')} / {result.get('k')}"),
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
