"""Command-line entry point of the experiments: parses a config and a workdir, then trains.

    python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo
    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \
        --workdir runs/permuted_small --config.methods=finetune,l2,ewc --config.strength=2000

``--config.<field>=<value>`` overrides any config field (see ``experiments/configs/default.py``);
``--overwrite`` replaces finished results already in the workdir. Installed as the console script
``ewc-jax-experiment``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/configs/demo.py[:small].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the config, results and figures.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace finished results in --workdir (refused otherwise)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Trains and evaluates the config given on the command line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except (train.ConfigError, train.WorkdirExistsError, train.TrainingDivergedError) as error:
        sys.exit(f"error: {error}")


def run() -> None:
    """Console-script entry point (``ewc-jax-experiment``)."""
    app.run(main)


if __name__ == "__main__":
    run()
