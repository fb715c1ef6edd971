"""RunConfig: every shipped recipe parses into typed parts, once; warmup longer than the run is
clamped with a warning."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest

from qlora_jax.lora import LoraConfig
from qlora_jax.sharding import MeshConfig
from qlora_jax.train import config
from qlora_jax.train.cli import load_recipe
from qlora_jax.train.optim import OptimConfig
from tests.conftest import REPO

RECIPES = sorted(
    str(p) for p in pathlib.Path(REPO, "configs").glob("*.py") if "def get_config" in p.read_text()
)


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_shipped_recipe_parses_for_a_four_step_smoke_run(path, capsys):
    c = load_recipe(path)
    c.train.max_steps = 4
    run = config.parse(c)
    assert isinstance(run.lora, LoraConfig) and isinstance(run.optim, OptimConfig)
    assert isinstance(run.mesh, MeshConfig) and run.optim.total_steps == 4
    assert run.optim.warmup_steps == min(c.optim.warmup_steps, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.output_dir = "elsewhere"


def test_warmup_longer_than_the_run_is_clamped_with_one_warning(capsys):
    c = load_recipe(os.path.join(REPO, "configs", "smollm2_demo.py"))
    c.train.max_steps = 4
    assert c.optim.warmup_steps == 10 and c.optim.schedule == "cosine"
    run = config.parse(c)
    assert run.optim.warmup_steps == 4
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "warning: optim.warmup_steps=10 exceeds train.max_steps=4: warmup clamped to 4 steps "
        "(the learning rate rises for the whole run)"
    ]
