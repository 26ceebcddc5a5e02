"""Every bad input of the experiments gets a message that says what is wrong and what to do.

One table, one row per bad input: each goes through the entry point a user calls
(:func:`experiments.runs.experiment.train_and_evaluate`, which the CLI wraps, or the ``ewc_jax``
call for
library-level inputs), must raise with the expected message, and must leave no ``results.json``
that would look like a finished run, or leave earlier finished results (``results.json`` beside
its own ``config.json``, ``metrics.csv`` and figures) byte for byte as they were. The CLI's own
cases (signals, the workdir lock, config files, TFDS) are in ``tests/test_cli_safety.py``.
"""

import errno
import functools
import gzip
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import ewc_jax
from experiments import config, data
from experiments.configs import default
from experiments.reporting import plots
from experiments.runs import experiment as train
from experiments.storage import checkpoint, workdir
from experiments.storage import workdir as workdir_lib
from experiments.training import loop

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def digits() -> data.Dataset:
    return data.load_dataset("embedded:digits")


def tiny_config(**overrides):
    config = default.get_config()
    config.datasets = ("embedded:digits",)
    config.num_tasks = 2
    config.hidden_sizes = (16,)
    config.fisher_samples = 16
    config.steps_per_task = 4
    for field, value in overrides.items():
        config[field] = value
    return config


def loader_of(dataset: data.Dataset) -> Callable[..., data.Dataset]:
    def load(spec, data_dir=None):
        del spec, data_dir
        return dataset

    return load


def with_train(**changes) -> data.Dataset:
    return digits()._replace(**changes)


def write_idx(path: Path, array: np.ndarray, magic_dtype: int = 0x08) -> None:
    header = bytes([0, 0, magic_dtype, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def idx_dir(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    write_idx(directory / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 5, 4)))
    write_idx(directory / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 5, 4)))
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
    return directory


def run(config, workdir: Path, **kwargs) -> Callable[[], object]:
    return lambda: train.train_and_evaluate(config, workdir, **kwargs)


# Each case: (tmp_path, workdir) -> the call that must fail.


def nan_pixels(tmp, workdir):
    images = digits().train_images.copy()
    images[3, 0, 0, 0] = np.nan
    return run(tiny_config(), workdir, load_dataset=loader_of(with_train(train_images=images)))


def inf_pixels(tmp, workdir):
    images = digits().test_images.copy()
    images[0, 1, 1, 0] = np.inf
    return run(tiny_config(), workdir, load_dataset=loader_of(with_train(test_images=images)))


def label_out_of_range(tmp, workdir):
    labels = digits().train_labels.copy()
    labels[5] = 10
    return run(tiny_config(), workdir, load_dataset=loader_of(with_train(train_labels=labels)))


def images_not_nhwc(tmp, workdir):
    images = digits().train_images[..., 0]
    return run(tiny_config(), workdir, load_dataset=loader_of(with_train(train_images=images)))


def train_and_test_shapes_differ(tmp, workdir):
    images = np.zeros((len(digits().test_labels), 28, 28, 1), np.float32)
    return run(tiny_config(), workdir, load_dataset=loader_of(with_train(test_images=images)))


def sequence_of_different_shapes(tmp, workdir):
    config = tiny_config(
        scenario="sequence", datasets=("embedded:digits", f"idx:{idx_dir(tmp / 'i')}")
    )
    return run(config, workdir)


def empty_split(tmp, workdir):
    empty = with_train(
        train_images=digits().train_images[:0], train_labels=digits().train_labels[:0]
    )
    return run(tiny_config(), workdir, load_dataset=loader_of(empty))


def empty_task(tmp, workdir):
    keep = digits().train_labels < 8  # no 8s and 9s to train on
    dataset = with_train(
        train_images=digits().train_images[keep], train_labels=digits().train_labels[keep]
    )
    config = tiny_config(scenario="split", class_groups=((0, 1), (8, 9)))
    return run(config, workdir, load_dataset=loader_of(dataset))


def one_permuted_task(tmp, workdir):
    return run(tiny_config(num_tasks=1), workdir)


def one_split_task(tmp, workdir):
    return run(tiny_config(scenario="split", class_groups=((0, 1),)), workdir)


