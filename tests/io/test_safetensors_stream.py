"""Our streaming safetensors reader/writer against the `safetensors` library (bf16 included)."""

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_jax.io.safetensors_stream import SafetensorsFile, write


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert sorted(f.names()) == ["a", "b", "c"] and f.metadata == {"format": "pt"}
    assert f.read("a").dtype == ml_dtypes.bfloat16
    for name, t in tensors.items():
        np.testing.assert_array_equal(f.read(name).astype(np.float64), t.double().numpy())


def test_files_we_write_load_in_safetensors(tmp_path):
    arrays = {
        "w": np.random.default_rng(0).standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        "u": np.arange(5, dtype=np.uint8),
    }
    write(str(tmp_path / "y.safetensors"), arrays, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(loaded["w"].float().numpy(), arrays["w"].astype(np.float32))
    np.testing.assert_array_equal(loaded["u"].numpy(), arrays["u"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SafetensorsFile(str(tmp_path / "nope.safetensors"))
