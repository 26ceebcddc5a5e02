"""Command-line entry point of the experiments: parses a config and a workdir, then trains.

    python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo
    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \
        --workdir runs/permuted_small --config.methods=finetune --config.methods=ewc \
        --config.strength=2000

``--config.<field>=<value>`` overrides any config field (see ``experiments/config.py``);
``--overwrite`` replaces finished results already in the workdir. Installed as the console script
``ewc-jax-experiment``.

Resume is the default: run the same command again after a crash or pre-emption and it continues
from the latest complete checkpoint in the workdir (see ``experiments/checkpoint.py``); a workdir
holding another config is refused, and ``--overwrite`` discards its checkpoints and starts afresh.
Bad input (config, data files, checkpoints, workdir) ends with ``error: <what is wrong and what
to do>`` and exit status 1, before any training where it can be detected.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import checkpoint, config, loop, train, workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/configs/demo.py[:small].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the config, results and figures.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace finished results in --workdir, or another run's config and checkpoints there "
    "(refused otherwise); without it an unfinished run in --workdir resumes.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Trains and evaluates the config given on the command line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax logs every save at INFO; keep the terminal for progress bars and the summary.
    logging.set_verbosity(logging.WARNING)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except (
        config.ConfigError,
        workdir.WorkdirExistsError,
        loop.TrainingDivergedError,
        checkpoint.CheckpointError,
        # The data loaders' and scenarios' own errors name the file or dataset and the fix.
        ValueError,
        FileNotFoundError,
    ) as error:
        sys.exit(f"error: {error}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown ``--config.<field>`` reported in one clear line."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as error:  # ml_collections' "Did you mean ..." for a locked config
        text = str(error)
        guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
        if guess and guess[2] in config.RENAMED:
            sys.exit(f"error: {config.renamed_message(guess[2])}")
        what = f"{guess[2]!r} (did you mean {guess[1]!r}?)" if guess else f"({text})"
        sys.exit(
            f"error: unknown config field {what}; the fields are those of experiments/config.py"
        )


def run() -> None:
    """Console-script entry point (``ewc-jax-experiment``)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
