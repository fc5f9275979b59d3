"""One writer per directory: an advisory lock on a run directory or an activation store.

The lock is `filelock`'s OS-level file lock (flock on POSIX) on `<dir>/.sae-dist.lock` (run directories)
or `<parent>/.<store name>.harvest-worker<rank>.lock` (activation stores, one lock per harvest worker): the
kernel drops it when the holding process exits, SIGKILL included, so a killed job never leaves a stale lock
that blocks its rerun. Beside it `<lock file>.json` names the holder (host, pid, what, start time); it is
informational only (a dead holder's file is simply overwritten by the next one). On filesystems without
flock support `filelock` falls back to a marker file that a SIGKILL leaves behind (docs/reference.md).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["DirectoryBusyError", "DirectoryLock", "LOCK_NAME"]

LOCK_NAME = ".sae-dist.lock"


class DirectoryBusyError(RuntimeError):
    """Another process holds the directory's lock. The message names the directory, the holder's host
    and pid and what it is doing, and the fix."""


class DirectoryLock:
    """Exclusive, non-blocking lock on a directory (created if missing).

    `acquire()` returns at once: it takes the lock or raises DirectoryBusyError naming the holder.
    `release()` (or leaving the `with` block) drops it; so does the process's death.
    `what` says what the holder does ("sae-train", "sae-harvest worker 0 of 2") for the message.
    lock_file: where the lock lives (default `<directory>/.sae-dist.lock`); a directory that another
    step creates by an atomic rename (an activation store) is locked from a file beside it instead.
    """

    def __init__(self, directory: str | os.PathLike, what: str, *, lock_file: str | os.PathLike | None = None):
        from filelock import FileLock

        self.directory = Path(directory)
        self.what = what
        self.path = Path(lock_file) if lock_file is not None else self.directory / LOCK_NAME
        self.info_path = self.path.with_name(self.path.name + ".json")
        self._lock = FileLock(str(self.path), timeout=0)

    def holder(self) -> dict:
        """The last recorded holder ({} when unknown or unreadable)."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DirectoryLock":
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            h = self.holder()
            who = (f"{h.get('what', 'another sae-dist process')} (host {h.get('host', '?')}, "
                   f"pid {h.get('pid', '?')}, since {h.get('started', '?')})")
            raise DirectoryBusyError(
                f"{self.directory} is in use by {who}. Wait for it to finish or stop it, or use another "
                f"directory; two writers would corrupt each other's files."
            ) from None
        info = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        tmp = self.info_path.with_name(self.info_path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.info_path)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
