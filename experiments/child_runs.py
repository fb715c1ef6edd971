"""One benchmark run per process: the child prints its result as one `RESULT {json}` line and the
parent reads it back (a fresh process per run gives each run its own device peak-memory counter)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "RESULT "


def report(result: dict[str, Any]) -> None:
    """Child side: hand the result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def result(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """Parent side: a finished child's result, or {"error": its exit code (a signal: killed, e.g. by
    the host's out-of-memory killer, with no message), its exception's line and the end of its
    output} when it failed (XLA's errors end in long stack traces that bury the message)."""
    lines = [x for x in stdout.splitlines() if x.startswith(PREFIX)]
    if returncode or not lines:
        output = stderr or stdout
        raised = [x for x in output.splitlines() if re.match(r"\w[\w.]*(Error|Exception)\b", x)]
        killed = f" (signal {signal.Signals(-returncode).name})" if returncode < 0 else ""
        how = f"exit code {returncode}{killed}"
        return {"error": how + "\n" + (raised[-1][:1000] + "\n...\n" if raised else "") + output[-1500:]}
    return json.loads(lines[-1][len(PREFIX) :])


def run(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one child to its end: its result (see `result`)."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    return result(out.returncode, out.stdout, out.stderr)
