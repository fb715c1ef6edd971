"""CLI commands run as a user runs them, each in a fresh process forked from one that has already
imported the heavy libraries (JAX, transformers with torch, Orbax, TensorBoard, matplotlib,
datasets, peft): a launch then skips ~8 s of CPU spent on imports.

Only imports are shared. Nothing in the preloaded process has started a JAX backend (each child
checks), so each command's JAX starts under the command's own environment (XLA_FLAGS, device
count); the command runs from its own working directory with its own argv, as `python -m module`
or `python script.py` would (runpy), and its exit code, stdout and stderr are returned as
subprocess.run returns them. Other command forms run as plain subprocesses.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile

# Libraries only, never a module a command runs as __main__ (runpy would execute it a second time).
PRELOAD = [
    "tests.cli_runner",
    "jax",
    "flax.linen",
    "optax",
    "orbax.checkpoint",
    "torch",
    "transformers",
    "peft",
    "tensorboardX",
    "matplotlib.pyplot",
    "datasets",
    "qlora_jax.train.loop",
    "qlora_jax.compare.run",
]
_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run_command(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked child: the command's environment, directory, output files and argv, then its
    module or script as __main__ (SystemExit gives the exit code, as in a real interpreter)."""
    from jax._src import xla_bridge

    assert not xla_bridge._backends, "a preloaded module started a JAX backend"
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


def run(command: list[str], cwd: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
    forkable = command[0] == sys.executable and (command[1] == "-m" or command[1].endswith(".py"))
    if not forkable:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        stdout, stderr = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = _forkserver().Process(target=_run_command, args=(command, env, cwd, stdout, stderr))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        with open(stdout) as out, open(stderr) as err:
            return subprocess.CompletedProcess(command, process.exitcode, out.read(), err.read())
