"""Bad input and faults: one clear line naming the key, file, row or tensor, and nothing lost.

CLI tests run `python -m qlora_jax.train` as a user does; rows that fail before any weight is read
cost a couple of seconds each. The cheaper rows are checked on the functions behind them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qlora_jax.data import pipeline, sources
from qlora_jax.data.formats import Example, FormatConfig
from qlora_jax.io import hf
from qlora_jax.io.checkpoint import CheckpointWriteError, TrainCheckpoints
from qlora_jax.io.hf import load_tokenizer
from qlora_jax.io.safetensors_stream import SafetensorsFile, write
from qlora_jax.models.frozen import Quantization
from qlora_jax.train import config
from qlora_jax.train.run_dir import prepare_run_dir
from tests.conftest import REPO, run_cli, tiny_run_overrides, train_command

sys.path.insert(0, os.path.join(REPO, "configs"))
from base import base_config  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def open_text(*parts) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def _train(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(command or train_command(*args))


def _error_line(out: subprocess.CompletedProcess, code: int = 2) -> str:
    """The last stderr line, after checking the exit code and that no traceback was printed."""
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return out.stderr.strip().splitlines()[-1]


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--config.lora.rnak=8", "error: unknown config key 'lora.rnak': no 'rnak' in lora; valid there:"),
        ("--config.optim.lr=fast", "error: optim.lr='fast': expected float (the recipe has 0.001)"),
        ("--config.lora.r=0", "error: lora.r=0: must be an integer >= 1"),
        ("--config.lora.dropout=1.0", "error: lora.dropout=1.0: must be a number in [0, 1)"),
        ("--config.optim.lr=0", "error: optim.lr=0.0: must be a number in (0, inf)"),
        (
            "--config.data.max_seq_len=65",
            "error: data.max_seq_len=65: above the model's max_position_embeddings=64; valid: 2..64",
        ),
        ("--config.lora.target_modules=qkv_proj", "error: lora.target_modules=('qkv_proj',) (layers_to"),
        (
            "--config.model.block_size=4096",
            "error: model.block_size=4096: self_attn.k_proj weight (32, 64) has 2048 elements, not a",
        ),
    ],
)
def test_bad_config_value_exits_2_with_one_line(tiny_model, tmp_path, override, expected):
    run = tmp_path / "run"
    out = _train(
        f"--config.model.path={tiny_model}",
        f"--config.output_dir={run}",
        "--config.data.max_seq_len=64",
        override,
    )
    assert _error_line(out).startswith(expected)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    out = _train(f"--config.output_dir={tmp_path}", "--config.lora.r=0", "--debug")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "in validate" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: lora.r=0: must be an integer >= 1"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora.r", -3, "lora.r=-3: must be an integer >= 1"),
        ("lora.dropout", -0.1, "lora.dropout=-0.1: must be a number in [0, 1)"),
        ("optim.lr", -1e-4, "optim.lr=-0.0001: must be a number in (0, inf)"),
        ("train.batch_size", 0, "train.batch_size=0: must be an integer >= 1"),
        ("data.max_seq_len", 1, "data.max_seq_len=1: must be an integer >= 2"),
        ("model.block_size", 100, "model.block_size=100: valid: 32, 64, 128"),
        ("model.quantization", "int8", "model.quantization='int8': valid: 'nf4', 'fp4', 'none'"),
        ("train.nonfinite", "ignore", "train.nonfinite='ignore': valid: 'stop', 'skip'"),
        ("resume", "yes", "resume='yes': valid: '', 'auto'"),
        ("lora.target_modules", "q_proj|(", "lora.target_modules='q_proj|(': not a valid regex"),
    ],
)
def test_validate_names_key_value_and_what_is_valid(key, value, message):
    c = base_config()
    group, _, name = key.rpartition(".")
    (c[group] if group else c)[name] = value
    with pytest.raises(config.ConfigError) as err:
        config.parse(c)
    assert str(err.value).startswith(message)


def test_base_config_is_valid():
    config.parse(base_config())


# --- model ----------------------------------------------------------------------------------------


def test_missing_model_path_exits_2_naming_it(tmp_path):
    out = _train(f"--config.output_dir={tmp_path}", "--config.model.path=/no/such/model")
    assert _error_line(out) == (
        "error: no model at '/no/such/model': expected a HF directory with config.json or a .gguf file"
    )


def test_directory_without_config_json_names_the_file(tiny_model, tmp_path):
    shutil.copy(os.path.join(tiny_model, "model.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/config.json not found")):
        hf.load_config(str(tmp_path))


def test_safetensors_missing_a_tensor_names_file_and_tensor(tiny_model, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    weights = SafetensorsFile(str(model_dir / "model.safetensors"))
    gone = "model.layers.1.mlp.down_proj.weight"
    write(str(model_dir / "model.safetensors"), {n: weights.read(n) for n in weights.names() if n != gone})
    with pytest.raises(KeyError, match=re.escape(f"{model_dir}/model.safetensors: no tensor '{gone}'")):
        hf.load(str(model_dir), Quantization("nf4"), "float32")


def _tiny_gguf(path, arch: str, norm: np.ndarray) -> str:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_of_an_unsupported_architecture_names_the_file(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf", "falcon", np.ones(64, np.float32))
    valid = "llama, qwen2, qwen3, phi3, gemma2, gemma3, gpt2"
    message = f"{path}: GGUF architecture 'falcon' is not supported; valid: {valid}"
    with pytest.raises(ValueError, match=re.escape(message)):
        hf.load_config(path)


def test_gguf_tensor_of_an_unsupported_type_names_file_and_tensor(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf", "llama", np.ones(64, np.int32))
    assert hf.load_config(path).vocab_size == 100
    with pytest.raises(ValueError, match=re.escape(f"{path}: blk.0.attn_norm.weight has GGUF type I32")):
        hf.load(path, Quantization("nf4"), "float32")


def test_tokenizer_larger_than_the_embedding_names_both_sizes(tiny_model, tmp_path):
    model_dir = tmp_path / "small_vocab"
    model_dir.mkdir()
    config = json.loads(open_text(tiny_model, "config.json")) | {"vocab_size": 1000}
    (model_dir / "config.json").write_text(json.dumps(config))
    out = _train(
        f"--config.model.path={model_dir}",
        f"--config.model.tokenizer={tiny_model}",
        f"--config.output_dir={tmp_path / 'run'}",
        "--config.data.max_seq_len=64",
    )
    assert _error_line(out) == (
        f"error: tokenizer '{tiny_model}' has 49152 tokens but model '{model_dir}' has 1000 embedding "
        "rows (vocab_size); use the tokenizer saved with the model"
    )


# --- data -----------------------------------------------------------------------------------------


def test_missing_data_file_exits_2(tiny_model, tmp_path):
    out = _train(
        *tiny_run_overrides(tiny_model, tmp_path / "run", 2), "--config.data.train_path=/no/such.jsonl"
    )
    assert _error_line(out) == "error: data file not found: /no/such.jsonl"


def test_malformed_json_line_names_file_and_line_through_the_cli(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", completion: "d"}\n')
    out = _train(*tiny_run_overrides(tiny_model, tmp_path / "run", 2), f"--config.data.train_path={data}")
    assert _error_line(out) == (
        f"error: {data}:2: malformed JSON line: Expecting property name enclosed in double quotes (column 17)"
    )


def test_non_utf8_bytes_name_file_line_and_byte_offset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{data}:2: not UTF-8: byte 0xe9 at byte offset 30")):
        sources.load_rows(str(data))


def test_missing_field_names_the_field_the_row_and_the_file(tokenizer, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    rows = sources.load_rows(str(data))
    message = f"{data}: row 1: format 'prompt_completion' needs keys ['prompt', 'completion'], missing "
    with pytest.raises(ValueError, match=re.escape(message + "['completion']; row has ['prompt']")):
        pipeline.tokenize(rows, tokenizer, FormatConfig(), str(data))


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset_names_the_file(tmp_path, content):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{data}: empty dataset")):
        sources.load_rows(str(data))


def test_every_example_too_long_reports_how_many_were_truncated_and_dropped():
    prompt_only = [Example(list(range(40)), [False] * 30 + [True] * 10) for _ in range(5)]
    batches = pipeline.BatchIterator(prompt_only, pipeline.BatchingConfig(max_seq_len=16, batch_size=1))
    with pytest.raises(
        ValueError,
        match=r"every example is longer than data.max_seq_len=16: 5 of 5 examples truncated \(115 tokens "
        r"cut\), 5 dropped with no loss token left; the longest has 40 tokens",
    ):
        next(batches)
    mixed = prompt_only[:2] + [Example(list(range(8)), [False, *[True] * 7])] * 3
    batches = pipeline.BatchIterator(mixed, pipeline.BatchingConfig(max_seq_len=16, batch_size=1))
    assert batches.batches_per_epoch() == 2  # three short examples in two packed rows, two dropped
    assert batches.truncation.describe() == (
        "2 of 5 examples truncated (46 tokens cut), 2 dropped with no loss token left"
    )


def test_chat_format_without_a_chat_template_says_so(tiny_model):
    plain = load_tokenizer(tiny_model)
    plain.chat_template = None
    with pytest.raises(
        ValueError, match="d.jsonl: data.format='chat' needs a tokenizer with a chat template"
    ):
        pipeline.tokenize([{"prompt": "a", "completion": "b"}], plain, FormatConfig("chat"), "d.jsonl")


# --- numerics -------------------------------------------------------------------------------------


def _rows(run_dir) -> dict[int, dict]:
    merged: dict[int, dict] = {}  # train and eval rows of a step together
    for line in open_text(run_dir, "metrics.jsonl").splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)
    return merged


def _saved_lora(run_dir, step: int) -> list[np.ndarray]:
    ckpts = TrainCheckpoints(str(run_dir / "checkpoints"))
    restored = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"]["lora"])]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_model, tmp_path):
    """lr=1e30 (0 at step 1: warmup) blows the adapter up at step 2; step 3's loss is not finite."""
    run = tmp_path / "run"
    overrides = [
        *tiny_run_overrides(tiny_model, run, 8),
        "--config.optim.lr=1e30",
        "--config.checkpoint.every=2",
    ]
    line = _error_line(_train(*overrides), code=1)
    assert line.startswith(
        "error: loss nan, gradient norm nan at step 3: stopped (last checkpoint: step 2 in "
    )
    assert sorted(_rows(run)) == [1, 2]
    # the failed run flushed its TensorBoard scalars too (the "loss" tag of steps 1 and 2)
    events = [p for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1 and b"loss" in events[0].read_bytes()
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]
    assert TrainCheckpoints(str(run / "checkpoints")).record(2)["step"] == 2
    assert all(np.isfinite(x).all() for x in _saved_lora(run, 2))


