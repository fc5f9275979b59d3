"""A console script of pyproject.toml's [project.scripts] as an executable whose runs are processes forked
from the test forkserver (tests/conftest.py `worker_forkserver`: torch, DeepSpeed, transformers and sae_dist
imported once) instead of fresh interpreters that import them again (~5 s of CPU a launch).

For tests of a shell script that takes the executable it runs from the environment (e.g. SAE_TRAIN of
launch/compare_architectures.sh): `with prestarted_console_script("sae-train", bin_dir) as exe:` writes
`bin_dir/sae-train`, a small client, and `bin_dir/python` (this interpreter). Each run of the client sends its
arguments, working directory and environment to a server thread of this process, which runs the entry point
with them in a new forkserver process (its stdout / stderr go to files the client copies to its own) and
returns the exit status the client exits with. The script under test still execs the executable once per
command with its own arguments and environment; only the interpreter start and the imports are shared.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import stat
import sys
import threading
from pathlib import Path

_CLIENT = """#!{python} -I
import json, os, socket, sys, tempfile
with tempfile.TemporaryDirectory() as d:
    out, err = os.path.join(d, "out"), os.path.join(d, "err")
    req = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ), "out": out, "err": err}}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({sock!r})
        s.sendall(json.dumps(req).encode() + b"\\n")
        rc = int(s.makefile().readline() or 1)
    for path, stream in ((out, sys.stdout), (err, sys.stderr)):
        if os.path.exists(path):
            with open(path, "rb") as f:
                stream.buffer.write(f.read())
            stream.flush()
sys.exit(rc)
"""



def _exit_code(e: SystemExit) -> int:
    """The status a SystemExit gives the interpreter (a message is printed to stderr and gives 1)."""
    if isinstance(e.code, int) or e.code is None:
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """Flush stdout and stderr, then end this forked process with `code` (no cleanup: it is a fork)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _enter(cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: the client's directory and environment, stdout / stderr to the files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)


def _run_entry_point(name: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: the client's directory, environment and argv, stdout / stderr to files,
    then the console script's entry point; its return value or SystemExit becomes the exit status."""
    from importlib.metadata import entry_points

    _enter(cwd, env, out, err)
    sys.argv = [name, *argv]
    (ep,) = entry_points(group="console_scripts", name=name)
    try:
        ret = ep.load()()
        code = 0 if ret is None else int(ret)
    except SystemExit as e:
        code = _exit_code(e)
    _exit(code)


def _serve(server: socket.socket, name: str) -> None:
    ctx = multiprocessing.get_context("forkserver")
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed: the context manager ended
            return
        with conn:
            req = json.loads(conn.makefile().readline())
            p = ctx.Process(target=_run_entry_point,
                            args=(name, req["argv"], req["cwd"], req["env"], req["out"], req["err"]))
            p.start()
            p.join()
            code = p.exitcode if p.exitcode is not None and p.exitcode >= 0 else 128 - (p.exitcode or 0)
            conn.sendall(f"{code}\n".encode())


@contextlib.contextmanager
def prestarted_console_script(name: str, bin_dir: Path):
    """Yields the path of `bin_dir/name` (see the module docstring); needs the `worker_forkserver` fixture.
    Runs are served one at a time, as a shell script runs its commands."""
    import shutil
    import tempfile

    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    sock_dir = tempfile.mkdtemp(prefix="prestarted-")  # short: a unix socket path has at most 107 bytes
    sock = os.path.join(sock_dir, "s")
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock)
    server.listen(4)
    thread = threading.Thread(target=_serve, args=(server, name), daemon=True)
    thread.start()
    exe = bin_dir / name
    exe.write_text(_CLIENT.format(python=sys.executable, sock=sock))
    python = bin_dir / "python"  # where a script looks for the interpreter beside the executable
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for p in (exe, python):
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    try:
        yield exe
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the server thread
        server.close()
        thread.join(5)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _run_module(module: str, argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: `python -m module *argv` with the given directory and environment."""
    import runpy

    _enter(cwd, env, out, err)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    _exit(code)


def run_module_forked(module: str, argv: list[str], *, cwd, env: dict, tmp_dir, timeout: float | None = None):
    """`subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True, text=True)`
    in a process forked from the test forkserver (needs the `worker_forkserver` fixture): the same module run
    as __main__ with the same arguments, directory and environment, without the interpreter start and the
    imports the forkserver already did. Returns a subprocess.CompletedProcess (returncode None: timed out)."""
    import subprocess

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out, err = tmp_dir / f"{module}.stdout", tmp_dir / f"{module}.stderr"
    p = multiprocessing.get_context("forkserver").Process(
        target=_run_module, args=(module, list(argv), str(cwd), dict(env), str(out), str(err)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        code = None
    else:
        code = p.exitcode if p.exitcode >= 0 else 128 - p.exitcode
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code,
                                       out.read_text() if out.exists() else "", err.read_text() if err.exists() else "")
