"""GGUF reading: the embedded default model streams as float32 tensors in PyTorch layout."""

import pytest

from qlora_jax.io import gguf as gguf_io


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        next(gguf_io.iter_tensors(str(missing)))


def test_embedded_model_first_layer_shapes():
    """SmolLM2-135M: hidden 576, 9 query / 3 key-value heads of 64, MLP 1536; (out, in) layout."""
    shapes = {}
    for name, tensor in gguf_io.iter_tensors(gguf_io.embedded_model_path()):
        if name.startswith("blk.0."):
            shapes[name.removeprefix("blk.0.")] = tensor.shape
        elif name.startswith("blk.1."):
            break
    assert shapes["attn_q.weight"] == (576, 576)
    assert shapes["attn_k.weight"] == (192, 576)
    assert shapes["ffn_gate.weight"] == (1536, 576)
    assert shapes["ffn_down.weight"] == (576, 1536)
    assert shapes["attn_norm.weight"] == (576,)
