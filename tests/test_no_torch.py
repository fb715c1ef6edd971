"""The core package must not pull in PyTorch (it is only a reference: tests and qlora_jax.compare)."""

import subprocess
import sys


def test_core_modules_import_without_torch():
    code = (
        "import importlib, pkgutil, sys, qlora_jax\n"
        "for m in pkgutil.walk_packages(qlora_jax.__path__, 'qlora_jax.'):\n"
        "    if not m.name.startswith('qlora_jax.compare.'):  # the PyTorch comparison tool\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
