"""One benchmark run per process: the child prints its result as one `RESULT {json}` line and the
parent reads it back (a fresh process per run gives each run its own device peak-memory counter)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "RESULT "


def report(result: dict[str, Any]) -> None:
    """Child side: hand the result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parent side: the child's result, or {"error": the end of its output} when it failed."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith(PREFIX)]
    if out.returncode or not lines:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(lines[-1][len(PREFIX) :])
