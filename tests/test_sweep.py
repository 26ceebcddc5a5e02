"""Seed x strength sweeps: a vmapped run equals the sequential run, resume, tables, validation."""

import csv
import dataclasses
import json

import numpy as np
import pytest
from _resume import TINY_ARGS, kill_after_line_then_resume, tiny_config

from experiments import config as config_lib
from experiments import scenarios
from experiments.configs import default
from experiments.data import load_dataset
from experiments.reporting import sweeps as sweep
from experiments.runs import experiment as train
from experiments.runs import jobs
from experiments.training import device as device_data
from experiments.training import loop, runners, steps
from experiments.training.methods import MethodSpec


def sweep_config(**overrides):
    config = default.get_config()
    config.datasets = ("embedded:digits",)
    config.num_tasks = 2
    config.train_limit = 400
    config.test_limit = 200
    config.hidden_sizes = (32,)
    config.batch_size = 16
    config.steps_per_task = 40
    config.learning_rate = 0.05
    config.momentum = 0.9
    config.methods = ("finetune", "ewc")
    config.estimator = "sampled"
    config.fisher_samples = 60
    for field, value in overrides.items():
        config[field] = value
    return config


@pytest.mark.slow
def test_vmapped_sweep_equals_sequential_runs(tmp_path):
    config = sweep_config()
    config.sweep.seeds = 2
    config.sweep.strengths = (10.0, 300.0)
    results = train.train_and_evaluate(config, tmp_path)
    assert not any(run["diverged"] for run in results["runs"])

    datasets = {"embedded:digits": load_dataset("embedded:digits")}
    run_spec = config_lib.read_spec(config)
    scenario = scenarios.build_scenario(run_spec.data, datasets, 0)
    setup = steps.build_setup(run_spec.model, run_spec.optimizer, run_spec.schedule, scenario)
    data = device_data.put_scenario(scenario)
    by_run = {(r["method"], r["seed"], r["strength"]): r for r in results["runs"]}
    assert sorted(by_run) == [
        ("ewc", 0, 10.0),
        ("ewc", 0, 300.0),
        ("ewc", 1, 10.0),
        ("ewc", 1, 300.0),
        ("finetune", 0, 0.0),
        ("finetune", 1, 0.0),
    ]
    matrices = {}
    for (method, seed, strength), run in by_run.items():
        spec = MethodSpec(
            name=method,
            strength=strength,
            estimator="sampled",
            fisher_samples=60,
        )
        plan = loop.make_plan(
            run_spec.schedule, run_spec.optimizer, data, spec, (seed,), label=f"[{method}]"
        )
        fns = runners.single_run_fns(setup, spec, seed, data)
        progress = loop.run(loop.start(plan, fns), plan, fns, data).progress
        np.testing.assert_allclose(run["accuracy_matrix"], progress.accuracy_rows, atol=1e-6)
        matrices[method, seed, strength] = np.asarray(progress.accuracy_rows)
    # The runs differ from each other, so equality above is not the same run four times.
    assert not np.array_equal(matrices["ewc", 0, 10.0], matrices["ewc", 1, 10.0])
    assert not np.array_equal(matrices["ewc", 0, 10.0], matrices["ewc", 0, 300.0])

    entry = results["summary"]["ewc"][1]
    expected = [matrices["ewc", s, 300.0][-1].mean() for s in (0, 1)]
    assert entry["strength"] == 300.0 and entry["num_seeds"] == 2
    np.testing.assert_allclose(entry["average_accuracy"]["mean"], np.mean(expected), atol=1e-6)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sweep"] and on_disk["seeds"] == [0, 1]
    with open(tmp_path / "sweep_summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(r["method"], r["strength"]) for r in rows] == [
        ("finetune", "0"),
        ("ewc", "10"),
        ("ewc", "300"),
    ]
    with open(tmp_path / "sweep_runs.csv") as file:
        assert len(list(csv.DictReader(file))) == 6
    assert (tmp_path / "strength_sensitivity.png").stat().st_size > 1000


