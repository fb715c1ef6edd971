"""Shared test setup: JAX on CPU with 8 host devices (the sharding tests' meshes), deterministic,
one compilation cache per session, and the fixtures several test files share (the tiny model, one
trained run of it, the real SmolLM2 in JAX and in transformers).

Arrays and computations still default to the first device; CLI subprocesses get one device.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import filelock
import pytest

from tests import cli_runner

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# PyTorch's OpenMP pool (and numpy's OpenBLAS) default to one thread per CPU in every process; with
# one xdist worker per CPU that oversubscribes the machine, and OpenMP's spinning threads then make
# the torch references 10-20x slower (a SmolLM2 forward on a busy 2-CPU machine: 0.16 s with one
# thread, 2-4 s with two). Each xdist worker (never the controller, whose environment the workers
# inherit) gets its share of the CPUs; set before torch is imported, and inherited by the CLI
# subprocesses (the forkserver imports torch under it).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
# One XLA compilation cache for the session, shared with the CLI subprocesses (cli_env inherits
# it): the many tiny runs compile the same programs, and each compiles once. Every program is
# kept, the ~30 small ones a CLI run compiles (RNG, quantize, schedule: 0.05-0.2 s each) too: read
# back, a run's programs took 2.1 s instead of 3.9 s with only those over 0.2 s kept (busy 2 CPUs).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_DEVICES_FLAG}".strip()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The longest test files, longest first (summed `--durations=0` times of a full run on a 2-CPU
# machine shared with other work, 2026-11-27, 1,063 s in all: 9-106 s each, a session fixture
# counted in the first file to use it on its worker); the other files follow in collection order.
# `--dist loadfile` runs a file whole on one worker, so a long file handed out last leaves the
# other worker idle until it ends; handing out the longest first lets the short ones even out the
# two workers at the end.
LONGEST_FILES = [
    "tests/test_sharding.py",
    "tests/quant/test_nf4_bnb.py",
    "tests/train/test_peft_parity.py",
    "tests/io/test_checkpoint.py",
    "tests/train/test_step.py",
    "tests/models/test_llama_smollm2.py",
    "tests/models/test_families.py",
    "tests/test_sharding_cli.py",
    "tests/test_errors.py",
    "tests/models/test_llama_random.py",
    "tests/quant/test_nf4_jax.py",
    "tests/test_compare.py",
    "tests/models/test_config_and_init.py",
    "tests/io/test_bnb4bit.py",
    "tests/test_lora.py",
    "tests/test_export_cli.py",
    "tests/train/test_cli.py",
    "tests/quant/test_report.py",
    "tests/io/test_peft_export.py",
    "tests/data/test_packing.py",
]


def pytest_configure(config):
    # xdist hands out the files with the most tests first unless told not to (its
    # --loadscope-reorder default), whatever their length: keep LONGEST_FILES' order instead
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    _bitsandbytes_float32_on_every_cpu()


def _bitsandbytes_float32_on_every_cpu() -> None:
    """bitsandbytes 0.50 runs an eval-mode Linear4bit on a CPU with AVX512-BF16 through a bfloat16
    kernel (Linear4bit.forward repacks the weight for it), which moves transformers' 4-bit logits
    by ~5e-3: the references stay on its float32 path on every CPU, as on those without it."""
    import bitsandbytes.nn.modules

    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay whole


# CLI runs in the tests train the tiny model for a few steps: compiling is most of their CPU time
# and running the compiled code little of it, so their XLA compiles with LLVM's optimizations off
# (a 6-step run with an empty cache: 29 -> 22 s of CPU). The HLO programs are the same, but their
# float rounding may differ from the default's in the last bits (random_init's normal draws do), so
# a CLI run's numbers are compared with other CLI runs' exactly and with in-process ones only
# within a tolerance; a test that needs the in-process rounding in a subprocess passes
# cli_env(optimized=True). In-process tests keep the default: some run large models (SmolLM2's
# greedy generation test took 25 -> 35 s so compiled).
CLI_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def cli_env(optimized: bool = False) -> dict[str, str]:
    """The environment of a CLI command in the tests: one CPU device, the session's cache, and
    unoptimized machine code unless `optimized` (then compiled as this process compiles)."""
    xla_flags = os.environ["XLA_FLAGS"].replace(CPU_DEVICES_FLAG, "")
    if not optimized:
        xla_flags = f"{xla_flags} {CLI_COMPILE_FLAG}"
    return os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags.strip()}


def run_cli(
    command: list[str], timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A CLI command as a user runs it, from the repository root, its output captured (in a fresh
    process forked with the libraries already imported: tests/cli_runner.py)."""
    return cli_runner.run(command, REPO, env or cli_env(), timeout)


