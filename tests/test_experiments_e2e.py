"""End-to-end runs of the experiments: the CLI, the results files, the tutorial config."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.configs import default, tutorial
from experiments.reporting import metrics
from experiments.reporting import results as results_lib
from experiments.runs import experiment as train
from experiments.storage import workdir
from experiments.training import loop, steps

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["accuracy_curves.png", "accuracy_matrix.png", "method_comparison.png"]
# Single runs of the methods whose precision is the task's own Fisher add the forgetting forecast.
FORECAST_METHODS = {"ewc", "online_ewc", "kfac"}


def figures_of(methods):
    return FIGURES + (["forgetting_forecast.png"] if FORECAST_METHODS & set(methods) else [])


def run_cli(*args, workdir):
    command = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


DIGITS_ARGS = (
    "--config=experiments/configs/demo.py",
    "--config.datasets=embedded:digits",
    "--config.num_tasks=2",
    "--config.epochs=1",
    "--config.methods=finetune",
    "--config.methods=l2",
    "--config.methods=ewc",
    "--config.fisher_samples=64",
)


def check_results_schema(results, *, methods, seeds, num_tasks):
    assert results["schema_version"] == results_lib.RESULTS_SCHEMA_VERSION
    assert results["finished"] is True
    assert results["methods"] == methods and results["seeds"] == seeds
    assert len(results["task_names"]) == num_tasks
    assert results["figures"] == figures_of(methods)
    env = results["environment"]
    import flax
    import jax
    import optax

    assert (env["jax"], env["flax"], env["optax"]) == (
        jax.__version__,
        flax.__version__,
        optax.__version__,
    )
    assert env["platform"] == "cpu" and env["device"]
    assert len(results["runs"]) == len(methods) * len(seeds)
    for run in results["runs"]:
        matrix = np.asarray(run["accuracy_matrix"])
        assert matrix.shape == (num_tasks, num_tasks)
        assert np.all((matrix >= 0) & (matrix <= 1))
        assert run["metrics"] == pytest.approx(metrics.summarize(matrix))
        assert len(run["task_wall_time_s"]) == num_tasks
        assert len(run["fisher_wall_time_s"]) == num_tasks
        assert len(run["steps_per_task"]) == num_tasks
        # Curves: while training task i, the tasks 0..i are evaluated; the last point of each
        # task is the diagonal and lower triangle of the accuracy matrix.
        for i in range(num_tasks):
            points = [c for c in run["curves"] if c["task"] == i]
            assert points and all(len(c["accuracy"]) == i + 1 for c in points)
            assert points[-1]["accuracy"] == pytest.approx(matrix[i, : i + 1].tolist())
            assert points[-1]["step"] == sum(run["steps_per_task"][: i + 1])
    for method in methods:
        entry = results["summary"][method]
        values = [
            r["metrics"]["average_accuracy"] for r in results["runs"] if r["method"] == method
        ]
        assert entry["average_accuracy"]["mean"] == pytest.approx(np.mean(values))
        expected_std = np.std(values, ddof=1) if len(values) > 1 else 0.0
        assert entry["average_accuracy"]["std"] == pytest.approx(expected_std)
        assert entry["num_seeds"] == len(seeds)


@pytest.mark.slow
def test_cli_writes_results_and_refuses_to_overwrite(tmp_path):
    workdir = tmp_path / "digits"
    done = run_cli(*DIGITS_ARGS, workdir=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "avg acc" in done.stdout and "forgetting" in done.stdout
    for name in figures_of(["finetune", "l2", "ewc"]):
        assert f"figure: {workdir / name}" in done.stdout
        assert (workdir / name).read_bytes()[:8] == PNG_SIGNATURE

    results_bytes = (workdir / "results.json").read_bytes()
    results = json.loads(results_bytes)
    check_results_schema(results, methods=["finetune", "l2", "ewc"], seeds=[0], num_tasks=2)
    assert results["task_names"] == ["perm0", "perm1"]
    # One epoch of the 1,433 digits in batches of 32.
    assert results["runs"][0]["steps_per_task"] == [45, 45]
    config = json.loads((workdir / "config.json").read_text())
    assert config["datasets"] == ["embedded:digits"] and config["num_tasks"] == 2
    rows = (workdir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("method,seed,average_accuracy,backward_transfer,average_forgetting")
    assert [row.split(",")[0] for row in rows[1:]] == ["finetune", "l2", "ewc"]

    refused = run_cli(*DIGITS_ARGS, workdir=workdir)
    assert refused.returncode != 0
    assert "already holds finished results" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert (workdir / "results.json").read_bytes() == results_bytes

    bad_args = (*DIGITS_ARGS[:-4], "--config.methods=finetune", "--config.methods=ewc2")
    bad = run_cli(*bad_args, DIGITS_ARGS[-1], "--overwrite", workdir=workdir)
    assert bad.returncode != 0
    assert "unknown method 'ewc2'" in bad.stderr
    assert (workdir / "results.json").read_bytes() == results_bytes


def digits_config(**overrides):
    config = default.get_config()
    config.datasets = ("embedded:digits",)
    config.hidden_sizes = (32,)
    config.batch_size = 16
    config.fisher_samples = 64
    for field, value in overrides.items():
        config[field] = value
    return config


@pytest.mark.slow
def test_split_task_incremental_over_seeds_with_joint(tmp_path):
    config = digits_config(
        scenario="split",
        split_mode="task",
        methods=("finetune", "ewc", "online_ewc", "joint"),
        seeds=(0, 1),
        steps_per_task=30,
        eval_every_steps=10,
        optimizer="adam",
        learning_rate=3e-3,
        strength=100.0,
        gamma=0.8,
    )
    results = train.train_and_evaluate(config, tmp_path)
    check_results_schema(
        results, methods=["finetune", "ewc", "online_ewc", "joint"], seeds=[0, 1], num_tasks=5
    )
    assert results["scenario"] == "split-task"
    assert results["task_names"] == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    for run in results["runs"]:
        assert run["steps_per_task"] == [30] * 5
        # Evaluation happens at the end of the first epoch at or past every 10 steps (an epoch
        # of a pair is ~18 batches here) and always at the end of the task.
        steps = [c["step"] for c in run["curves"] if c["task"] == 0]
        assert steps[0] >= 10 and steps[-1] == 30 and steps == sorted(set(steps))
    # Task-incremental digits with a head per pair: every method clears chance (50%) by far.
    for method, entry in results["summary"].items():
        assert entry["average_accuracy"]["mean"] > 0.8, method
    assert all((tmp_path / name).exists() for name in figures_of(["ewc"]))


@pytest.mark.slow
def test_tasks_and_seeds_share_a_compiled_train_step_per_state_shape(tmp_path):
    def traces():
        return steps.train_epoch._cache_size()

    before = traces()
    config = digits_config(
        num_tasks=3,
        methods=("finetune", "l2", "ewc", "online_ewc"),
        seeds=(0, 1),
        epochs=1,
        gamma=0.5,
    )
    config.strengths.l2 = 0.01
    train.train_and_evaluate(config, tmp_path)
    # One for finetune and L2, one for EWC and online EWC, whose state also carries the
    # forgetting forecast's store (every task's solution and own precision).
    assert traces() - before == 2


@pytest.mark.slow
def test_crash_leaves_no_finished_results(tmp_path):
    train.train_and_evaluate(digits_config(num_tasks=2, methods=("finetune",)), tmp_path)
    assert (tmp_path / "results.json").exists()
    with pytest.raises(workdir.WorkdirExistsError, match="--overwrite"):
        train.train_and_evaluate(digits_config(num_tasks=2, methods=("finetune",)), tmp_path)
    finished = {name: (tmp_path / name).read_bytes() for name in ("results.json", "config.json")}
    diverging = digits_config(num_tasks=2, methods=("ewc",), learning_rate=0.5, strength=1e7)
    with pytest.raises(loop.TrainingDivergedError):
        train.train_and_evaluate(diverging, tmp_path, overwrite=True)
    # The crashed --overwrite rerun left the finished results as they were, beside their own
    # config; its own config and checkpoints are staged (issue 11).
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    staged = tmp_path / workdir.STAGING / "config.json"
    assert json.loads(staged.read_text())["strength"] == 1e7
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"real Fashion-MNIST IDX files not installed at {FASHION_MNIST_DIR} "
    "(Debian package dataset-fashion-mnist)",
)
def test_tutorial_config_on_real_fashion_mnist(tmp_path):
    config = tutorial.get_config("small")
    assert (config.learning_rate, config.batch_size, config.strength) == (1e-3, 32, 2000.0)
    assert (config.estimator, config.fisher_samples, config.relu_on_logits) == ("argmax", 512, True)
    assert tutorial.get_config().steps_per_task == 46_875
    config.steps_per_task = 40
    config.eval_every_steps = 20
    config.train_limit = 640
    config.test_limit = 300
    config.fisher_samples = 32
    results = train.train_and_evaluate(config, tmp_path)
    check_results_schema(results, methods=["finetune", "ewc"], seeds=[0], num_tasks=2)
    assert results["task_names"] == ["mnist", "fashion-mnist"]
    assert results["config"]["datasets"] == ["embedded:mnist", f"idx:{FASHION_MNIST_DIR}"]
    for run in results["runs"]:
        assert run["steps_per_task"] == [40, 40]
        assert all(math.isfinite(v) for v in run["metrics"].values())


def test_a_full_disk_while_a_figure_is_written_is_one_line_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    from matplotlib.figure import Figure

    from experiments.reporting import plots

    def full_disk(self, path, **kwargs):
        del self, kwargs
        Path(path).write_bytes(b"\x89PNG partial")
        # As PIL raises it: an OSError whose errno says why, without a file name.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    stat = {"mean": 0.5, "std": 0.0}
    summary = {"ewc": {"average_accuracy": stat, "average_forgetting": stat, "num_seeds": 1}}
    with pytest.raises(workdir.WorkdirUnusableError) as error:
        plots.plot_method_comparison(summary, tmp_path / "method_comparison.png")
    assert str(error.value) == (
        f"cannot write {tmp_path / 'method_comparison.png'}: no space left on device; free some "
        "space (or choose a --workdir on another disk) and rerun the same command"
    )
    assert list(tmp_path.iterdir()) == []


SMALL_RUN = (
    "--config.train_limit=120",
    "--config.test_limit=60",
    "--config.steps_per_task=4",
    "--config.fisher_samples=16",
    "--config.eval_batch_size=60",
    "--config.batch_size=8",
)
"""Flags that make any image config a few seconds' run."""