def mismatched_fisher_tree(tmp, workdir):
    params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    fisher = {"dense": {"kernel": jnp.ones((2, 3)), "scale": jnp.zeros(3)}}
    return lambda: ewc_jax.consolidate(None, params, fisher)


def negative_strength_config(tmp, workdir):
    return run(tiny_config(strength=-1.0), workdir)


def negative_strength_library(tmp, workdir):
    params = {"w": jnp.ones(3)}
    state = ewc_jax.consolidate(None, params, {"w": jnp.ones(3)})
    return lambda: ewc_jax.penalty(params, state, -1.0)


def gamma_above_one_config(tmp, workdir):
    return run(tiny_config(methods=("online_ewc",), gamma=1.5), workdir)


def gamma_below_zero_library(tmp, workdir):
    params = {"w": jnp.ones(3)}
    return lambda: ewc_jax.consolidate(None, params, params, mode="online", gamma=-0.1)


def unknown_config_field(tmp, workdir):
    config = tiny_config()
    config.strenght = 100.0
    return run(config, workdir)


def unknown_method(tmp, workdir):
    return run(tiny_config(methods=("finetune", "ewc2")), workdir)


def corrupt_idx_magic(tmp, workdir):
    directory = idx_dir(tmp / "idx")
    write_idx(directory / "train-images-idx3-ubyte", np.zeros((20, 5, 4)), magic_dtype=0x0D)
    return run(tiny_config(datasets=(f"idx:{directory}",)), workdir)


def truncated_idx(tmp, workdir):
    directory = idx_dir(tmp / "idx")
    path = directory / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    return run(tiny_config(datasets=(f"idx:{directory}",)), workdir)


def corrupt_gzip_idx(tmp, workdir):
    directory = idx_dir(tmp / "idx")
    path = directory / "train-labels-idx1-ubyte"
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(path.read_bytes())[:-9])
    path.unlink()
    return run(tiny_config(datasets=(f"idx:{directory}",)), workdir)


def missing_data_directory(tmp, workdir):
    return run(tiny_config(datasets=(f"idx:{tmp / 'nowhere'}",)), workdir)


def workdir_of_another_run(tmp, workdir):
    workdir.mkdir()
    other = tiny_config(strength=5.0)
    (workdir / "config.json").write_text(other.to_json_best_effort(indent=2))
    fingerprint = checkpoint.fingerprint(json.loads(other.to_json_best_effort()))
    saved = checkpoint.RunCheckpoints(
        checkpoint.checkpoints_root(workdir) / "ewc-seed0", fingerprint
    )
    saved.save({"w": jnp.ones(3)}, {"task": 1})
    return run(tiny_config(), workdir)


def workdir_with_finished_results(tmp, workdir):
    workdir.mkdir()
    (workdir / "results.json").write_text('{"finished": true}\n')
    return run(tiny_config(), workdir)


def corrupt_checkpoint_marker(tmp, workdir):
    config = tiny_config()
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    broken = checkpoint.checkpoints_root(workdir) / "ewc-seed0" / "00000003"
    (broken / checkpoint.STATE).mkdir(parents=True)
    (broken / checkpoint.MARKER).write_text('{"format": 1, "fingerp')
    return run(config, workdir)


def checkpoint_of_another_model(tmp, workdir):
    config = tiny_config(methods=("finetune",))
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    fingerprint = checkpoint.fingerprint(json.loads(config.to_json_best_effort()))
    saved = checkpoint.RunCheckpoints(
        checkpoint.checkpoints_root(workdir) / "finetune-seed0", fingerprint
    )
    saved.save({"params": {"w": jnp.ones(3)}}, {"task": 1})
    return run(config, workdir)


def exact(message: str) -> str:
    """A pattern that matches ``message`` and nothing else."""
    return f"^{re.escape(message)}$"


FINISHED = {
    "results.json": '{"finished": true, "config": {"learning_rate": 0.01}}\n',
    "config.json": '{"learning_rate": 0.01}\n',
    "metrics.csv": "method,seed\nfinetune,0\n",
    "accuracy_matrix.png": "old figure",
}


def finished_workdir(workdir: Path) -> None:
    """Finished results of an earlier run (their content does not matter, only that it stays)."""
    workdir.mkdir(parents=True)
    for name, text in FINISHED.items():
        (workdir / name).write_text(text)


