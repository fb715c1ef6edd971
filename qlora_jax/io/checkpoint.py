"""Train-state checkpoints with Orbax: the train state (one pytree) and a JSON record of the rest.

Saved every `checkpoint.every` steps under <output_dir>/checkpoints/<step>/, the last `keep`
kept. Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
kill or a failed write (disk full) mid-save leaves the previous checkpoint as the latest complete
one; a failed write raises CheckpointWriteError naming both steps. The frozen base is never
saved: the record holds its path and a fingerprint, and resuming on another base is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qlora_jax.models.config import LlamaConfig

# Fields added after checkpoints existed, left out of the fingerprint at these values so that
# older checkpoints still match their base (seq_tile and dequant_slices always: they are how to
# run, not what).
LATER_FIELDS = {
    "qkv_bias": False,
    "qk_norm": False,
    "fused_qkv": False,  # Phi-3's and GPT-2's
    "fused_gate_up": False,  # Phi-3's from here
    "partial_rotary_factor": 1.0,
    "hidden_act": "silu",  # Gemma's and GPT-2's
    "sandwich_norms": False,  # Gemma's from here
    "unit_offset_norms": False,
    "scale_embeddings": False,
    "query_pre_attn_scalar": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "layer_types": None,
    "rope_local_theta": None,
    "text_of_multimodal": False,
    "norm_type": "rmsnorm",  # GPT-2's from here
    "position_embedding": "rope",
    "gated_mlp": True,
}
LATER_ROPE_FIELDS = {"short_factor": (), "long_factor": (), "attention_factor": 1.0}  # longrope's


def _repr_without(obj: Any, later: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """A dataclass's repr without the fields in `skip` and those of `later` at their given value."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or (f.name in later and value == later[f.name]):
            continue
        shown = _repr_without(value, LATER_ROPE_FIELDS) if f.name == "rope_scaling" else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__qualname__}({', '.join(parts)})"


def _architecture(model_cfg: LlamaConfig) -> str:
    """The config's repr with how-to-run fields neutralized, as fingerprints have always hashed it;
    the fields added later are left out at their old value (LATER_FIELDS, LATER_ROPE_FIELDS)."""
    cfg = model_cfg.replace(dtype="-", remat_policy="none")
    return _repr_without(cfg, LATER_FIELDS, skip=("seq_tile", "dequant_slices"))


