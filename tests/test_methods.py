"""SI, MAS and K-FAC in the experiments: the CLI path, the sweep, each end-of-task importance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from experiments import config as config_lib
from experiments import models
from experiments.configs import permuted_long
from experiments.reporting import plots, sequence_report
from experiments.runs import experiment as train
from experiments.training import consolidation, steps
from experiments.training import device as device_data
from experiments.training.methods import MethodSpec

REPO = Path(__file__).resolve().parents[1]
NEW_METHODS = ("si", "mas", "kfac")


def tiny_setup(tx, *, batch_size):
    model = models.build_model("mlp", num_heads=1, num_outputs=3, hidden_sizes=(6,))
    return steps.StepSetup(model, tx, batch_size=batch_size, eval_batch_size=8)


def task_data(seed, num=8):
    rng = np.random.default_rng(seed)
    images = rng.random((num, 3, 3, 1)).astype(np.float32)
    labels = rng.integers(0, 3, num).astype(np.int32)
    return device_data.pad_task_data(images, labels, np.zeros(num, np.int32), num)


@pytest.mark.slow
def test_cli_single_runs_equal_the_sweep_runs(tmp_path):
    """``--config.methods=si,mas,kfac`` through ``python -m experiments.main``, then the same
    runs inside a vmapped sweep over two strengths: each single run is the sweep's run."""
    per_method = [f"--config.strengths.{name}=0.5" for name in NEW_METHODS]
    command = [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=experiments/configs/permuted_long.py:small",
        f"--workdir={tmp_path / 'single'}",
        *[f"--config.methods={name}" for name in NEW_METHODS],
        *per_method,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert [run["method"] for run in single["runs"]] == list(NEW_METHODS)

    config = permuted_long.get_config("small")
    config.methods = NEW_METHODS
    config.sweep.strengths = (0.5, 50.0)
    swept = train.train_and_evaluate(config, tmp_path / "sweep")
    by_run = {(r["method"], r["strength"]): r["accuracy_matrix"] for r in swept["runs"]}
    for run in single["runs"]:
        np.testing.assert_allclose(
            by_run[run["method"], 0.5], run["accuracy_matrix"], atol=1e-6, err_msg=run["method"]
        )
        matrix = np.asarray(run["accuracy_matrix"])
        assert matrix.shape == (3, 3) and matrix[0, 0] > 0.5, run["method"]
    # The strength matters for every method, so the equality is not of unregularised runs.
    for name in NEW_METHODS:
        assert not np.array_equal(by_run[name, 0.5], by_run[name, 50.0]), name


def test_si_importance_in_the_loop_equals_the_path_integral_by_hand():
    """Two tasks of full-batch SGD: Ω of the second task integrates the task-loss gradient
    only, against steps that include the penalty of the first task's Ω."""
    lr, strength, damping, num_steps = 0.5, 3.0, 0.1, 4
    method = MethodSpec(name="si", strength=strength, damping=damping)
    setup = steps.method_setup(tiny_setup(optax.sgd(lr), batch_size=8), method)
    tasks = [task_data(0), task_data(1)]
    state = steps.init_state(jax.random.key(0), tasks[0].images[:1], strength, setup=setup)
    params0 = state.params
    precisions = []
    for task, data in enumerate(tasks):
        if task:
            state = steps.reset_optimizer(state, setup=setup)
        for _ in range(num_steps):
            state, _ = steps.train_epoch(state, data, jnp.int32(1), setup=setup)
        state = consolidation.consolidate_task(state, None, None, None, setup=setup, method=method)
        precisions.append(state.ewc_state.precision)

    def task_loss(p, data):
        logits = setup.model.apply({"params": p}, data.images, data.heads)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data.labels))

    @jax.jit
    def hand_step(params, omega, total, anchor, data):
        g = jax.grad(task_loss)(params, data)
        # Δθ = -lr (g + ∇ λ/2 Σ Ω (θ - θ*)²); ω -= g Δθ with the task gradient alone.
        step = jax.tree.map(
            lambda gi, o, p, a: -lr * (gi + strength * o * (p - a)), g, total, params, anchor
        )
        omega = jax.tree.map(lambda w, gi, s: w - gi * s, omega, g, step)
        return jax.tree.map(jnp.add, params, step), omega

    params = params0
    total = jax.tree.map(jnp.zeros_like, params)
    for data in tasks:
        start = anchor = params
        omega = jax.tree.map(jnp.zeros_like, params)
        for _ in range(num_steps):
            params, omega = hand_step(params, omega, total, anchor, data)
        total = jax.tree.map(
            lambda t, w, p, s: t + jnp.maximum(w, 0) / ((p - s) ** 2 + damping),
            total,
            omega,
            params,
            start,
        )
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(precisions[-1]), jax.tree.leaves(total), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # The second task added a non-zero importance (Ω is not the first task's alone).
    assert any(
        float(jnp.max(jnp.abs(b - a))) > 1e-3
        for a, b in zip(jax.tree.leaves(precisions[0]), jax.tree.leaves(precisions[1]), strict=True)
    )