def results_files(workdir: Path) -> dict[str, bytes]:
    """The content of every result file in ``workdir`` (not the lock, staging or checkpoints)."""
    return {
        p.name: p.read_bytes()
        for p in workdir.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def config_case(**overrides) -> Callable:
    def case(tmp, workdir):
        return run(tiny_config(**overrides), workdir)

    case.__name__ = f"config_{'_'.join(overrides)}"
    return case


def wrongly_typed(**overrides) -> Callable:
    """A config built from a dict, which takes values of any type (``get_config``'s fields
    refuse another type themselves), so that only ``config.validate`` stands in the way."""

    def case(tmp, workdir):
        config = ml_collections.ConfigDict({**tiny_config().to_dict(), **overrides})
        return run(config, workdir)

    case.__name__ = f"wrongly_typed_{'_'.join(overrides)}"
    return case


def overwrite_with_infinite_learning_rate(tmp, workdir):
    finished_workdir(workdir)
    return run(tiny_config(learning_rate=float("inf")), workdir, overwrite=True)


def batch_larger_than_a_task(tmp, workdir):
    return run(tiny_config(batch_size=2000), workdir)


def workdir_is_a_file(tmp, workdir):
    workdir.write_text("not a directory")
    return run(tiny_config(), workdir)


def workdir_in_use(tmp, workdir):
    def call():
        with workdir_lib.locked(workdir):  # another open file description: flock conflicts
            train.train_and_evaluate(tiny_config(), workdir)

    return call


def bit_flip_in_a_checkpoint(tmp, workdir):
    config = tiny_config()
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    fingerprint = checkpoint.fingerprint(json.loads(config.to_json_best_effort()))
    saved = checkpoint.RunCheckpoints(
        checkpoint.checkpoints_root(workdir) / "finetune-seed0", fingerprint
    )
    path = saved.save({"w": jnp.arange(1024.0)}, {"task": 1})
    array = max((f for f in (path / "state").rglob("*") if f.is_file()), key=os.path.getsize)
    raw = bytearray(array.read_bytes())
    raw[-40] ^= 0x01
    array.write_bytes(bytes(raw))
    return run(config, workdir)


CASES = [
    ("NaN in the data", nan_pixels, ValueError, r"train_images has 1 NaN/Inf values"),
    ("Inf in the data", inf_pixels, ValueError, r"test_images has 1 NaN/Inf values"),
    ("label out of range", label_out_of_range, ValueError, r"train label 10 .* outside \[0, 10\)"),
    ("images not [N,H,W,C]", images_not_nhwc, ValueError, r"must be float32 \[N, H, W, C\]"),
    (
        "train/test image shapes differ",
        train_and_test_shapes_differ,
        ValueError,
        r"both splits need the same \[H, W, C\]",
    ),
    (
        "sequence of different image shapes",
        sequence_of_different_shapes,
        ValueError,
        "need one image shape",
    ),
    ("empty split", empty_split, ValueError, "the train split is empty"),
    ("empty task", empty_task, config.ConfigError, "task '8/9' .* has no training examples"),
    ("one task (permuted)", one_permuted_task, config.ConfigError, "num_tasks must be >= 2"),
    ("one task (split)", one_split_task, config.ConfigError, "has 1 task; continual learning"),
    (
        "mismatched params/Fisher trees",
        mismatched_fisher_tree,
        ValueError,
        r"fisher does not have the tree structure",
    ),
    (
        "negative strength (config)",
        negative_strength_config,
        config.ConfigError,
        "strength must be a finite number >= 0",
    ),
    (
        "negative strength (library)",
        negative_strength_library,
        ValueError,
        "strength must be a finite scalar >= 0",
    ),
    (
        "gamma > 1 (config)",
        gamma_above_one_config,
        config.ConfigError,
        r"gamma must lie in \[0, 1\]",
    ),
    (
        "gamma < 0 (library)",
        gamma_below_zero_library,
        ValueError,
        r"gamma must be a scalar in \[0, 1\]",
    ),
    (
        "unknown config field",
        unknown_config_field,
        config.ConfigError,
        r"unknown config field 'strenght' \(did you mean 'strength'\?\)",
    ),
    ("unknown method", unknown_method, config.ConfigError, "unknown method 'ewc2'"),
    ("corrupt IDX header", corrupt_idx_magic, ValueError, "train-images-idx3-ubyte"),
    ("truncated IDX file", truncated_idx, ValueError, "t10k-images-idx3-ubyte"),
    ("corrupt gzip IDX file", corrupt_gzip_idx, ValueError, "train-labels-idx1-ubyte.gz"),
    (
        "missing data directory",
        missing_data_directory,
        FileNotFoundError,
        "IDX data directory .* does not exist",
    ),
    (
        "workdir of another run",
        workdir_of_another_run,
        workdir.WorkdirExistsError,
        r"holds another run \(config differs in strength: 5.0 -> 1000.0\)",
    ),
    (
        "workdir with finished results",
        workdir_with_finished_results,
        workdir.WorkdirExistsError,
        "already holds finished results; pass --overwrite",
    ),
    (
        "corrupt checkpoint",
        corrupt_checkpoint_marker,
        checkpoint.CheckpointError,
        r"00000003 is corrupt .*--overwrite",
    ),
    (
        "checkpoint of another model",
        checkpoint_of_another_model,
        checkpoint.CheckpointError,
        "cannot restore .* another model",
    ),
    (
        "--overwrite with learning_rate inf",
        overwrite_with_infinite_learning_rate,
        config.ConfigError,
        exact("learning_rate must be a finite number > 0, got inf"),
    ),
    (
        "learning_rate 0",
        config_case(learning_rate=0.0),
        config.ConfigError,
        exact("learning_rate must be a finite number > 0, got 0.0"),
    ),
    (
        "checkpoint_every_steps -1",
        config_case(checkpoint_every_steps=-1),
        config.ConfigError,
        exact("checkpoint_every_steps must be >= 0 (an int), got -1"),
    ),
    (
        "hidden_sizes 0",
        config_case(hidden_sizes=(16, 0)),
        config.ConfigError,
        exact("hidden_sizes must all be >= 1 (the width of each hidden layer), got (16, 0)"),
    ),
    (
        "epochs 0",
        config_case(steps_per_task=0, epochs=0),
        config.ConfigError,
        exact("epochs must be >= 1 (or set steps_per_task)"),
    ),
    (
        "fisher_samples a float",
        wrongly_typed(fisher_samples=1e8),
        config.ConfigError,
        exact("fisher_samples must be >= 1 (an int), got 100000000.0"),
    ),
    (
        "eval_batch_size 0",
        config_case(eval_batch_size=0),
        config.ConfigError,
        exact("eval_batch_size must be >= 1 (an int), got 0"),
    ),
    (
        "train_limit -1",
        config_case(train_limit=-1),
        config.ConfigError,
        exact("train_limit must be >= 0 (an int), got -1"),
    ),
    (
        "momentum 1",
        config_case(momentum=1.0),
        config.ConfigError,
        exact("momentum must lie in [0, 1) (0: plain SGD), got 1.0"),
    ),
    (
        "negative seed",
        config_case(seeds=(-1,)),
        config.ConfigError,
        exact("seeds must lie in [0, 2147483647], got -1"),
    ),
    (
        "a boolean given as 1",
        wrongly_typed(reset_optimizer=1),
        config.ConfigError,
        exact("reset_optimizer must be True or False, got 1"),
    ),
    (
        "angle NaN",
        config_case(scenario="rotated", angles=(0.0, float("nan"))),
        config.ConfigError,
        exact("angles must be finite numbers (degrees), got (0.0, nan)"),
    ),
    (
        "batch_size larger than a task",
        batch_larger_than_a_task,
        config.ConfigError,
        exact(
            "batch_size 2000 is larger than task 'perm0', which has 1433 training examples; "
            "set batch_size <= 1433"
        ),
    ),
    (
        "workdir is a file",
        workdir_is_a_file,
        workdir.WorkdirUnusableError,
        r"^--workdir .* is a file, not a directory; choose another --workdir$",
    ),
    (
        "workdir in use by another run",
        workdir_in_use,
        workdir.WorkdirBusyError,
        rf"^.* is in use by another run \(PID {os.getpid()}\); wait for it to finish, "
        r"stop it, or choose another --workdir$",
    ),
    (
        "bit flip in a checkpoint",
        bit_flip_in_a_checkpoint,
        checkpoint.CheckpointError,
        r"^checkpoint (.*00000000) is damaged: state/.* is changed since it was saved "
        r"\(checksum mismatch\); delete \1 to resume from the one before, or pass "
        r"--overwrite to start the run afresh$",
    ),
]


@pytest.mark.parametrize(
    ("make_call", "error", "match"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path, make_call, error, match):
    workdir = tmp_path / "run"
    call = make_call(tmp_path, workdir)
    results = workdir / "results.json"
    finished = results.read_bytes() if results.exists() else None
    before = results_files(workdir) if finished else {}
    with pytest.raises(error, match=match):
        call()
    if finished is None:
        assert not results.exists()
    else:  # never overwritten, nor any file beside it
        assert results_files(workdir) == before
    if workdir.is_dir() and (workdir / "config.json").exists():
        assert not list(workdir.glob(".*.tmp"))


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    """No row trains: the checks all run before the first epoch (a crash here would show one)."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the input is bad")

    monkeypatch.setattr(loop, "run", no_training)
    for _, make_call, error, match in CASES:
        if make_call is checkpoint_of_another_model:
            continue  # detected when the run restores, just before the loop
        workdir = tmp_path / make_call.__name__
        case_dir = tmp_path / f"{make_call.__name__}-data"
        case_dir.mkdir()
        call = make_call(case_dir, workdir)
        with pytest.raises(error, match=match):
            call()
        shutil.rmtree(case_dir)


@pytest.mark.slow
def test_a_failed_overwrite_keeps_the_previous_results_and_records_the_fisher_size(
    tmp_path, monkeypatch
):
    """A full disk or a crash mid-training in an ``--overwrite`` rerun loses nothing."""

    def figures(runs, summary, task_names, directory, metric="accuracy"):
        del metric
        path = directory / "accuracy_matrix.png"
        path.write_text(f"figure of {directory.name}")
        return [path]

    monkeypatch.setattr(plots, "write_figures", figures)
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(tiny_config(fisher_samples=10**6), workdir)
    # The Fisher of each task used all 1,433 examples there are, and results.json says so.
    assert first["config"]["fisher_samples"] == 10**6
    assert first["fisher_samples_used"] == [1433, 1433]
    before = results_files(workdir)
    assert sorted(before) == ["accuracy_matrix.png", "config.json", "metrics.csv", "results.json"]

    import orbax.checkpoint as ocp

    def disk_full(self, *args, **kwargs):
        try:  # Orbax re-raises a failed write as its own exception type
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            raise RuntimeError("tensorstore write failed") from error

    staged = workdir / workdir_lib.STAGING / "checkpoints" / "finetune-seed0" / "00000000"
    changed = tiny_config(learning_rate=0.02, methods=("finetune",))
    with monkeypatch.context() as patch:
        patch.setattr(ocp.Checkpointer, "save", disk_full)
        with pytest.raises(checkpoint.CheckpointError) as caught:
            train.train_and_evaluate(changed, workdir, overwrite=True)
    assert str(caught.value) == (
        f"cannot write checkpoint {staged}: no space left on device; free some space (or move "
        "the --workdir) and rerun the same command to resume from the last complete checkpoint"
    )
    assert not staged.exists()  # the partial checkpoint is removed

    def crash(*args, **kwargs):
        raise RuntimeError("crashed mid-training")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_finish_task", crash)
        with pytest.raises(RuntimeError, match="crashed mid-training"):
            train.train_and_evaluate(changed, workdir, overwrite=True)
    assert (
        results_files(workdir) == before
    )  # old results beside their own config, metrics and figure

    second = train.train_and_evaluate(changed, workdir, overwrite=True)
    assert sorted(p.name for p in workdir.iterdir()) == [
        ".lock",
        "accuracy_matrix.png",
        "config.json",
        "metrics.csv",
        "results.json",
    ]
    assert json.loads((workdir / "config.json").read_text())["learning_rate"] == 0.02
    assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(second))
    assert (workdir / "accuracy_matrix.png").read_text() == f"figure of {workdir_lib.STAGING}"
    assert second["fisher_samples_used"] == [16, 16]
