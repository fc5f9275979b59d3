"""Every launch example in README.md and docs/*.md is a shape `sae-plan` accepts (fits one GPU's memory).

What counts as a launch example (the docs follow this rule):

- a command in a fenced ```bash block of README.md or docs/*.md; lines ending in a backslash are joined,
  a leading `$ ` prompt is dropped, `&&` and `;` separate commands and `#` starts a comment;
- that runs training: one of its words is `sae-train` or `sae-pipeline` (any directory prefix, e.g.
  `.venv/bin/`), or the launchers that run them, `launch/torchrun.sh`, `launch/slurm.sbatch` (through
  `sbatch`) and `launch/sweep_slurm.sh`;
- and that is not a template: after its leading `VAR=value` assignments, no word holds a placeholder
  (`...`, `<`, `>`, `$`, `|`, or a word in square brackets). A template shows syntax, not a shape, so it
  must not set a size either (no `sae.d_sae=`, `sae.k=`, `parallel.tp=`, `trainer.batch_tokens=`
  with a number): the test checks that too.

How an example becomes a plan (`sae_dist.plan.plan`, the API behind `sae-plan`):

- the Hydra overrides after the program are composed with conf/config.yaml, as sae-train does (so a
  misspelt key fails here too); `sae-train -m` sweeps (comma lists) are planned point by point;
- world size: `launch/torchrun.sh N` is 1 node x N GPUs; `sbatch [--nodes=X] [--gpus-per-node=Y]
  launch/slurm.sbatch` X x Y, with the defaults of the script's own #SBATCH header; `torchrun --nnodes M
  --nproc-per-node N` M x N; `launch/sweep_slurm.sh` and plain `sae-train` one GPU per run
  (`N_LIST` / `K_LIST` or the script's defaults give the sweep's points);
- d_in is the store's width: STORE_D_IN for the stores the docs name, else DEFAULT_D_IN (the docs'
  cluster examples read `/data/acts.zarr`, which docs/cluster.md declares a d_in = 4096 store); a
  `sae-pipeline` without `store.path` harvests the default LM (d_model 576);
- the GPUs are the planner's defaults (H100 80GB, `conf/plan.yaml`); every architecture is planned as the
  TopK SAE of the same d_sae and k (the only one that shards; the others train with tp = 1).
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sae_dist.plan import plan

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Widths of the stores the docs name: the demo harvest (SmolLM2-135M, d_model 576) and formats.md's
#: write_store example (64).
STORE_D_IN = {"runs/demo/activations.zarr": 576, "my_acts.zarr": 64}
#: Any other store (e.g. /data/acts.zarr): d_in = 4096, the width docs/scaling.md plans for.
DEFAULT_D_IN = 4096
#: sae-pipeline without store.path harvests the default LM of conf/model/smollm2.yaml.
DEFAULT_LM_D_IN = 576
LAUNCHERS = ("sae-train", "sae-pipeline", "torchrun.sh", "slurm.sbatch", "sweep_slurm.sh")
SIZE_KEYS = ("sae.d_sae", "sae.k", "parallel.tp", "trainer.batch_tokens")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Command:
    """One command of a bash block: where it is, its words, and its leading VAR=value assignments."""

    doc: str
    line: int
    words: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.doc}:{self.line}: {' '.join(self.words)}"


def bash_commands(path: Path) -> list[Command]:
    """The commands of the ```bash blocks of one markdown file (rule in the module docstring)."""
    out, lang, buf, start = [], None, "", 0
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(raw.strip())
        if m:
            lang = None if lang is not None else m.group(1)
            continue
        if lang != "bash":
            continue
        if not buf:
            start = i
        line = raw.strip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        out += _split(path.relative_to(ROOT).as_posix(), start, buf)
        buf = ""
    return out


def _split(doc: str, line: int, text: str) -> list[Command]:
    text = text.strip()
    if text.startswith("$ "):
        text = text[2:]
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: not a command we can read (none in the docs today)
        return [Command(doc, line, text.split())]
    cmds, cur = [], []
    for w in [*words, ";"]:
        if w in ("&&", ";", "||") or w.endswith(";"):
            if w.endswith(";") and w != ";":
                cur.append(w[:-1])
            if cur:
                env = {}
                while cur and _ASSIGN.match(cur[0]):
                    k, v = cur.pop(0).split("=", 1)
                    env[k] = v
                cmds.append(Command(doc, line, cur, env))
            cur = []
        else:
            cur.append(w)
    return [c for c in cmds if c.words]


def launcher_index(cmd: Command) -> int | None:
    """Index of the first word naming a training program or launcher, else None."""
    for i, w in enumerate(cmd.words):
        if w.rsplit("/", 1)[-1] in LAUNCHERS:
            return i
    return None


def is_template(cmd: Command) -> bool:
    """A word holding a placeholder: `...`, `<x>`, `$VAR`, `a|b` or `[x]`."""
    return any(("..." in w or "<" in w or ">" in w or "$" in w or "|" in w or w.startswith("["))
               for w in cmd.words)


def launch_examples() -> tuple[list[Command], list[Command]]:
    """(launch examples, templates) of every doc."""
    examples, templates = [], []
    for doc in DOCS:
        for cmd in bash_commands(doc):
            if launcher_index(cmd) is None:
                continue
            (templates if is_template(cmd) else examples).append(cmd)
    return examples, templates


# ------------------------------------------------------------------------------------ planning
def _script_default(script: str, pattern: str) -> str:
    m = re.search(pattern, (ROOT / script).read_text(), re.M)
    assert m, f"{script}: no match for {pattern!r}"
    return m.group(1)


def world_shape(cmd: Command) -> tuple[int, int]:
    """(nodes, GPUs per node) the example runs on."""
    words, i = cmd.words, launcher_index(cmd)
    prog = words[i].rsplit("/", 1)[-1]
    before = words[:i]
    if prog == "torchrun.sh":
        return 1, int(words[i + 1])
    if prog == "slurm.sbatch":
        opts = {k: v for k, _, v in (w.lstrip("-").partition("=") for w in before if w.startswith("--"))}
        nodes = opts.get("nodes") or _script_default("launch/slurm.sbatch", r"^#SBATCH --nodes=(\d+)")
        gpus = opts.get("gpus-per-node") or _script_default("launch/slurm.sbatch", r"^#SBATCH --gpus-per-node=(\d+)")
        return int(nodes), int(gpus.rsplit(":", 1)[-1])
    if "torchrun" in [w.rsplit("/", 1)[-1] for w in before]:
        flags = dict(zip(before, before[1:], strict=False))
        return int(flags.get("--nnodes", 1)), int(flags.get("--nproc-per-node", flags.get("--nproc_per_node", 1)))
    return 1, 1


def overrides(cmd: Command) -> list[list[str]]:
    """Hydra overrides of the example, one list per run (a sweep expands its comma lists)."""
    words, i = cmd.words, launcher_index(cmd)
    prog = words[i].rsplit("/", 1)[-1]
    args = [w for w in words[i + 1:] if "=" in w and not w.startswith(("hydra", "-"))]
    if prog == "sweep_slurm.sh":  # STORE SWEEP_DIR [overrides]: sae-train -m over N_LIST x K_LIST
        n = cmd.env.get("N_LIST") or _script_default("launch/sweep_slurm.sh", r"N_LIST:-([\d,]+)")
        k = cmd.env.get("K_LIST") or _script_default("launch/sweep_slurm.sh", r"K_LIST:-([\d,]+)")
        args = [f"store.path={words[i + 1]}", f"sae.d_sae={n}", f"sae.k={k}", *args]
    sweep = prog == "sweep_slurm.sh" or "-m" in words or "--multirun" in words
    if not sweep:
        return [args]
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args]
    return [list(c) for c in itertools.product(*choices)]


def compose(args: list[str]):
    """conf/config.yaml with the overrides, as sae-train composes it (a bad key raises)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from sae_dist import CONF_DIR
    from sae_dist.config import upgrade_overrides  # registers the schemas; old keys as the CLI takes them

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hcompose(config_name="config", overrides=upgrade_overrides(args, warn=lambda m: None))


def d_in_of(cmd: Command, cfg, args: list[str]) -> int:
    store = next((a.split("=", 1)[1] for a in args if a.startswith("store.path=")), None)
    if store is None:
        prog = cmd.words[launcher_index(cmd)].rsplit("/", 1)[-1]
        named_lm = any(a.startswith(("model=", "model.name=")) for a in args)
        return DEFAULT_LM_D_IN if prog == "sae-pipeline" and not named_lm else DEFAULT_D_IN
    return STORE_D_IN.get(store, DEFAULT_D_IN)


def plan_example(cmd: Command) -> list[tuple[list[str], dict]]:
    """[(overrides, plan dict)] for every run of one launch example."""
    nodes, gpus = world_shape(cmd)
    out = []
    for args in overrides(cmd):
        cfg = compose(args)
        s, t = cfg.sae, cfg.trainer
        k = int(s.get("k", 32) or 32)
        r = plan(d_in=d_in_of(cmd, cfg, args), d_sae=int(s.d_sae), k=k,
                 k_aux=None if s.get("k_aux") is None else int(s.k_aux), multi_topk=bool(s.get("multi_topk", False)),
                 batch_tokens=int(t.batch_tokens), tp=int(cfg.parallel.tp), engine=str(t.engine),
                 zero_stage=int(t.zero_stage), offload_optimizer=bool(t.offload_optimizer), ema=bool(t.ema),
                 bf16_operand_copies=bool(t.bf16), cluster={"nodes": nodes, "gpus_per_node": gpus}, suggest=False)
        out.append((args, r))
    return out


# ------------------------------------------------------------------------------------ tests
def test_the_docs_have_launch_examples_at_every_scale():
    """The parser sees the docs' examples: single-process, one node, many nodes, sweeps, the 16M SAE."""
    examples, templates = launch_examples()
    progs = {c.words[launcher_index(c)].rsplit("/", 1)[-1] for c in examples}
    assert {"sae-train", "sae-pipeline", "torchrun.sh", "slurm.sbatch", "sweep_slurm.sh"} <= progs
    big = [c for c in examples if "sae.d_sae=16777216" in c.words]
    assert big and {c.doc for c in big} >= {"README.md", "docs/cluster.md"}
    assert len(examples) >= 20 and templates


@pytest.mark.parametrize("cmd", launch_examples()[0], ids=lambda c: f"{c.doc}:{c.line}")
def test_launch_example_fits(cmd):
    """The planner accepts the example: tp divides the world and n, B divides by dp, and it fits."""
    for args, r in plan_example(cmd):
        c = r["config"]
        assert r["fits"], (f"{cmd.where()}\n  planned as tp={c['tp']} x dp={c['dp']}, n={c['d_sae']:,}, "
                           f"d_in={c['d_in']}, B={c['batch_tokens']:,} ({' '.join(args)}): {r['message']}")


def test_templates_set_no_size():
    """Templates (placeholders) show syntax only: a size in one would escape the check above."""
    _, templates = launch_examples()
    sized = [c.where() for c in templates
             if any(re.fullmatch(rf"{re.escape(key)}=\d+", w) for w in c.words for key in SIZE_KEYS)]
    assert not sized, "templates with sizes (write them out as full examples):\n" + "\n".join(sized)


def test_parser_rules():
    """Joined lines, prompts, separators, assignments, templates and world shapes, on inline examples."""
    cmds = _split("x.md", 1, "$ SAE_DIST_IMAGE=$PWD/i.sqsh sbatch --nodes=8 launch/slurm.sbatch run_dir=r "
                  "sae.d_sae=64 parallel.tp=8 && echo done; launch/torchrun.sh 2 run_dir=r parallel.tp=2 # c")
    assert [c.words[0] for c in cmds] == ["sbatch", "echo", "launch/torchrun.sh"]
    assert cmds[0].env == {"SAE_DIST_IMAGE": "$PWD/i.sqsh"} and not is_template(cmds[0])
    assert world_shape(cmds[0]) == (8, 8) and world_shape(cmds[2]) == (1, 2)
    assert launcher_index(cmds[1]) is None
    assert is_template(_split("x.md", 1, "sbatch launch/slurm.sbatch run_dir=... parallel.tp=P")[0])
    tr = _split("x.md", 1, "torchrun --nnodes 2 --nproc-per-node 4 --no-python sae-train parallel.tp=4")[0]
    assert world_shape(tr) == (2, 4) and overrides(tr) == [["parallel.tp=4"]]
    sw = _split("x.md", 1, "sae-train -m store.path=s sae.d_sae=8,16 sae.k=2,4 hydra/launcher=slurm")[0]
    assert len(overrides(sw)) == 4 and ["store.path=s", "sae.d_sae=16", "sae.k=2"] in overrides(sw)