def test_kfac_state_is_the_merge_of_every_tasks_terms_and_mas_the_library_importance():
    """Three consolidations keep one term per layer, equal to merging the three tasks' terms
    (A summed, G averaged); MAS's precision is :func:`ewc_jax.importance.mas_importance` summed."""
    setup = tiny_setup(optax.sgd(0.1), batch_size=4)
    kfac = MethodSpec(name="kfac", strength=1.0)
    mas = MethodSpec(name="mas", strength=1.0)
    kfac_setup = steps.method_setup(setup, kfac)
    tasks = [task_data(seed) for seed in range(3)]
    state = steps.init_state(jax.random.key(1), tasks[0].images[:1], 1.0, setup=kfac_setup)
    mas_state = steps.init_state(jax.random.key(1), tasks[0].images[:1], 1.0, setup=setup)
    unmerged, mas_total = None, None
    for data in tasks:
        state, _ = steps.train_epoch(state, data, jnp.int32(2), setup=kfac_setup)
        params = state.params
        inputs = (data.images, data.heads)
        state = consolidation.consolidate_task(
            state, data.images, data.labels, data.heads, setup=kfac_setup, method=kfac
        )
        fisher = ewc_jax.kfac.kfac_fisher(setup.logits, params, inputs)
        unmerged = ewc_jax.consolidate(unmerged, params, fisher, mode="online")

        mas_state = mas_state._replace(params=params)
        mas_state = consolidation.consolidate_task(
            mas_state, data.images, data.labels, data.heads, setup=setup, method=mas
        )
        importance = ewc_jax.importance.mas_importance(
            setup.logits, params, inputs, method="general"
        )
        mas_total = (
            importance if mas_total is None else jax.tree.map(jnp.add, mas_total, importance)
        )
    reference = ewc_jax.kfac.merge_kronecker_terms(unmerged)
    assert [t.a.shape[0] for t in state.ewc_state.layers] == [1, 1]
    assert int(state.ewc_state.num_tasks) == 3
    for got, want in zip(state.ewc_state.layers, reference.layers, strict=True):
        np.testing.assert_allclose(got.a, want.a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.g, want.g, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.anchor, want.anchor, rtol=1e-6)
    params = jax.tree.map(lambda p: p + 0.1, state.params)
    np.testing.assert_allclose(
        ewc_jax.penalty(params, state.ewc_state, 2.0),
        ewc_jax.penalty(params, reference, 2.0),
        rtol=1e-5,
    )
    for got, want in zip(
        jax.tree.leaves(mas_state.ewc_state.precision), jax.tree.leaves(mas_total), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_kfac_refuses_an_estimator_without_kronecker_factors():
    config = permuted_long.get_config("small")
    config.methods = ("kfac",)
    config.estimator = "argmax"
    with pytest.raises(config_lib.ConfigError, match=r"no version for method 'kfac'; it takes"):
        config_lib.validate(config)


def test_sequence_report_table_from_single_and_sweep_results(tmp_path):
    """Average accuracy after task t is the mean of row t's first t entries; BWT over the first
    t tasks; a single run's strength comes from its config; seeds of one label are pooled."""
    first = [[0.9, 0.1, 0.0], [0.7, 0.8, 0.1], [0.5, 0.6, 0.9]]
    second = [[0.8, 0.1, 0.0], [0.8, 0.9, 0.1], [0.7, 0.8, 0.7]]
    config = {"methods": ["finetune", "kfac"], "strength": 5.0, "strengths": {"kfac": 2.0}}
    single = {"config": config, "runs": [{"method": "kfac", "accuracy_matrix": first}]}
    swept = {
        "sweep": True,
        "config": config,
        "runs": [
            {"method": "kfac", "strength": 2.0, "accuracy_matrix": second},
            {"method": "finetune", "strength": 0.0, "accuracy_matrix": first},
        ],
    }
    paths = [tmp_path / "single.json", tmp_path / "sweep.json"]
    for path, document in zip(paths, (single, swept), strict=True):
        path.write_text(json.dumps(document))
    runs = sequence_report.collect_runs(paths)
    assert list(runs) == ["finetune", "kfac λ=2"] and len(runs["kfac λ=2"]) == 2
    np.testing.assert_allclose(sequence_report.average_accuracy_curve(first), [0.9, 0.75, 2 / 3])
    # BWT after 3 tasks: ((0.5 - 0.9) + (0.6 - 0.8)) / 2 = -0.3; after 2: 0.7 - 0.9 = -0.2.
    np.testing.assert_allclose(sequence_report.backward_transfer_after(first, 3), -0.3)
    table = sequence_report.markdown_table(runs, every=2).splitlines()
    assert table[0].split(" | ")[2:] == ["avg acc @2", "BWT @2 |"]
    # kfac after 2 tasks: avg acc (0.75, 0.85) -> 0.800 ± 0.071; BWT (-0.2, 0.0) -> -0.100 ± 0.141.
    assert table[3] == "| kfac λ=2 | 2 | 0.800 ± 0.071 | -0.100 ± 0.141 |"
    figure = tmp_path / "curves.png"
    curves = {
        k: np.stack([sequence_report.average_accuracy_curve(m) for m in v]) for k, v in runs.items()
    }
    assert plots.plot_average_accuracy_over_tasks(curves, figure).stat().st_size > 1000


def test_average_curves_in_bits_per_character_fit_the_data(tmp_path, monkeypatch):
    """Accuracy's axis is fixed to [0, 1]; bits per character (unbounded) fit their values."""
    axes = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: axes.extend(figure.axes) or path)
    curves = {"ewc": np.array([[2.2, 2.9, 3.4], [2.3, 3.0, 3.5]])}
    plots.plot_average_accuracy_over_tasks(curves, tmp_path / "a.png", metric="bits_per_character")
    plots.plot_average_accuracy_over_tasks({"ewc": curves["ewc"] / 4}, tmp_path / "b.png")
    low, high = axes[0].get_ylim()
    assert low < 2.2 and 3.5 < high < 4.0
    assert "bits per character" in axes[0].get_ylabel()
    assert axes[1].get_ylim() == (0.0, 1.02)


