"""A run's parts from its typed config: model and tokenizer (cheap checks first), weights, data."""

from __future__ import annotations

from typing import Any

import numpy as np

from qlora_jax.data import pipeline, sources
from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.io.hf import load_config, load_tokenizer
from qlora_jax.models import llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.decoder import Llama
from qlora_jax.models.presets import PRESETS
from qlora_jax.train.config import ConfigError, DataSettings, ModelSettings, RunConfig, check_against_model


def check_tokenizer(tokenizer: Any, tokenizer_path: str, model_cfg: LlamaConfig, model_path: str) -> None:
    """Token ids past the embedding rows would index garbage: refuse a tokenizer larger than the model's."""
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but model {model_path!r} has "
            f"{model_cfg.vocab_size} embedding rows (vocab_size); use the tokenizer saved with the model"
        )


def runtime(m: ModelSettings) -> dict[str, Any]:
    """How to run the model (LlamaConfig's runtime fields), from the model settings."""
    return {"remat_policy": m.remat_policy, "seq_tile": m.seq_tile, "dequant_slices": m.dequant_slices}


def open_model(run: RunConfig) -> tuple[str, LlamaConfig, Any]:
    """(model path, architecture, tokenizer), all cheap to read; the settings are checked against the
    architecture (config.json / GGUF metadata) so a bad value stops before any weight is read."""
    m = run.model
    path = m.path or embedded_model_path()
    model_cfg = PRESETS[path] if path in PRESETS else load_config(path, **runtime(m))
    check_against_model(run, model_cfg)
    tokenizer_path = m.tokenizer or ("" if path in PRESETS else path)
    if not tokenizer_path:
        raise ConfigError(f"model.path={path!r} is a preset: set model.tokenizer to tokenize data")
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer(tokenizer, tokenizer_path, model_cfg, path)
    return path, model_cfg, tokenizer


def load_weights(m: ModelSettings, path: str, seed: int, mesh: Any = None) -> tuple[Llama, Any]:
    """(model, frozen): random weights for a preset name, else streamed and quantized from the file;
    with a mesh each device gets only its share (never the whole base); the embedding and head
    tables in host memory with model.offload_embeddings and model.offload_head."""
    placed = {"mesh": mesh, "offload_embeddings": m.offload_embeddings, "offload_head": m.offload_head}
    if path in PRESETS:
        return llama.random_init(path, m.quantization, m.dtype, seed=seed, **placed, **runtime(m))
    return llama.from_pretrained(path, m.quantization, m.dtype, **placed, **runtime(m))


def load_model(run: RunConfig) -> tuple[Llama, Any, Any]:
    """(model, frozen, tokenizer) from model.path: a file/dir, a preset name, or "" (embedded)."""
    path, _, tokenizer = open_model(run)
    return *load_weights(run.model, path, run.train.seed), tokenizer


Rows = tuple[list[dict], list[dict] | None]  # (train rows, eval rows or None: held out of train)


def read_rows(data: DataSettings) -> Rows:
    """The data files read and checked (missing, not UTF-8, malformed JSON) before the tokenizer or
    any weight is read, so a bad path stops a run at once."""
    seed = data.batching.seed
    eval_rows = sources.load_rows(data.eval_path, "eval", seed) if data.eval_path else None
    return sources.load_rows(data.train_path, "train", seed), eval_rows


def load_examples(data: DataSettings, rows: Rows, tokenizer: Any) -> tuple[list, list[dict], list]:
    """(train examples, eval rows, eval examples); without data.eval_path a seeded fraction is held out.

    Rows are tokenized in file order, so a malformed row's error gives its index in the file.
    """
    train_rows, eval_rows = rows
    examples = pipeline.tokenize(train_rows, tokenizer, data.format, data.train_path)
    if eval_rows is not None:
        return examples, eval_rows, pipeline.tokenize(eval_rows, tokenizer, data.format, data.eval_path)
    n_eval = int(len(train_rows) * data.eval_fraction)
    order = np.random.default_rng(data.batching.seed).permutation(len(train_rows))
    held_out = order[:n_eval]
    return (
        [examples[i] for i in order[n_eval:]],
        [train_rows[i] for i in held_out],
        [examples[i] for i in held_out],
    )


def load_data(
    data: DataSettings, rows: Rows, eval_batches: int, tokenizer: Any
) -> tuple[pipeline.BatchIterator, list[dict], list[dict]]:
    """(train batches, eval rows, eval batches capped at `eval_batches` (0: all)), as a run sees them."""
    train_examples, eval_rows, eval_examples = load_examples(data, rows, tokenizer)
    eval_set = pipeline.eval_batches(eval_examples, data.batching) if eval_examples else []
    if eval_batches:
        eval_set = eval_set[:eval_batches]
    return pipeline.BatchIterator(train_examples, data.batching), eval_rows, eval_set
