"""python -m qlora_jax.train --config configs/<recipe>.py [--config.optim.lr=1e-4 ...] [--debug]

Bad input (config, model or data files) exits with code 2 and one `error:` line; a run that fails
(non-finite loss, a checkpoint that cannot be written) exits with code 1. --debug adds the traceback.
"""

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from qlora_jax.io.checkpoint import CheckpointWriteError
from qlora_jax.train import cli, config
from qlora_jax.train.hooks import TrainingDiverged
from qlora_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file defining get_config().", lock_config=True
)
_DEBUG = flags.DEFINE_boolean("debug", False, "Print the traceback of an error, not only its one line.")
flags.mark_flags_as_required(["config"])
RUN_FAILED = 1


def _fail(err: BaseException, code: int) -> None:
    if _DEBUG.value:
        traceback.print_exc()
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() quotes
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # absl would print every JAX INFO line
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.size_host_pool()
    cli.use_compilation_cache()
    try:
        train_and_evaluate(config.parse(_CONFIG.value))
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err, cli.BAD_INPUT)
    except (TrainingDiverged, CheckpointWriteError) as err:
        _fail(err, RUN_FAILED)


if __name__ == "__main__":
    cli.run(main)