def test_summary_of_hand_made_runs():
    identity = np.eye(2)
    half = np.full((2, 2), 0.5)
    result = sweep.SweepResult(
        method="ewc",
        seeds=[0, 0, 1, 1],
        strengths=[10.0, 1.0, 10.0, 1.0],
        accuracy_matrices=np.stack([identity, half, half, half]),
        diverged=[False, False, True, False],
        wall_time_s=1.0,
    )
    (one, ten) = sweep.summarize_sweep([result])["ewc"]
    assert (one["strength"], ten["strength"]) == (1.0, 10.0)
    # Final average accuracy: identity -> 0.5, half -> 0.5; BWT: identity -> -1, half -> 0.
    assert one["average_accuracy"] == {"mean": 0.5, "std": 0.0, "values": [0.5, 0.5]}
    assert ten["backward_transfer"]["values"] == [-1.0, 0.0]
    assert ten["backward_transfer"]["mean"] == -0.5
    np.testing.assert_allclose(ten["backward_transfer"]["std"], np.sqrt(0.5))
    assert ten["final_accuracy"]["mean"] == [0.25, 0.75]
    assert (one["diverged"], ten["diverged"]) == (0, 1)
    table = sweep.format_sweep_summary({"ewc": [one, ten]})
    assert "-0.500 ± 0.707" in table


def test_sweep_grid_from_config():
    config = sweep_config(seeds=(3, 7))
    assert not config_lib.read_spec(config).sweep.requested
    config.sweep.strengths = (1, 10, 100)
    assert config_lib.read_spec(config).sweep.requested
    assert config_lib.read_spec(config).seeds == (3, 7)
    config.sweep.seeds = 4
    spec = config_lib.read_spec(config)
    assert spec.seeds == (3, 4, 5, 6)
    ewc, finetune = MethodSpec("ewc", 5.0), MethodSpec("finetune")
    assert spec.sweep_strengths(ewc) == (1.0, 10.0, 100.0)
    assert spec.sweep_strengths(finetune) == (0.0,)
    config.sweep.strengths = ()
    assert config_lib.read_spec(config).sweep_strengths(dataclasses.replace(ewc)) == (5.0,)
    # The jobs: one vmapped job per method on the first seed's scenario, seed-major runs.
    config.sweep.strengths = (1, 10)
    config.methods = ("finetune", "ewc")
    finetune_job, ewc_job = jobs.jobs(config_lib.read_spec(config))
    assert finetune_job.seeds == (3, 4, 5, 6) and finetune_job.strengths == (0.0,) * 4
    assert ewc_job.seeds == (3, 3, 4, 4, 5, 5, 6, 6) and ewc_job.strengths == (1.0, 10.0) * 4
    assert finetune_job.scenario_seed == ewc_job.scenario_seed == 3 and ewc_job.vmapped
    # Single runs: one job per seed and method, seed-major, each on its own seed's scenario.
    config.sweep.seeds, config.sweep.strengths = 0, ()
    single = jobs.jobs(config_lib.read_spec(config))
    assert [(j.method.name, j.scenario_seed) for j in single] == [
        ("finetune", 3),
        ("ewc", 3),
        ("finetune", 7),
        ("ewc", 7),
    ]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("seeds", -1, r"sweep.seeds must be an int >= 0"),
        ("strengths", (1, "x"), "comma-separated numbers"),
        ("strengths", (1, -5), r"finite and >= 0"),
        ("strengths", (1, float("nan")), r"finite and >= 0"),
        ("strengths", (10, 10), "listed twice"),
    ],
)
def test_bad_sweep_is_rejected_before_anything_is_written(tmp_path, field, value, match):
    config = sweep_config()
    config.sweep[field] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mesh_devices_beyond_the_device_count_is_rejected(tmp_path):
    config = sweep_config(data_parallel=True, mesh_devices=10_000)
    with pytest.raises(config_lib.ConfigError, match="mesh_devices must lie in"):
        train.train_and_evaluate(config, tmp_path / "run")


@pytest.mark.slow
def test_sweep_killed_mid_task_resumes_to_the_same_results(tmp_path):
    config = tiny_config()
    config.sweep.seeds = 2
    config.sweep.strengths = (10, 100)
    reference = train.train_and_evaluate(config, tmp_path / "reference")

    # 45 steps per epoch: ewc's second task is saved at step 90; kill in its third epoch.
    workdir = tmp_path / "killed"
    resumed = kill_after_line_then_resume(
        [*TINY_ARGS, "--config.sweep.seeds=2", "--config.sweep.strengths=10,100"],
        workdir,
        "[sweep ewc] checkpoint",
        "(task 2, step 90)",
        tmp_path,
    )
    assert "[sweep finetune] finished earlier" in resumed.stdout  # not retrained
    assert "[sweep ewc] resuming task 2/2 at step 90" in resumed.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert [run["accuracy_matrix"] for run in results["runs"]] == [
        run["accuracy_matrix"] for run in reference["runs"]
    ]  # bit for bit
    assert results["runs"] == reference["runs"]
    assert results["summary"] == reference["summary"]
    assert not (workdir / "checkpoints").exists()
