"""Shared test setup: JAX on CPU, deterministic, no preallocation games."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