@pytest.mark.slow
def test_every_config_and_path_runs_end_to_end(tmp_path):
    """The configs and settings no other test runs, each a tiny CLI run (one driver process):
    ``rotated_mnist.py`` with a CNN, the batched Fisher and the optimiser kept across tasks;
    ``split_mnist.py`` (class-incremental); permuted with its first task permuted too; and a
    successful ``--overwrite`` of finished results."""
    from test_cli_errors import run_driver

    configs = "experiments/configs"
    runs = {
        "rotated_cnn_batched": [
            f"--config={configs}/rotated_mnist.py:small",
            "--config.model=cnn",
            "--config.methods=ewc",
            "--config.estimator=batched",
            "--config.fisher_batch_size=8",
            "--config.reset_optimizer=False",
        ],
        "split_class": [f"--config={configs}/split_mnist.py:small,class", "--config.methods=l2"],
        "permuted_first_permuted": [
            f"--config={configs}/default.py",
            "--config.first_task_unpermuted=False",
            "--config.num_tasks=2",
            "--config.methods=finetune",
        ],
    }
    cases = [
        {"name": name, "argv": [*argv, *SMALL_RUN, f"--workdir={tmp_path / name}"]}
        for name, argv in runs.items()
    ]
    again = [*cases[-1]["argv"], "--overwrite", "--config.seeds=1"]
    cases.append({"name": "overwrite", "argv": again})
    for case in cases:
        case.update(cwd=str(REPO), **{"raise": None})
    results = run_driver(cases, tmp_path)
    for name, result in results.items():
        assert result["returncode"] == 0, (name, result["stderr"][-2000:])
    documents = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
    rotated = documents["rotated_cnn_batched"]
    assert rotated["scenario"] == "rotated" and rotated["config"]["model"] == "cnn"
    assert rotated["config"]["estimator"] == "batched" and not rotated["config"]["reset_optimizer"]
    assert documents["split_class"]["scenario"] == "split-class"
    assert documents["permuted_first_permuted"]["config"]["first_task_unpermuted"] is False
    # The overwrite replaced the finished results (seed 1 now) and left no staging behind.
    replaced = json.loads((tmp_path / "permuted_first_permuted" / "results.json").read_text())
    assert replaced["seeds"] == [1]
    assert not (tmp_path / "permuted_first_permuted" / workdir.STAGING).exists()
    for document in documents.values():
        for run in document["runs"]:
            matrix = np.asarray(run["accuracy_matrix"])
            assert np.all((matrix >= 0) & (matrix <= 1)) and matrix.shape[0] == matrix.shape[1]
