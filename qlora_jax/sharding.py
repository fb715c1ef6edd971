"""Device mesh and partition rules: where every array of a run lives on a (data, fsdp, tensor) mesh.

The rules are data: (path regex, PartitionSpec over the logical dims) per tree, first match wins,
applied after any stacked-layer axes. A mesh axis that does not divide a dim is dropped for that
leaf (it is replicated along it), so every model runs on every mesh. XLA's SPMD partitioner
inserts the collectives; nothing here communicates by hand. A one-device mesh changes nothing.

NF4 weights are stored flat (codes row-major, one scale per block), so they can only be split by
whole rows of the logical (out, in) weight: codes, block scales and double-quant scales are cut
at the same row boundaries so each shard dequantizes its rows locally.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.models import linear
from qlora_jax.quant.nf4 import NF4Tensor

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits the weights
ROWS = ("fsdp", "tensor")  # weight rows (output features) are split over both

# Frozen base, logical dims of one layer's tensor: (out, in) weights, (out,) biases, (V, D) tables.
# Fused projections (Phi-3's qkv_proj, gate_up_proj) are split by rows like the rest: a cut may fall
# inside q|k|v or gate|up, and XLA moves the activations the decoder's split needs.
FROZEN_RULES: tuple[tuple[str, P], ...] = (
    (r"(_proj|/c_attn|/c_fc)/weight$", P(ROWS, None)),  # c_attn, c_fc, c_proj: GPT-2's
    (r"(_proj|/c_attn|/c_fc)/bias$", P(ROWS)),
    (r"^(embed_tokens|embed_positions|lm_head)/weight$", P(ROWS, None)),
    (r".*", P()),  # norms
)
# LoRA: a (in, r) split on in over fsdp, b (r, out) on out like the frozen rows it adds to.
LORA_RULES: tuple[tuple[str, P], ...] = (
    (r"/a$", P("fsdp", None)),
    (r"/b$", P(None, ROWS)),
    (r"/bias$", P(ROWS)),
    (r".*", P()),  # scale
)
# AdamW moments: split like the LoRA leaves they track and, beyond that, over the data axis
# (ZeRO-1): each data-parallel rank keeps and updates 1/data of the state, and moves only that
# share to and from host memory when it is offloaded. XLA gathers the updated adapters back.
OPT_STATE_RULES: tuple[tuple[str, P], ...] = (
    (r"/a$", P(("fsdp", "data"), None)),
    (r"/b$", P(None, ("fsdp", "tensor", "data"))),
    (r"/bias$", P(("fsdp", "tensor", "data"))),
    (r".*", P()),  # counters
)


def gathered_rules(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """flax logical-axis rules for the step (models/linear.py names the axes): under fsdp every
    device multiplies its own rows of the batch by the whole weight, gathered as 4-bit codes and
    scales one layer at a time, as FSDP does; rows stay split over the tensor axis. Left to
    itself, GSPMD keeps the weight split and moves activations instead (gathers of the batch and
    reduce-scatters of the input gradients per projection: the time fsdp lost in issue 21)."""
    rows = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
    return ((linear.WEIGHT_ROWS, rows), (linear.ADAPTER_IN, None))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1, meaning the devices left over."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = (self.data, self.fsdp, self.tensor)
        bad = [f"mesh.{a}={s}" for a, s in zip(AXES, sizes, strict=True) if s == 0 or s < -1]
        if bad or sizes.count(-1) > 1:
            raise ValueError(
                f"{', '.join(bad) or 'more than one mesh axis is -1'}: each of mesh.data/fsdp/tensor "
                "must be a positive size, and at most one -1 (the rest of the devices)"
            )
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ValueError(
                f"mesh {dict(zip(AXES, sizes, strict=True))} does not divide {n_devices} devices"
            )
        resolved = tuple(n_devices // known if s == -1 else s for s in sizes)
        if math.prod(resolved) != n_devices:
            raise ValueError(
                f"mesh {dict(zip(AXES, resolved, strict=True))} uses {math.prod(resolved)} devices, "
                f"there are {n_devices}; set one axis to -1 to take the rest"
            )
        return resolved


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # XLA propagates shardings (GSPMD)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def _fit_dim(mesh: Mesh, axes: Any, size: int, multiple: int = 1) -> Any:
    """The longest prefix of `axes` that cuts `size` into equal chunks, each a multiple of `multiple`."""
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    for end in range(len(axes), 0, -1):
        if size % (_axes_size(mesh, axes[:end]) * multiple) == 0:
            return axes[:end] if end > 1 else axes[0]
    return None


def fit_spec(mesh: Mesh, spec: P, shape: Sequence[int], stack_dims: int = 0) -> P:
    """`spec` for a leaf of `shape` whose first `stack_dims` axes are stacked layers (kept whole)."""
    dims = list(spec) + [None] * (len(shape) - stack_dims - len(spec))
    fitted = [_fit_dim(mesh, axes, size) for axes, size in zip(dims, shape[stack_dims:], strict=True)]
    return P(*([None] * stack_dims), *fitted)


def _rule(rules: Sequence[tuple[str, P]], path: str) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    raise KeyError(f"no partition rule matches {path!r}")


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _nf4_shardings(mesh: Mesh, q: NF4Tensor, spec: P) -> NF4Tensor:
    """Codes and every level of scales cut at the same whole-row boundaries (or all replicated)."""
    if len(spec) > 1 and spec[1] is not None:
        raise ValueError(f"NF4 weights are stored flat: only rows can be split, not {spec}")
    rows, cols = q.shape[0], math.prod(q.shape[1:])
    # every shard holds whole rows and whole blocks of every scale level
    axes = _fit_dim(mesh, spec[0] if len(spec) else None, rows)
    aligned = q.block_size * (q.nested_block_size or 1)
    axes = _fit_dim(mesh, axes, rows * cols, aligned)
    stack = [None] * len(q.stack_shape)
    flat = NamedSharding(mesh, P(*stack, axes))
    whole = NamedSharding(mesh, P(*stack))
    return dataclasses.replace(
        q,
        packed=flat,
        absmax=flat,
        nested_absmax=None if q.nested_absmax is None else flat,
        offset=None if q.offset is None else whole,
    )


def tree_shardings(mesh: Mesh, tree: Any, rules: Sequence[tuple[str, P]], stack_dims: int = 0) -> Any:
    """NamedShardings for every array of `tree` (NF4Tensors split consistently) by `rules`."""

    def one(path, leaf):
        name = _path_str(path)
        stack = stack_dims if name.startswith("layers/") or "/layers/" in name else 0
        spec = _rule(rules, name)
        if isinstance(leaf, NF4Tensor):
            return _nf4_shardings(mesh, leaf, spec)
        return NamedSharding(mesh, fit_spec(mesh, spec, leaf.shape, stack))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, NF4Tensor))


def default_shardings(tree: Any) -> Any:
    """Every leaf on the first device (single-device runs, no mesh)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (counters, keys)."""
    return NamedSharding(mesh, P())


def frozen_shardings(mesh: Mesh, frozen: Any) -> Any:
    return tree_shardings(mesh, frozen, FROZEN_RULES, stack_dims=1)


def lora_shardings(mesh: Mesh, lora: Any) -> Any:
    return tree_shardings(mesh, lora, LORA_RULES, stack_dims=1)


def opt_state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """Moments split like the LoRA leaves they track (the same path suffix and shape) and over the
    data axis too (OPT_STATE_RULES); counters replicated."""
    return tree_shardings(mesh, abstract_state, OPT_STATE_RULES, stack_dims=1)


def batch_sharding(mesh: Mesh, leading_micro_axis: bool) -> NamedSharding:
    """Rows split over data x fsdp; with accumulation the micro-batch axis comes first, unsplit."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if leading_micro_axis else P(BATCH_AXES))


