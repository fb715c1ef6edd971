"""The largest values in XLA's temp allocation of a compiled program: what a step's peak is made of.

Reads the `*buffer-assignment.txt` files that `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`
writes, and prints, per module, its allocations and the biggest values of its largest (temp)
allocation with their shapes, as one JSON object per module:
  python experiments/top_buffers.py DIR --module update --top 25 > top_buffers.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

ALLOCATION = re.compile(r"^allocation (\d+): size (\d+)(.*)")
VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")


def summarize(path: str, top: int) -> dict:
    allocations: list[dict] = []
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if m := ALLOCATION.match(line):
            allocations.append(
                {"id": int(m[1]), "mib": int(m[2]) / 2**20, "what": m[3].strip(" ,:")[:120], "values": []}
            )
        elif allocations and (m := VALUE.search(line)):
            allocations[-1]["values"].append(
                {"mib": int(m[2]) / 2**20, "offset_mib": int(m[3]) / 2**20, "name": m[1], "shape": m[4]}
            )
    allocations.sort(key=lambda a: -a["mib"])
    temp = next((a for a in allocations if "temp" in a["what"]), None)
    values = sorted(temp["values"], key=lambda v: -v["mib"])[:top] if temp else []
    return {
        "file": os.path.basename(path),
        "total_mib": sum(a["mib"] for a in allocations),
        "largest_allocations": [{k: a[k] for k in ("id", "mib", "what")} for a in allocations[:top]],
        "temp_mib": temp["mib"] if temp else 0.0,
        "largest_temp_values": values,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dump_dir")
    p.add_argument("--module", default="", help="only files whose name contains this")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    for path in sorted(glob.glob(os.path.join(a.dump_dir, "*buffer-assignment.txt"))):
        if a.module in os.path.basename(path):
            print(json.dumps(summarize(path, a.top)))


if __name__ == "__main__":
    main()
