"""The forgetting forecast (``experiments/training/forecast.py``): the prediction against a
hand-written quadratic, Spearman's ρ against SciPy, the figure and the ``results.json`` fields."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from _resume import tiny_config

import ewc_jax
from experiments import models
from experiments.reporting import metrics, plots, results
from experiments.runs import experiment as train
from experiments.training import consolidation, forecast, steps
from experiments.training import device as device_data
from experiments.training.methods import MethodSpec


def _task(num: int, seed: int, shift: float) -> device_data.TaskData:
    rng = np.random.default_rng(seed)
    images = (rng.random((num, 4, 4, 1)) + shift).astype(np.float32)
    labels = rng.integers(0, 3, num).astype(np.int32)
    return device_data.pad_task_data(images, labels, np.zeros(num, np.int32), num)


def _two_tasks(name: str):
    """Task A trained and consolidated (its row of the store written), then task B trained."""
    method = MethodSpec(name, strength=0.1, estimator="exact", fisher_samples=20)
    model = models.build_model("mlp", num_heads=1, num_outputs=3, hidden_sizes=(5,))
    setup = steps.method_setup(steps.StepSetup(model, optax.adam(5e-2), batch_size=5), method)
    setup = dataclasses.replace(setup, forecast_tasks=2)
    first, second = _task(20, 0, 0.0), _task(20, 1, 0.7)
    state = steps.init_state(jax.random.key(0), first.images[:1], 0.1, setup=setup)
    state, _ = steps.train_epoch(state, first, jnp.int32(4), setup=setup)
    solution = state.params
    state = consolidation.consolidate_task(
        state, first.images, first.labels, first.heads, setup=setup, method=method
    )
    state, _ = steps.train_epoch(state, second, jnp.int32(4), setup=setup)
    return setup, first, solution, state


def test_diagonal_prediction_is_half_the_fisher_weighted_squared_move():
    setup, first, solution, state = _two_tasks("ewc")
    fisher = ewc_jax.fisher_diagonal(
        setup.logits, solution, (first.images, first.heads), estimator="exact"
    )
    by_hand = 0.5 * sum(
        float(jnp.sum(f * (p - a) ** 2))
        for f, p, a in zip(
            jax.tree.leaves(fisher),
            jax.tree.leaves(state.params),
            jax.tree.leaves(solution),
            strict=True,
        )
    )
    assert by_hand > 0
    predicted = forecast.predicted_rise(state.params, state.forecast, jnp.int32(0), jnp.float32(1))
    np.testing.assert_allclose(float(predicted), by_hand, rtol=1e-4)
    # A sequence's Fisher sums over its T positions: the per-token forecast divides by T.
    per_token = forecast.predicted_rise(state.params, state.forecast, jnp.int32(0), jnp.float32(4))
    np.testing.assert_allclose(float(per_token), by_hand / 4, rtol=1e-4)


def test_kronecker_prediction_is_half_the_kron_quadratic():
    setup, first, solution, state = _two_tasks("kfac")
    fisher = ewc_jax.kfac.kfac_fisher(
        setup.logits, solution, (first.images, first.heads), estimator="exact"
    )
    leaves_now, leaves_then = jax.tree.leaves(state.params), jax.tree.leaves(solution)
    by_hand = 0.5 * sum(
        float(jnp.sum(f * (p - a) ** 2))
        for f, p, a in zip(jax.tree.leaves(fisher.diagonal), leaves_now, leaves_then, strict=True)
    )
    for layer in fisher.layers:
        # Augmented kernel [W; b], vectorised row-major to match kron(A, G).
        move = jnp.concatenate(
            [
                leaves_now[layer.kernel] - leaves_then[layer.kernel],
                (leaves_now[layer.bias] - leaves_then[layer.bias])[None],
            ]
        ).ravel()
        by_hand += 0.5 * float(move @ jnp.kron(layer.a, layer.g) @ move)
    assert by_hand > 0
    predicted = forecast.predicted_rise(state.params, state.forecast, jnp.int32(0), jnp.float32(1))
    np.testing.assert_allclose(float(predicted), by_hand, rtol=1e-4)


def test_mean_loss_is_the_mean_cross_entropy_of_the_valid_rows():
    setup, first, _, state = _two_tasks("ewc")
    padded = device_data.pad_task_data(
        np.asarray(first.images), np.asarray(first.labels), np.asarray(first.heads), 27
    )
    logits = setup.model.apply({"params": state.params}, first.images, first.heads)
    expected = float(
        jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, first.labels))
    )
    small_chunks = dataclasses.replace(setup, eval_batch_size=8)  # overlapping last chunk
    got = forecast.mean_loss(state.params, padded, setup=small_chunks)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]),
        ([1.0, 1.0, 2.0, 3.0, 3.0, 3.0], [0.3, 0.1, 0.2, 0.9, 0.9, 0.4]),  # ties on both sides
        (
            list(np.random.default_rng(0).normal(size=40)),
            list(np.random.default_rng(1).normal(size=40)),
        ),
    ],
)
def test_spearman_equals_scipy(x, y):
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    np.testing.assert_array_equal(metrics.average_ranks(x), scipy.stats.rankdata(x))


def test_spearman_of_too_few_or_constant_values_is_nan():
    assert np.isnan(metrics.spearman([1.0], [2.0]))
    assert np.isnan(metrics.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="pairs"):
        metrics.spearman([1.0, 2.0], [1.0])


def _record(method, pairs):
    return results.RunRecord(
        method=method,
        seed=0,
        accuracy_matrix=[[1.0]],
        curves=[],
        task_wall_time_s=[0.0],
        fisher_wall_time_s=[0.0],
        steps_per_task=[1],
        metrics={},
        forecast=[
            {"after_task": 1, "task": 0, "predicted": p, "measured_train": a, "measured_test": b}
            for p, a, b in pairs
        ],
    )


def test_forecast_figure_has_a_series_per_method_and_split():
    runs = [
        _record("ewc", [(1e-3, 1e-2, 2e-2), (1e-2, 5e-2, -1.0)]),
        _record("kfac", [(2e-3, 3e-3, 4e-3)]),
        _record("finetune", []),  # no forecast: not drawn
    ]
    figure = plots.forecast_figure(runs)
    (ax,) = figure.axes
    labels = [c.get_label() for c in ax.collections]
    assert labels == ["ewc (train)", "ewc (test, 1 not > 0)", "kfac (train)", "kfac (test)"]
    colours = [tuple(c.get_edgecolor()[0]) for c in ax.collections]
    assert colours[0] == colours[1] != colours[2] == colours[3]  # one colour per method
    assert ax.get_xscale() == ax.get_yscale() == "log"
    np.testing.assert_array_equal(ax.collections[1].get_offsets(), [[1e-3, 2e-2]])


def test_forecast_figure_without_a_positive_rise_is_still_written(tmp_path):
    # A later task can lower an earlier task's loss (one language helping another): no point
    # can be drawn on log axes, and the figure must still be written.
    runs = [_record("ewc", [(1e-3, -0.5, -0.4)])]
    path = plots.plot_forgetting_forecast(runs, tmp_path / "forecast.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = plots.forecast_figure(runs).axes
    assert [len(c.get_offsets()) for c in ax.collections] == [0, 0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("forecast")
    config = tiny_config(
        methods=("finetune", "ewc"), num_tasks=3, optimizer="adam", learning_rate=3e-3
    )
    return train.train_and_evaluate(config, workdir), workdir


def test_results_json_holds_the_forecast(tiny_run):
    _, workdir = tiny_run
    on_disk = json.loads((workdir / "results.json").read_text())
    finetune, ewc = on_disk["runs"]
    assert finetune["forecast"] == [] and finetune["own_losses"] == []
    # After task t, every k < t: (1, 0), (2, 0), (2, 1).
    assert [(p["after_task"], p["task"]) for p in ewc["forecast"]] == [(1, 0), (2, 0), (2, 1)]
    assert all(
        set(p) == {"after_task", "task", "predicted", "measured_train", "measured_test"}
        for p in ewc["forecast"]
    )
    assert all(p["predicted"] > 0 for p in ewc["forecast"])
    assert len(ewc["own_losses"]) == 3 and all(len(pair) == 2 for pair in ewc["own_losses"])
    summary = on_disk["summary"]["ewc"]["forgetting_forecast"]
    predicted = [p["predicted"] for p in ewc["forecast"]]
    measured = [p["measured_test"] for p in ewc["forecast"]]
    assert summary["pairs"] == 3
    assert summary["spearman_test"] == pytest.approx(scipy.stats.spearmanr(predicted, measured)[0])
    assert "forgetting_forecast" not in on_disk["summary"]["finetune"]
    assert "forgetting_forecast.png" in on_disk["figures"]
    assert (workdir / "forgetting_forecast.png").stat().st_size > 0


def test_summary_prints_the_rank_correlation(tiny_run):
    output, _ = tiny_run
    text = results.format_summary(output["summary"], output["task_names"])
    f = output["summary"]["ewc"]["forgetting_forecast"]
    assert (
        f"ewc: forgetting forecast ½ Δθᵀ F_k Δθ vs measured loss rise, Spearman ρ train "
        f"{f['spearman_train']:.3f} test {f['spearman_test']:.3f} (3 pairs)"
    ) in text


def test_summary_of_a_single_pair_has_no_correlation():
    summary = results.forecast_summary([_record("ewc", [(1e-3, 1e-2, 2e-2)])])
    assert summary == {"spearman_train": None, "spearman_test": None, "pairs": 1}
    entry = {
        "num_seeds": 1,
        "average_accuracy": {"mean": 0.5},
        "backward_transfer": {"mean": 0.0},
        "average_forgetting": {"mean": 0.0},
        "final_accuracy": {"mean": [0.5]},
        "wall_time_s": {"mean": 1.0},
        "forgetting_forecast": summary,
    }
    text = results.format_summary({"ewc": entry}, ["t0"])
    assert "Spearman ρ train n/a test n/a (1 pairs)" in text