def base_fingerprint(model_cfg: LlamaConfig, frozen: Any) -> str:
    """sha256 over the architecture and a sample of every frozen leaf (first and last 4 KiB)."""
    digest = hashlib.sha256(json.dumps(_architecture(model_cfg)).encode())
    for leaf in jax.tree.leaves(frozen):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # split over processes
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        flat = np.asarray(leaf).reshape(-1).view(np.uint8)
        digest.update(str(leaf.shape).encode())
        digest.update(flat[:4096].tobytes())
        digest.update(flat[-4096:].tobytes())
    return digest.hexdigest()


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree` (arrays or ShapeDtypeStructs): what a restore fills."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


_HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def _detached_from_donation(tree: Any) -> Any:
    """`tree` with every host-memory array copied; device arrays as they are.

    Orbax reads a host-memory array zero-copy and keeps that view until its background write
    ends, so the next step could not donate the array (the offloaded AdamW state): XLA refuses
    a buffer with an external reference. The copy belongs to the save alone. Device arrays need
    none: Orbax copies them to the host before `save` returns."""

    def detach(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding.memory_kind in _HOST_MEMORY_KINDS:
            return jax.device_put(x, x.sharding, may_alias=False)
        return x

    return jax.tree.map(detach, tree)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the previous complete one is untouched."""


class TrainCheckpoints:
    """Save/restore (state, record) by step, `state` any pytree of arrays (the run's TrainState);
    async saves; keeps the last `keep`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = os.path.abspath(directory)  # orbax needs absolute
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # the step whose async write may still fail
        self._failed = False  # a write failed (and CheckpointWriteError was raised)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Start saving (returns once the arrays are copied off the device; the write is async).
        The caller may donate `state` to the next step right away.

        A failure of this write or of the previous async one raises CheckpointWriteError.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_detached_from_donation(state)),
            record=ocp.args.JsonSave(record),
        )
        self._guarded(self.manager.wait_until_finished)
        self._in_flight = step
        self._guarded(lambda: self.manager.save(step, args=args))

    def restore(self, step: int, state_like: Any) -> tuple[Any, dict[str, Any]]:
        """(state, record) of `step`, shaped and placed like `state_like`."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(state_like)), record=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["record"]

    def record(self, step: int) -> dict[str, Any]:
        """Only the JSON record of `step` (cheap: checks before any array is read)."""
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def wait(self) -> None:
        """Block until the async write is done; CheckpointWriteError if it failed."""
        self._guarded(self.manager.wait_until_finished)
        self._in_flight = None

    def _guarded(self, write: Any) -> None:
        try:
            write()
        except Exception as err:
            step, self._in_flight, self._failed = self._in_flight, None, True
            raise CheckpointWriteError(
                f"checkpoint step {step} could not be written to {self.directory}: {err}; "
                f"the latest complete checkpoint is step {self._latest_on_disk()} (continue from it "
                "with --config.resume=auto once the cause, e.g. a full disk, is fixed)"
            ) from err

    def _latest_on_disk(self) -> int | None:
        """The newest complete step from the directory itself (orbax renames a step's directory
        into place once written): asking the manager after a failed write may raise again."""
        steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
        return max(steps, default=None)

    def close(self) -> None:
        """Stop orbax's background workers, so none is left running when the process exits."""
        try:
            self.manager.close()
        except Exception:
            if not self._failed:  # else it is the failed write's error again, already raised
                raise


def check_same_base(record: dict[str, Any], fingerprint: str, path: str) -> None:
    if record.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"refusing to resume: the checkpoint was trained on base {record.get('base_path')!r} "
            f"(fingerprint {str(record.get('base_fingerprint'))[:12]}), this run loads {path!r} "
            f"(fingerprint {fingerprint[:12]})"
        )


def check_optimizer_state(record: dict[str, Any], layout: str, step: int) -> None:
    """Refuse a checkpoint whose optimizer state is laid out otherwise than this version's."""
    found = record.get("optimizer_state", "one AdamW state for the whole adapter tree (before 2026-11-28)")
    if found != layout:
        raise ValueError(
            f"refusing checkpoint step {step}: it keeps the optimizer state as {found!r}, this version "
            f"as {layout!r}; start a new run (another output_dir), or export from the run's "
            "adapter/orbax (no optimizer state in it) with checkpoints/ moved aside"
        )


def save_adapter_orbax(
    directory: str, lora: Any, lora_config: dict[str, Any], base_path: str, fingerprint: str
) -> None:
    """An Orbax adapter checkpoint: the LoRA tree plus its LoraConfig (peft's dict) and base identity.

    Collective in multi-process runs: every process calls it (Orbax synchronizes them)."""
    if os.path.exists(directory) and jax.process_index() == 0:
        shutil.rmtree(directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("adapter directory cleared")
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        manager.save(
            0,
            args=ocp.args.Composite(
                lora=ocp.args.StandardSave(lora),
                record=ocp.args.JsonSave(
                    {"lora_config": lora_config, "base_path": base_path, "base_fingerprint": fingerprint}
                ),
            ),
        )
        manager.wait_until_finished()


def load_adapter_orbax(directory: str, lora_like: Any) -> tuple[Any, dict[str, Any]]:
    """(lora tree, record) from save_adapter_orbax's directory."""
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no Orbax adapter checkpoint in {directory}")
        out = manager.restore(
            0,
            args=ocp.args.Composite(
                lora=ocp.args.StandardRestore(_abstract(lora_like)),
                record=ocp.args.JsonRestore(),
            ),
        )
    return out["lora"], out["record"]