def start_cli(command: list[str], env: dict[str, str] | None = None):
    """A CLI command started as run_cli starts it, still running: a Popen-like handle (poll, wait,
    send_signal, kill, communicate) for tests that stop it or run several side by side."""
    return cli_runner.start(command, REPO, env or cli_env())


def train_command(*overrides: str) -> list[str]:
    """`python -m qlora_jax.train` on the demo recipe with overrides."""
    return [
        sys.executable,
        "-m",
        "qlora_jax.train",
        "--config",
        os.path.join(REPO, "configs/smollm2_demo.py"),
        *overrides,
    ]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer (GPT-2 style BPE, ChatML template), built from the embedded GGUF."""
    from qlora_jax.io.gguf import embedded_model_path
    from qlora_jax.io.hf import load_tokenizer

    return load_tokenizer(embedded_model_path())


def _save_tiny_model(path, seed: int, tokenizer) -> str:
    """A 2-layer random LLaMA with SmolLM2's vocabulary and tokenizer, saved as a HF directory."""
    from tests.models.hf_reference import hf_model, save, small_config

    tiny = small_config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=True,
    )
    save(hf_model(tiny, seed=seed), path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer, tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", 0, smollm2_tokenizer)


@pytest.fixture(scope="session")
def other_tiny_model(smollm2_tokenizer, tmp_path_factory):
    """tiny_model's architecture with other random weights: a different base, same shapes."""
    return _save_tiny_model(tmp_path_factory.mktemp("other_tiny") / "hf", 1, smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory, worker_id) -> str:
    """One finished 6-step CLI run of tiny_model, checkpointed at steps 3 and 6, shared by the tests
    that read a run (export, resume): copy it before changing it. Made once per session: an xdist
    worker that needs it after another made it reads that one (a CLI run: ~20 s on 2 CPUs)."""
    if worker_id == "master":  # no xdist: this process's own directory
        shared = tmp_path_factory.mktemp("tiny_run")
    else:  # every worker's base directory lies in this session's one directory
        shared = tmp_path_factory.getbasetemp().parent / "tiny_run"
        shared.mkdir(exist_ok=True)
    run_dir = shared / "run"
    with filelock.FileLock(str(shared / ".lock")):
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # a worker's unfinished attempt
            overrides = tiny_run_overrides(tiny_model, run_dir, 6)
            out = run_cli(train_command(*overrides, "--config.checkpoint.every=3"))
            assert out.returncode == 0, out.stderr[-3000:]
    return str(run_dir)


@pytest.fixture(scope="session")
def smollm2_fp32():
    """The embedded SmolLM2-135M-Instruct in our decoder, unquantized float32: (model, frozen)."""
    from qlora_jax.io.gguf import embedded_model_path
    from qlora_jax.models import llama

    return llama.from_pretrained(embedded_model_path(), quantization=None, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2():
    """The embedded SmolLM2-135M-Instruct in transformers (float32, eval mode): the reference.

    transformers' GGUF loader parses the file twice and rebuilds gguf's tensor-name map once per
    tensor (25 of its 30 s here); both are pure functions of their arguments, so they are
    memoized while it loads. The weights and config it builds are unchanged.
    """
    import functools
    from unittest import mock

    import gguf
    import torch
    import transformers

    from qlora_jax.io.gguf import embedded_model_path

    directory, name = os.path.split(embedded_model_path())
    with (
        mock.patch.object(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader)),
        mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)),
    ):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
    return model.eval()


def tiny_run_overrides(model_path: str, run_dir: str, steps: int) -> list[str]:
    """A fast CLI run of the demo recipe on the tiny model (dropout on, so resume covers the RNG)."""
    return [
        f"--config.model.path={model_path}",
        f"--config.output_dir={run_dir}",
        f"--config.train.max_steps={steps}",
        "--config.optim.warmup_steps=1",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_batches=1",
        "--config.train.exact_match_examples=0",
        "--config.data.train_path=builtin:addition:200",
        "--config.lora.dropout=0.1",
        "--config.train.batch_size=2",
        "--config.data.max_seq_len=64",
    ]
