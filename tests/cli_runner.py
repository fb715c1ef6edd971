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
import signal
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


class Launched:
    """A forked command while it runs: the part of subprocess.Popen the tests use (poll, wait,
    send_signal, kill, communicate, returncode), its output collected in files until it ends."""

    def __init__(self, command: list[str], cwd: str, env: dict[str, str]):
        self.args = command
        self._tmp = tempfile.TemporaryDirectory()
        self._stdout = os.path.join(self._tmp.name, "stdout")
        self._stderr = os.path.join(self._tmp.name, "stderr")
        self._process = _forkserver().Process(
            target=_run_command, args=(command, env, cwd, self._stdout, self._stderr)
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once the command has ended; on timeout it is killed, as run() does."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        with open(self._stdout) as out, open(self._stderr) as err:
            return out.read(), err.read()


def start(command: list[str], cwd: str, env: dict[str, str]) -> Launched | subprocess.Popen:
    """subprocess.Popen(command, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True), forked
    from the preloaded process when the command is `python -m module` or `python script.py`."""
    if command[0] == sys.executable and (command[1] == "-m" or command[1].endswith(".py")):
        return Launched(command, cwd, env)
    pipe = subprocess.PIPE
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True)


def run(command: list[str], cwd: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
    process = start(command, cwd, env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
