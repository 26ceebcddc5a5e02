"""Command-line entry point of the experiments: parses a config and a workdir, then trains.

    python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo
    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \\
        --workdir runs/permuted_small --config.methods=finetune --config.methods=ewc \\
        --config.strength=2000

``--config.<field>=<value>`` overrides any config field; every field, its meaning and its valid
values are documented in ``experiments/config/defaults.py`` (the ready-made configs are in
``experiments/configs/``). ``--overwrite`` replaces finished results already in the workdir, and
keeps them until the new run has finished. Runs from a clone (the wheel ships the library only).

Resume is the default: run the same command again after a crash, pre-emption or Ctrl-C and it
continues from the latest complete checkpoint in the workdir (see
``experiments/storage/checkpoint.py``); a workdir holding another config is refused, and
``--overwrite`` discards its checkpoints and starts afresh. One run at a time may use a workdir.
SIGINT (Ctrl-C) and SIGTERM stop at the next safe point (the end of an epoch), save a checkpoint
and exit with status 130 and 143. The guide: ``docs/experiments.md``.

Bad input (config, config file, data files, checkpoints, workdir, disk, missing TensorFlow)
ends with one line ``error: <what is wrong and what to do>`` on stderr and exit status 1,
before any training where it can be detected; a traceback means a bug in this code.
"""

import importlib.util
import os
import signal
import sys
import traceback
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import config
from experiments.data import MissingDependencyError
from experiments.runs.experiment import train_and_evaluate
from experiments.storage import checkpoint, workdir
from experiments.training.loop import TrainingDivergedError
from experiments.training.signals import Interrupted, stop_on_signals

CONFIGS = Path(__file__).resolve().parent / "configs"

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/configs/demo.py[:small] (a path, absolute or "
    "relative to the current directory). Override its fields with --config.<field>=<value>; "
    "every field is documented in experiments/config/defaults.py.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for the config, checkpoints, results and figures; created if missing. Rerunning "
    "the same command there resumes an unfinished run.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace finished results in --workdir (kept until the new run has finished), or another "
    "run's config and checkpoints there (refused otherwise); without it an unfinished run in "
    "--workdir resumes.",
)
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = (
    config.ConfigError,
    workdir.WorkdirExistsError,
    workdir.WorkdirBusyError,
    workdir.WorkdirUnusableError,
    TrainingDivergedError,
    checkpoint.CheckpointError,
    MissingDependencyError,
    # The data loaders' and scenarios' own errors name the file or dataset and the fix.
    ValueError,
    FileNotFoundError,
    ConnectionError,
)
"""What the CLI reports in one line; anything else is a bug and keeps its traceback."""
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def main(argv: list[str]) -> None:
    """Trains and evaluates the config given on the command line."""
    del argv  # parse_flags refused positional arguments
    # Orbax logs every save at INFO, TFDS its probes of a missing dataset at WARNING, and a
    # failed save's thread tracebacks at ERROR before it raises: the one-line error below says
    # what failed. Keep the terminal for progress.
    logging.set_verbosity(logging.FATAL)
    try:
        with stop_on_signals():
            train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except Interrupted as stop:
        print(interrupted_message(stop.signum, _WORKDIR.value, _OVERWRITE.value), file=sys.stderr)
        sys.exit(EXIT_STATUS[stop.signum])
    except USER_ERRORS as error:
        sys.exit(f"error: {resume_advice(str(error), _OVERWRITE.value)}")
    except OSError as error:
        if checkpoint.os_error_in(error) is None or error.filename is None:
            raise
        # A full or read-only disk where results, figures or data are written.
        message = workdir.unusable_message(error.filename, error)
        sys.exit(f"error: {resume_advice(message, _OVERWRITE.value)}")


def resume_advice(message: str, overwrite: bool) -> str:
    """``message`` with its advice to rerun made true of an ``--overwrite`` run: rerunning with
    ``--overwrite`` starts afresh from task 1; without it, the run resumes."""
    if not overwrite or "rerun the same command" not in message:
        return message
    return message.replace(
        "rerun the same command",
        "rerun the command without --overwrite (with it, the run starts afresh from task 1)",
    )


