"""Shared fixtures: a tiny random Llama saved to disk, a clean environment for subprocesses, a fixed seed
for every test, a forkserver for multi-process tests and console scripts run in this process."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _kernel_tol import choose_kernel_device

# Tests never touch the network: wandb writes offline run files, HF libraries stay offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The kernel tests' device, decided here once (tests/_kernel_tol.py): CUDA when torch sees a CUDA device
# (compiled Triton kernels, TRITON_INTERPRET removed), else CPU through Triton's interpreter
# (TRITON_INTERPRET=1). This runs before any test module imports Triton or sae_dist.kernels, as it must:
# triton.jit reads TRITON_INTERPRET when a kernel is defined.
KERNEL_DEVICE = choose_kernel_device()

#: The seed of `random`, `numpy` and `torch` before every test (`seed_everything`): a failure reproduces
#: on a rerun. SAE_DIST_TEST_SEED=N runs the suite under another seed.
TEST_SEED = int(os.environ.get("SAE_DIST_TEST_SEED", "0"))


def _seed_all() -> None:
    import torch

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


@pytest.fixture(autouse=True)
def seed_everything():
    """Seed `random`, `numpy`'s global RNG and `torch` with TEST_SEED before each test."""
    _seed_all()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """Seed the same way before every module- or session-scoped fixture is built (they are built before
    the test's own `seed_everything`), so what they draw does not depend on the tests run before."""
    if fixturedef.scope != "function":
        _seed_all()


@pytest.fixture
def kernel_device():
    """The device of the kernel tests' tensors with backend="triton": torch.device("cuda") when
    torch.cuda.is_available() at startup, else CPU (Triton's interpreter). On CUDA, fp32 matmuls
    (torch's and the Triton encoder's, which follows torch's setting) run in IEEE fp32 during the
    test: TF32 is off, so fp32 selections can be compared exactly; a test may switch it on
    (`torch.set_float32_matmul_precision("high")`) and the previous setting is restored after it."""
    if KERNEL_DEVICE.type != "cuda":
        yield KERNEL_DEVICE
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield KERNEL_DEVICE
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """Directory holding a tiny random LlamaForCausalLM (d_model 32, 3 layers) and its BPE tokenizer."""
    from helpers.synthetic import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    """(model, tokenizer) of the tiny LM in float32, eval mode, gradients off; loaded once per test module."""
    from sae_dist.harvest.lm import load_lm

    return load_lm(tiny_lm_dir, dtype="float32")


@pytest.fixture(scope="session")
def worker_forkserver():
    """Start torch.multiprocessing's "forkserver" with tests/_worker_preload.py imported in it.

    Multi-process tests (`@pytest.mark.usefixtures("worker_forkserver")`) start their workers with
    torch.multiprocessing's or multiprocessing's "forkserver" method: each worker is forked from this
    fresh interpreter (nothing of the pytest process leaks into it, as with "spawn"), which has imported
    torch, DeepSpeed, transformers and sae_dist once (tests/_worker_preload.py), instead of every spawned
    worker importing them again (~5 s of CPU each).
    The forkserver runs with this directory on PYTHONPATH (Python 3.11's forkserver does not take the
    parent's sys.path), which its workers inherit.
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(["_worker_preload"])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([old] if old else [])])
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture
def console_script(monkeypatch):
    """Run a console script of pyproject.toml's [project.scripts] in this process with a command line:
    `console_script("sae-train", *args)` -> `subprocess.CompletedProcess` (returncode, stdout, stderr).

    For tests of what a program does with its arguments, not of the process boundary: it saves the
    ~4 s of imports of a subprocess. sys.argv, the environment, the logging setup (which Hydra
    reconfigures) and torch's thread count (`threads=` sets it for the run) are restored afterwards.
    """
    import contextlib
    import io
    import logging
    import subprocess
    import sys
    import warnings
    from importlib.metadata import entry_points

    import torch

    def run(name: str, *args: str, threads: int | None = None) -> subprocess.CompletedProcess:
        (ep,) = entry_points(group="console_scripts", name=name)
        main = ep.load()
        argv = [str(Path(sys.executable).parent / name), *args]
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        loggers = {lg: lg.disabled for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)}
        n_threads = torch.get_num_threads()
        env = dict(os.environ)
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as m:
            m.setattr(sys, "argv", argv)
            if threads is not None:
                torch.set_num_threads(threads)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
                    # torchrun's `record` cannot point faulthandler at a StringIO (and need not here)
                    warnings.filterwarnings("ignore", message="Unable to enable fault handler")
                    try:
                        ret = main()
                        code = 0 if ret is None else int(ret)
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                        if not isinstance(e.code, (int, type(None))):  # printed, as the interpreter does
                            print(e.code, file=sys.stderr)
            finally:
                for h in root.handlers:
                    if h not in handlers:
                        h.close()
                root.handlers[:] = handlers
                root.setLevel(level)
                for lg, disabled in loggers.items():  # Hydra's disabled logging disables existing loggers
                    lg.disabled = disabled
                torch.set_num_threads(n_threads)
                for k in set(os.environ) - set(env):  # what the program set stays in the program
                    del os.environ[k]
                os.environ.update(env)
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    return run