def test_sequence_report_draws_each_labels_mean_matrix(tmp_path, monkeypatch, capsys):
    """``--matrices``: one heatmap per label of its matrices' mean over seeds, in the first
    file's metric and task names."""
    first, second = [[3.0, 5.0], [4.0, 2.0]], [[2.0, 6.0], [5.0, 3.0]]
    common = {"config": {"methods": ["finetune"]}, "metric": "bits_per_character"}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, matrix in zip(paths, (first, second), strict=True):
        runs = [{"method": "finetune", "accuracy_matrix": matrix}]
        path.write_text(json.dumps(common | {"task_names": ["en", "de"], "runs": runs}))
    drawn = {}
    original = plots.plot_accuracy_matrices

    def spy(summary, task_names, path, metric):
        drawn.update(summary=summary, task_names=task_names, metric=metric)
        return original(summary, task_names, path, metric)

    monkeypatch.setattr(plots, "plot_accuracy_matrices", spy)
    sequence_report.main([*map(str, paths), "--every", "1", "--matrices", str(tmp_path / "m.png")])
    np.testing.assert_allclose(
        drawn["summary"]["finetune"]["accuracy_matrix_mean"], [[2.5, 5.5], [4.5, 2.5]]
    )
    assert drawn["task_names"] == ["en", "de"] and drawn["metric"] == "bits_per_character"
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert f"figure: {tmp_path / 'm.png'}" in capsys.readouterr().out


def test_reset_optimizer_keeps_the_si_path_integral():
    """A fresh Adam state between tasks, but SI's ω and θ_start survive until si_importance."""
    method = MethodSpec(name="si", strength=1.0)
    setup = steps.method_setup(tiny_setup(optax.adam(0.1), batch_size=8), method)
    data = task_data(0)
    state = steps.init_state(jax.random.key(0), data.images[:1], 1.0, setup=setup)
    state, _ = steps.train_epoch(state, data, jnp.int32(1), setup=setup)
    reset = steps.reset_optimizer(state, setup=setup)
    before, after = state.opt_state, reset.opt_state
    assert any(float(jnp.max(jnp.abs(w))) > 0 for w in jax.tree.leaves(before.path_integral))
    for got, want in zip(
        jax.tree.leaves((after.path_integral, after.start)),
        jax.tree.leaves((before.path_integral, before.start)),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    fresh = setup.tx.init(state.params).inner
    for got, want in zip(jax.tree.leaves(after.inner), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(before.inner[0].count) == 1  # the inner state had moved before the reset