def single_device_layout(batch: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """The batch without its packed-attention layout (segment_starts) on a mesh of several
    devices, whose packed rows keep the (T, T) segment mask: JAX 0.11's batching rule for cuDNN's
    packed attention folds the rows but not the segment offsets (the per-rank vmap of the step),
    and the kernel failed under the fsdp layout in the 2-GPU smoke (2026-11-28)."""
    if mesh is None or mesh.size == 1:
        return batch
    return {key: value for key, value in batch.items() if key != "segment_starts"}


def shard_batch(
    mesh: Mesh,
    batch: dict[str, np.ndarray],
    leading_micro_axis: bool = False,
    complete: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> dict:
    """The global host batch as arrays on the mesh; each process contributes only its own rows,
    passed through `complete` first (what it adds, e.g. embedding rows, is formed for those rows
    alone)."""
    complete = complete or (lambda rows: rows)
    batch = single_device_layout(batch, mesh)
    sharding = batch_sharding(mesh, leading_micro_axis)
    rows_axis = 1 if leading_micro_axis else 0
    n_rows = next(iter(batch.values())).shape[rows_axis]
    split = _axes_size(mesh, BATCH_AXES)
    if n_rows % split:
        raise ValueError(
            f"train.batch_size={n_rows} does not split over mesh data x fsdp = {split} devices; "
            f"use a multiple of {split}"
        )
    if jax.process_count() == 1:
        return jax.device_put(complete(batch), sharding)
    per_process = n_rows // jax.process_count()
    rows = np.arange(per_process) + jax.process_index() * per_process
    local = complete({k: np.take(v, rows, axis=rows_axis) for k, v in batch.items()})

    def global_shape(local_part: np.ndarray) -> tuple[int, ...]:
        shape = list(local_part.shape)
        shape[rows_axis] = n_rows
        return tuple(shape)

    return {k: jax.make_array_from_process_local_data(sharding, v, global_shape(v)) for k, v in local.items()}


def place(tree: Any, shardings: Any) -> Any:
    """Put a tree that every process holds whole (same values) onto global shardings."""
    if jax.process_count() > 1:
        tree = jax.device_get(tree)  # a process may only send from its own devices' copies
    return jax.device_put(tree, shardings)


def gather_to_host(tree: Any) -> Any:
    """The whole tree as numpy on every process (an all-gather when arrays span processes)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def wait_for_all(name: str) -> None:
    """A barrier across processes (a no-op alone): keeps every process alive until the first has
    written the run's files, since one leaving early takes the coordination service down."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` held by the first device (the largest share under these rules)."""
    device = jax.local_devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def initialize_distributed(
    mode: str, coordinator: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
    """jax.distributed.initialize for multi-process runs; returns whether it ran.

    mode "auto" initializes when the environment describes a cluster (SLURM, Open MPI, or
    JAX_COORDINATOR_ADDRESS) or a coordinator is configured; "on" always; "off" never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed.mode={mode!r} unknown; valid: auto, on, off")
    cluster = (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in os.environ
    )
    if mode == "off" or (mode == "auto" and not (cluster or coordinator)):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=num_processes or None,
        process_id=None if process_id < 0 else process_id,
    )
    return True
