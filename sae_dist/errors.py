"""Which failures are the user's to fix, and how the commands report them.

A command that fails because of its input (a configuration value, a path, a store's contents, a busy
run directory, a missing optional dependency) prints one message - what is wrong, the value, the fix -
and exits with status 2; its traceback is shown only with `SAE_DIST_DEBUG=1` (or Hydra's
`HYDRA_FULL_ERROR=1`). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

__all__ = ["USER_ERROR_EXIT_CODE", "debug_errors", "is_user_error", "report_user_error", "user_error_types"]

#: Exit status of a command stopped by a user error (as argparse uses for bad arguments).
USER_ERROR_EXIT_CODE = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (imported on call: the commands' start stays light)."""
    from sae_dist.extras import MissingExtraError
    from sae_dist.harvest.harvester import HarvestError
    from sae_dist.lock import DirectoryBusyError
    from sae_dist.store.errors import StoreError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, FloatingPointError, StoreError, HarvestError, DirectoryBusyError,
            MissingExtraError)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, user_error_types())


def debug_errors() -> bool:
    """True when tracebacks of user errors were asked for (SAE_DIST_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("SAE_DIST_DEBUG", "HYDRA_FULL_ERROR"))


def report_user_error(prog: str, e: BaseException) -> None:
    """Print `prog: error: <message>` and a hint about the traceback to stderr (nothing else)."""
    msg = str(e) or type(e).__name__
    print(f"{prog}: error: {msg}\n(set SAE_DIST_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