def interrupted_message(signum: int, workdir_path: str, overwrite: bool) -> str:
    """The line printed when SIGINT or SIGTERM stopped the run."""
    name = signal.Signals(signum).name
    resume = (
        "rerun the command without --overwrite to resume (with it, the run starts afresh)"
        if overwrite
        else "rerun the same command to resume"
    )
    return (
        f"interrupted by {name}: progress up to the last checkpoint in {workdir_path} is kept; "
        f"{resume}"
    )


def check_config_file(spec: str) -> None:
    """Loads ``--config``'s file as ml_collections will, and exits with one line if it cannot:
    no such file, a syntax error, an exception on import or in ``get_config`` (an unknown
    variant, say), or a ``get_config`` that returns no ``ConfigDict``."""
    # ``file.py:variant``: the file is what precedes the first ':' (as ml_collections splits it).
    path, _, variant = spec.partition(":")
    if os.path.isfile(spec):
        path, variant = spec, ""
    if not os.path.isfile(path):
        available = ", ".join(sorted(p.name for p in CONFIGS.glob("*.py") if p.stem != "__init__"))
        where = "" if Path(path).is_absolute() else f" (relative to {os.getcwd()})"
        shipped = CONFIGS.parent.parent / path
        hint = f"did you mean {shipped}? " if shipped.is_file() else ""
        sys.exit(
            f"error: --config file {path} does not exist{where}; {hint}the configs shipped are "
            f"{available} in {CONFIGS}"
        )
    try:
        loader = importlib.util.spec_from_file_location("_checked_config", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        value = module.get_config(variant) if variant else module.get_config()
    except SyntaxError as error:
        sys.exit(f"error: --config {path}: syntax error on line {error.lineno}: {error.msg}")
    except Exception as error:  # the config file's own code: name it and its line
        frames = traceback.extract_tb(error.__traceback__)
        lines = [f.lineno for f in frames if Path(f.filename).resolve() == Path(path).resolve()]
        where = f" (line {lines[-1]})" if lines else ""
        text = str(error) or type(error).__name__
        if not isinstance(error, ValueError | TypeError):
            text = f"{type(error).__name__}: {text}"
        sys.exit(f"error: --config {path}{where}: {text}")
    if not isinstance(value, ml_collections.ConfigDict):
        sys.exit(
            f"error: --config {path}: get_config() returned {type(value).__name__}, not an "
            "ml_collections.ConfigDict (a missing return statement?)"
        )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every bad flag, config file, ``--config.<field>`` and
    positional argument reported in one line: ``error: ...`` and exit status 1."""
    if any(arg in ("-h", "-?", "--help", "-help", "--helpshort") for arg in argv[1:]):
        # absl's own --help lists the flags of sys.argv[0]'s module: none for the console script.
        print(f"{__doc__}\nflags:\n{flags.FLAGS.module_help(sys.modules[__name__])}")
        print("\nTry --helpfull to get a list of all flags.")
        sys.exit(0)
    for index, arg in enumerate(argv[1:], start=1):
        name, equals, value = arg.partition("=")
        if name in ("--config", "-config"):
            check_config_file(value if equals else (argv[index + 1 :] or [""])[0])
        elif name.startswith(("--config.", "-config.")):
            try:
                config.check_override(name.split("config.", 1)[1])
            except config.ConfigError as error:
                sys.exit(f"error: {error}")
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        sys.exit(f"error: {text} (see --help)")
    if len(remaining) > 1:
        sys.exit(
            f"error: unexpected argument(s) {' '.join(remaining[1:])}: every setting is a flag, "
            "e.g. --config experiments/configs/demo.py --workdir runs/demo (see --help)"
        )
    return remaining


def run() -> None:
    """The CLI: parses the flags and runs :func:`main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
