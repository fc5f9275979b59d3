"""The typed configuration (sae_dist/config.py): dataclass defaults are the only defaults, a wrong key,
type or value fails before any work naming the key, --help-config documents every field, and the
renamed trainer keys still work with a deprecation line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import sae_dist.config as C
from sae_dist import CONF_DIR
from sae_dist.sae.config import SAEConfig
from sae_dist.train.config import TrainerConfig

REPO = Path(__file__).resolve().parents[2]

#: the only values a YAML of conf/ sets differently from its dataclass (everything else is a default)
YAML_DIFFERENCES = {
    "topk": {"sae.enc_init_scale": 0.57735},
    "relu": {"sae.k": None},
    "prolu": {"sae.k": None},
    "jumprelu": {"sae.k": None},
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("arch", list(C.SAE_NODES))
def test_composed_config_is_the_dataclass_defaults(arch):
    """conf/*.yaml restate no default: the composed config equals the dataclasses' defaults except
    the few values the YAML sets on purpose (YAML_DIFFERENCES)."""
    cfg = _compose(f"sae={arch}")
    values = OmegaConf.to_container(cfg, resolve=False)
    expected = {**{f"sae.{k}": v for k, v in _defaults(C.SAE_NODES[arch]).items()},
                **{f"{g}.{k}": v for g, cls in C._GROUPS.items() for k, v in _defaults(cls).items()}}
    expected.update(YAML_DIFFERENCES.get(arch, {}))
    got = {f"{g}.{k}": v for g in [*C._GROUPS, "sae"] for k, v in values[g].items()}
    norm = {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    assert got == norm
    assert cfg.sae.architecture == arch and OmegaConf.get_type(cfg.sae) is C.SAE_NODES[arch]
    # the trainer's defaults are TrainerConfig's, store.* included
    assert C.trainer_config(cfg) == dataclasses.replace(TrainerConfig())


def test_cli_values_reach_the_objects():
    cfg = _compose("trainer.lr=3e-4", "store.shuffle_shards=7", "trainer.adam_betas=[0.8,0.9]", "sae=relu",
                   "sae.l1_coef=0.02", "sae.d_sae=128", "eval.probes=false")
    t = C.trainer_config(cfg)
    assert (t.lr, t.shuffle_shards, t.prefetch, t.adam_betas) == (3e-4, 7, 2, (0.8, 0.9))
    s = C.sae_config(cfg.sae, d_in=16)
    assert (s.d_in, s.d_sae, s.k, s.architecture) == (16, 128, None, "relu")
    assert s.options["l1_coef"] == 0.02 and s.options["l1_decoder_norm"] is True
    assert C.eval_config(cfg).probes is False


def test_changing_a_dataclass_default_changes_what_the_cli_gets():
    """The trainer's defaults are declared once, in TrainerConfig: a changed default there is what
    `sae-train --help-config` (the composed config) shows, with no YAML to edit."""
    code = (
        "import sys\n"
        "from sae_dist.train.config import TrainerConfig\n"
        "TrainerConfig.__dataclass_fields__['warmup_steps'].default = 7\n"
        "TrainerConfig.__dataclass_fields__['shuffle_shards'].default = 9\n"
        "from sae_dist.cli import train_main\n"
        "sys.argv = ['sae-train', '--help-config']\n"
        "train_main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split()[0] == "trainer.warmup_steps=7" for line in lines if line.strip()), r.stdout
    assert any(line.split()[0] == "store.shuffle_shards=9" for line in lines if line.strip()), r.stdout


@pytest.mark.parametrize("args, message", [
    (["trainer.lr=abc"], "sae-train: error: trainer.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["trainer.lr=-1"], "sae-train: error: trainer.lr=-1.0 must be > 0"),
    (["sae.foo=1"], "sae-train: error: sae.foo: Key 'foo' not in 'SAE_topk'"),
    (["sae=relu", "sae.l1_coef=x"], "sae-train: error: sae.l1_coef: Value 'x' of type 'str' could not be "
                                    "converted to Float"),
    (["sae.k=999999"], "sae-train: error: sae.k=999999 > d_sae=16384"),
    (["sae.normalize=bogus"], "sae-train: error: sae.normalize='bogus'"),
    (["eval.batch_size=1.5"], "sae-train: error: eval.batch_size: Value '1.5' of type 'float' could not be "
                              "converted to Integer"),
    (["-m", "trainer.lr=1e-3,abc"], "sae-train: error: trainer.lr: Value 'abc'"),
    (["-m", "sae.d_sae=64,128", "sae.kk=4,8"], "sae-train: error: sae.kk: Key 'kk' not in 'SAE_topk'"),
])
def test_bad_value_fails_first_naming_the_key(console_script, tmp_path, args, message):
    run_dir = tmp_path / "run"
    flags = [a for a in args if a.startswith("-")]
    r = console_script("sae-train", *flags, f"run_dir={run_dir}", f"store.path={tmp_path / 'none.zarr'}",
                       *[a for a in args if a not in flags])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(message), r.stderr
    assert lines[1:] == ["(set SAE_DIST_DEBUG=1 for the traceback)"]
    assert not run_dir.exists()  # no work started: not even the run directory


def test_help_config_lists_every_field_with_its_doc(console_script):
    r = console_script("sae-train", "sae=jumprelu", "trainer.lr=3e-4", "--help-config")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0].split("=", 1)[0]: line for line in r.stdout.splitlines() if line.startswith("  ")}
    for group, cls in [*C._GROUPS.items(), ("sae", C.SAE_NODES["jumprelu"])]:
        for f in dataclasses.fields(cls):
            key = f"{group}.{f.name}"
            assert key in rows, key
            doc = f.metadata["doc"]
            assert doc and rows[key].rstrip().endswith(doc), (key, rows[key])
    assert rows["trainer.tokens"].split()[0] == "trainer.tokens=10000000"
    assert rows["trainer.lr"].split()[0] == "trainer.lr=0.0003"  # the command line's value
    assert rows["sae.k"].split()[0] == "sae.k=null"  # conf/sae/jumprelu.yaml's
    assert rows["sae.l0_coef"].split()[0] == "sae.l0_coef=0.01"
    assert rows["seed"].split()[0] == "seed=0"
    old = next(line for line in r.stdout.splitlines() if line.startswith("Old keys still accepted"))
    assert "trainer.betas -> trainer.adam_betas" in old and "harvest.shuffle_rows -> harvest.row_order" in old
    h = console_script("sae-train", "--help")
    assert h.returncode == 0 and "--help-config" in h.stdout


def test_old_trainer_keys_work_with_a_deprecation_line(console_script):
    r = console_script("sae-train", "trainer.eps=1e-8", "trainer.betas=[0.8,0.99]", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert ("sae-train: warning: trainer.eps is deprecated and will be removed in the next release; "
            "use trainer.adam_eps") in r.stderr.splitlines()
    assert ("sae-train: warning: trainer.betas is deprecated and will be removed in the next release; "
            "use trainer.adam_betas") in r.stderr.splitlines()
    job = OmegaConf.create(r.stdout)
    assert job.trainer.adam_eps == 1e-8 and list(job.trainer.adam_betas) == [0.8, 0.99]
    assert "eps" not in job.trainer and "betas" not in job.trainer


def test_old_names_of_renamed_keys_work_with_a_deprecation_line(console_script):
    """The keys renamed to SAELens' names (one release of grace): sae.n_latents, sae.b_pre_init,
    trainer.b_pre_sample_tokens, hook."""
    r = console_script("sae-harvest", "sae.n_latents=96", "sae.b_pre_init=mean", "trainer.b_pre_sample_tokens=512",
                       "hook=blocks.1.hook_mlp_out", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    for old, new in [("sae.n_latents", "sae.d_sae"), ("sae.b_pre_init", "sae.b_dec_init"),
                     ("trainer.b_pre_sample_tokens", "trainer.b_dec_sample_tokens"), ("hook", "hook_name")]:
        assert (f"sae-harvest: warning: {old} is deprecated and will be removed in the next release; use {new}"
                in r.stderr.splitlines()), old
    job = OmegaConf.create(r.stdout)
    assert (job.sae.d_sae, job.sae.b_dec_init, job.trainer.b_dec_sample_tokens, job.hook_name) == \
        (96, "mean", 512, "blocks.1.hook_mlp_out")
    assert "n_latents" not in job.sae and "hook" not in job


def test_upgrade_overrides():
    seen = []
    assert C.upgrade_overrides(["trainer.eps=1e-7", "+trainer.betas=[0.9,0.9]", "trainer.lr=1"], warn=seen.append) \
        == ["trainer.adam_eps=1e-7", "+trainer.adam_betas=[0.9,0.9]", "trainer.lr=1"]
    assert len(seen) == 2 and "trainer.eps is deprecated" in seen[0]
    assert C.upgrade_overrides(["harvest.shuffle_rows=false", "harvest.shuffle_rows=True"], warn=seen.append) \
        == ["harvest.row_order=text", "harvest.row_order=shuffled_in_shard"]
    assert "harvest.shuffle_rows is deprecated and will be removed in the next release; use harvest.row_order=text" \
        in seen[2]


def test_sae_config_keeps_its_python_defaults():
    cfg = SAEConfig(d_in=8)
    assert (cfg.d_sae, cfg.k, cfg.architecture) == (16384, 32, "topk")
    with pytest.raises(ValueError, match=r"^sae\.k=0 must be|^sae\.k must be"):
        SAEConfig(d_in=8, k=0)


def test_run_config_records_the_typed_values(console_script, tmp_path):
    """--cfg job of the composed config is JSON-serialisable plain data (what .hydra/config.yaml and
    wandb record)."""
    r = console_script("sae-train", "--cfg", "job", "sae.d_sae=64", "sae.k=4")
    assert r.returncode == 0, r.stderr
    job = OmegaConf.to_container(OmegaConf.create(r.stdout))
    json.dumps(job)
    assert job["sae"]["d_sae"] == 64 and job["store"]["shuffle_shards"] == 4


def test_plan_config_defaults_and_errors(console_script):
    """sae-plan's root is typed too (sae_dist/plan_config.py): cluster.* are plan.Cluster's defaults,
    estimate.* plan.plan's, and a wrong type fails with one line naming the key."""
    from hydra import compose, initialize_config_dir

    from sae_dist.plan import Cluster
    from sae_dist.plan_config import PlanConfig, register_plan_configs

    register_plan_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="plan", overrides=["sae.d_in=64"])
    assert OmegaConf.get_type(cfg) is PlanConfig
    assert OmegaConf.to_container(cfg.cluster) == dataclasses.asdict(Cluster())
    assert cfg.harvest.tokens is None and cfg.estimate.bf16_operand_copies is None  # plan.yaml's / null
    r = console_script("sae-plan", "sae.d_in=64", "cluster.nodes=x")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("sae-plan: error: cluster.nodes: Value 'x' of type 'str' could not "
                                               "be converted to Integer"), r.stderr