def test_nonfinite_skip_counts_skipped_batches_and_applies_no_update(tiny_model, tmp_path):
    run = tmp_path / "run"
    overrides = [
        *tiny_run_overrides(tiny_model, run, 5),
        "--config.optim.lr=1e30",
        "--config.checkpoint.every=2",
        "--config.checkpoint.keep=5",
        "--config.train.nonfinite=skip",
    ]
    out = _train(*overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss nan, gradient norm nan at step 3: batch skipped, no update (1 skipped so far)" in out.stdout
    rows = _rows(run)
    assert [rows[s].get("skipped_steps") for s in (3, 4, 5)] == [1, 2, 3]
    assert all("loss" in rows[s] for s in (1, 2)) and not any("loss" in rows[s] for s in (3, 4, 5))
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 3
    # skipped steps apply no update: the exported adapter is finite (it holds step 2's huge update)
    # and the step-4 checkpoint equals the step-2 one
    adapter = SafetensorsFile(str(run / "adapter" / "adapter_model.safetensors"))
    final = {n: adapter.read(n) for n in adapter.names()}
    assert all(np.isfinite(v).all() for v in final.values())
    assert max(float(np.abs(v).max()) for v in final.values()) > 1e20
    for a, b in zip(_saved_lora(run, 4), _saved_lora(run, 2), strict=True):
        np.testing.assert_array_equal(a, b)


# --- faults ---------------------------------------------------------------------------------------


def _no_space(monkeypatch) -> None:
    """Make Orbax's JSON record write fail as a full disk does (it runs in the async commit thread)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def full_disk(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpts = TrainCheckpoints(str(tmp_path), keep=3)
    lora, state = {"a": jnp.arange(4.0)}, {"m": jnp.ones(3)}
    ckpts.save(1, {"lora": lora, "opt_state": state}, {"step": 1})
    ckpts.wait()
    _no_space(monkeypatch)
    ckpts.save(2, {"lora": {"a": lora["a"] * 2}, "opt_state": state}, {"step": 2})
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint step 2 could not be written to .*No space left on device.*the latest complete "
        r"checkpoint is step 1",
    ):
        ckpts.wait()
    # the claim in io/checkpoint.py: the failed save never got its final name
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    monkeypatch.undo()
    resumed = TrainCheckpoints(str(tmp_path), keep=3)  # what resume=auto opens
    assert resumed.latest_step() == 1
    restored_state, record = resumed.restore(1, {"lora": lora, "opt_state": state})
    restored = restored_state["lora"]
    assert record == {"step": 1} and restored["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    # Replacing the leftover temporary directory is the CLI test's below, in a new process as a
    # real resume is: here the failed save's array write may still be running (Orbax stops waiting
    # at the first failed part), and removing a directory being written races with it.


def test_disk_full_during_a_run_reports_it_and_resume_continues(tiny_model, tmp_path):
    """The real CLI with the record write failing from the second checkpoint on."""
    run = tmp_path / "run"
    driver = tmp_path / "full_disk.py"
    driver.write_text(
        "import errno, os, runpy, sys\n"
        "from orbax.checkpoint._src.handlers import json_checkpoint_handler as h\n"
        "real = h.JsonCheckpointHandler._save_fn\n"
        "async def save(self, item, directory):\n"
        "    if item['step'] >= 4:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))\n"
        "    await real(self, item, directory)\n"
        "h.JsonCheckpointHandler._save_fn = save\n"
        "runpy.run_module('qlora_jax.train', run_name='__main__')\n"
    )
    # 6 steps as tiny_run (the schedule's length is compiled into the step): both runs here use
    # the session's cached compile of tiny_run's step; the save at step 4 fails before the end
    overrides = [*tiny_run_overrides(tiny_model, run, 6), "--config.checkpoint.every=2"]
    out = _train(command=[sys.executable, str(driver), *train_command(*overrides)[3:]])
    assert out.returncode == 1, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint step 4 could not be written to "), out.stderr[-3000:]
    assert "No space left on device" in line and "the latest complete checkpoint is step 2" in line
    resumed = _train(
        *tiny_run_overrides(tiny_model, run, 6), "--config.checkpoint.every=2", "--config.resume=auto"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    # the failed save's leftover temporary directory was replaced by the resumed run's step 4
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4", "6"]


def test_second_run_into_the_same_output_dir_refuses(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    out = _train(f"--config.output_dir={tmp_path}")
    assert _error_line(out) == (
        f"error: output_dir='{tmp_path}' already holds a run (metrics.jsonl); continue it with "
        "--config.resume=auto or replace it with --config.overwrite=True"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_overwrite_replaces_the_earlier_run_files_only(tmp_path):
    out = str(tmp_path)
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(config.ConfigError, match="already holds a run"):
        prepare_run_dir(out, resume=False, overwrite=False)
    prepare_run_dir(out, resume=False, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    prepare_run_dir(out, resume=True, overwrite=False)  # resuming is not overwriting
    assert (tmp_path / "metrics.jsonl").exists()
