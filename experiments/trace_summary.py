"""Where a traced step's device time goes: one profile (jax.profiler's perfetto trace) reduced to
a small dict per GPU, so that a GPU call brings back the breakdown rather than the trace.

Per device and per trace line (XLA's op and module lines, each CUDA stream): the span from the
line's first to last event, the time busy (events merged, so nesting counts once), and the names
taking most of it (numbered HLO names like `fusion.12` folded into `fusion`); collectives (NCCL
kernels, all-reduce / all-gather / reduce-scatter ops) are listed whole.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

COLLECTIVE = re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute", re.I)


def _family(name: str) -> str:
    return re.sub(r"([._]\d+)+$", "", name)


def _busy(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(trace_dir: str, steps: int, top: int = 8) -> dict:
    """{device name: {line name: {span_ms, busy_ms, top: {name: ms}, collectives: {name: [ms, n]}}}}
    with every time divided by `steps` (the traced steps)."""
    path = max(
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    lines = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "GPU" in process.get(e["pid"], ""):
            lines[(process[e["pid"]], thread.get((e["pid"], e["tid"]), str(e["tid"])))].append(e)
    summary: dict = collections.defaultdict(dict)
    for (device, line), evs in sorted(lines.items()):
        spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in evs]
        by_name, collectives = collections.Counter(), {}
        for e in evs:
            by_name[_family(e["name"])] += e.get("dur", 0)
            if COLLECTIVE.search(e["name"]):
                ms, n = collectives.get(e["name"][:80], (0.0, 0))
                collectives[e["name"][:80]] = (ms + e.get("dur", 0) / 1e3 / steps, n + 1)
        summary[device][line] = {
            "span_ms": (max(s for _, s in spans) - min(s for s, _ in spans)) / 1e3 / steps,
            "busy_ms": _busy(spans) / 1e3 / steps,
            "events_per_step": len(evs) / steps,
            "top": {name: round(us / 1e3 / steps, 3) for name, us in by_name.most_common(top)},
            "collectives": {
                k: [round(ms, 3), n]
                for k, (ms, n) in sorted(collectives.items(), key=lambda kv: -kv[1][0])[:top]
            },
        }
    return dict(summary)
