"""How a compiled step moves data between the device and host memory: which instructions touch
host memory (memory space S(5) in XLA's layouts), as what op, and whether they run asynchronously.

Issue 18: in a traced Llama-2-7B 4 x 2048 step (call `issue21-2gpu-reduce-once`) the offloaded
layer inputs' copies (~39 ms each way) ran on the compute stream, in series with the kernels. This
reads the optimized HLO that `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"` writes and
counts, per module that has any, the host-touching instructions by opcode (a dynamic-update-slice into a
host-memory stack inside the layer loop, a dynamic-slice out of it, a copy between memory spaces,
their async start/done forms), the fusions XLA turned into dynamic memcpys, and the instructions
placed on a stream other than the compute stream (a non-zero operation_queue_id):
  python experiments/hlo_host_transfers.py DIR --module train_step > host_transfers.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%?[\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
HOST_SPACE = "S(5)"
QUEUE = re.compile(r'"operation_queue_id":"?(\d+)')
OPERAND = re.compile(r"(%[\w.\-]+)")


def summarize(path: str, examples: int = 6) -> dict:
    with open(path) as f:
        instructions = [(m[1], m[2], m[3], line) for line in f if (m := INSTRUCTION.match(line))]
    in_host = {name for name, shape, _, _ in instructions if HOST_SPACE in shape}
    by_opcode: collections.Counter = collections.Counter()
    shown: dict[str, list[str]] = collections.defaultdict(list)
    memcpy_fusions = other_stream = 0
    for name, shape, opcode, line in instructions:
        if "dynamic_memcpy" in line or "DynamicMemcpy" in line:
            memcpy_fusions += 1
        queue = QUEUE.search(line)
        on_other_stream = bool(queue and int(queue[1]) != 0)
        other_stream += on_other_stream
        operands = set(OPERAND.findall(line[line.index(opcode + "(") :]))
        touches = "writes host" if name in in_host else "reads host" if operands & in_host else ""
        if not touches or opcode in ("get-tuple-element", "tuple", "parameter", "bitcast"):
            continue
        key = f"{opcode}: {touches}" + (", own stream" if on_other_stream else "")
        by_opcode[key] += 1
        if len(shown[key]) < examples:
            shown[key].append(f"{name} = {shape[:160]} {opcode}")
    return {
        "file": os.path.basename(path),
        "host_memory_instructions": dict(by_opcode.most_common()),
        "dynamic_memcpy_fusions": memcpy_fusions,
        "instructions_on_another_stream": other_stream,
        "examples": dict(shown),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dump_dir")
    p.add_argument("--module", default="", help="only files whose name contains this")
    a = p.parse_args()
    for path in sorted(glob.glob(os.path.join(a.dump_dir, "*after_optimizations.txt"))):
        if a.module in os.path.basename(path) and (summary := summarize(path))["host_memory_instructions"]:
            print(json.dumps(summary))


if __name__ == "__main__":
    main()
