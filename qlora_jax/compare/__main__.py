"""python -m qlora_jax.compare --config configs/<recipe>.py [--config.model.dtype=float32 ...]"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from qlora_jax.train import cli, config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file defining get_config().", lock_config=True
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    from qlora_jax.compare.run import compare  # imports PyTorch

    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        compare(config.parse(_CONFIG.value))
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(cli.BAD_INPUT)


if __name__ == "__main__":
    cli.run(main)
