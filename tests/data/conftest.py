import pytest

from qlora_jax.io.gguf import embedded_model_path
from qlora_jax.io.hf import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (GPT-2 style BPE, ChatML template), built from the embedded GGUF."""
    return load_tokenizer(embedded_model_path())
