"""``--config.strengths.<method>=evidence``: the experiments choose λ by the Laplace evidence.

The choice is checked against :func:`ewc_jax.evidence.evidence_strength` called by hand on the
same inputs; changing λ must not recompile the jitted epoch, and a run stopped after a
checkpoint resumes to the uninterrupted run's results bit for bit.
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _resume import TINY_ARGS, kill_after_line_then_resume, tiny_config

import ewc_jax
import ewc_jax.evidence
from experiments import config as config_lib
from experiments import models
from experiments.reporting import plots
from experiments.runs import experiment as train
from experiments.storage import checkpoint
from experiments.training import consolidation, steps
from experiments.training import device as device_data
from experiments.training.methods import METHODS, MethodSpec


def test_evidence_is_accepted_for_fisher_methods_only():
    config = tiny_config(methods=("finetune", "ewc", "online_ewc", "kfac"), evidence_every=2)
    config.strengths.ewc = "evidence"
    config.strengths.kfac = "evidence"
    methods = {m.name: m for m in config_lib.read_spec(config).methods}
    assert methods["ewc"].evidence and methods["kfac"].evidence
    # The starting λ is 1 (the earlier tasks' posterior as it is), whatever `strength` says.
    assert methods["ewc"].strength == methods["kfac"].strength == 1.0
    assert methods["ewc"].evidence_every == 2
    assert not methods["online_ewc"].evidence and methods["online_ewc"].strength == 1000.0
    assert not methods["finetune"].evidence
    assert [name for name, entry in METHODS.items() if entry.laplace] == [
        "ewc",
        "online_ewc",
        "kfac",
    ]


@pytest.mark.parametrize(
    ("field", "value", "sweep", "match"),
    [
        ("l2", "evidence", False, r"^strengths.l2=evidence: method 'l2' has no Fisher precision"),
        ("si", "evidence", False, r"evidence works for ewc, online_ewc, kfac$"),
        ("ewc", "evidnce", False, r"^strengths.ewc must be a finite number >= 0 or 'evidence'"),
        ("mas", "evidence", False, r"^strengths.mas=evidence: method 'mas'"),
        ("kfac", "evidence", True, r"^strengths.kfac=evidence chooses the strength in single runs"),
    ],
)
def test_evidence_is_refused_in_one_line(field, value, sweep, match):
    config = tiny_config(methods=("ewc", "kfac"))
    config.strengths[field] = value
    if sweep:
        config.sweep.seeds = 2
    with pytest.raises(config_lib.ConfigError, match=match) as error:
        config_lib.read_spec(config)
    assert "\n" not in str(error.value)


def test_evidence_every_must_be_a_count():
    config = tiny_config(evidence_every=-1)
    with pytest.raises(config_lib.ConfigError, match=r"evidence_every must be >= 0"):
        config_lib.read_spec(config)


def _task(num: int, seed: int, shift: float) -> device_data.TaskData:
    rng = np.random.default_rng(seed)
    images = (rng.random((num, 4, 4, 1)) + shift).astype(np.float32)
    labels = rng.integers(0, 3, num).astype(np.int32)
    return device_data.pad_task_data(images, labels, np.zeros(num, np.int32), num)


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "kfac"])
def test_choice_equals_evidence_strength_by_hand(name):
    """Two tiny tasks: after consolidating the first and training on the second, the chosen
    λ is ``evidence_strength`` of the consolidated state, the current parameters and the
    second task's Fisher computed here with the library's own estimator."""
    method = MethodSpec(name, strength=1.0, estimator="exact", fisher_samples=24, evidence=True)
    model = models.build_model("mlp", num_heads=1, num_outputs=3, hidden_sizes=(6,))
    setup = steps.method_setup(steps.StepSetup(model, optax.adam(3e-2), batch_size=8), method)
    first, second = _task(24, 0, 0.0), _task(24, 1, 0.5)
    state = steps.init_state(jax.random.key(0), first.images[:1], 1.0, setup=setup)
    state, _ = steps.train_epoch(state, first, jnp.int32(3), setup=setup)
    state = consolidation.consolidate_task(
        state, first.images, first.labels, first.heads, setup=setup, method=method
    )
    state, _ = steps.train_epoch(state, second, jnp.int32(3), setup=setup)

    chosen_state, chosen = consolidation.choose_strength_jit(
        state,
        second.images,
        second.labels,
        second.heads,
        setup=setup,
        method=method,
        num_examples=240,
    )

    logits = setup.logits
    inputs = (second.images, second.heads)
    if name == "kfac":
        curvature = ewc_jax.kfac.kfac_fisher(logits, state.params, inputs, estimator="exact")
    else:
        curvature = ewc_jax.fisher_diagonal(logits, state.params, inputs, estimator="exact")
    by_hand = ewc_jax.evidence.evidence_strength(
        state.ewc_state, state.params, curvature, num_examples=240
    )
    assert np.isfinite(float(by_hand.strength)) and float(by_hand.strength) > 0
    np.testing.assert_allclose(float(chosen.strength), float(by_hand.strength), rtol=1e-4)
    np.testing.assert_allclose(float(chosen_state.strength), float(by_hand.strength), rtol=1e-4)
    np.testing.assert_allclose(
        float(chosen.effective_parameters), float(by_hand.effective_parameters), rtol=1e-4
    )
    # Only the strength and the key change; the parameters and the EWC state do not.
    assert jax.tree.all(jax.tree.map(jnp.array_equal, chosen_state.params, state.params))
    assert chosen_state.strength.dtype == state.strength.dtype


def test_changing_the_chosen_strength_does_not_recompile():
    method = MethodSpec("ewc", strength=1.0, fisher_samples=16, evidence=True)
    model = models.build_model("mlp", num_heads=1, num_outputs=3, hidden_sizes=(5,))
    setup = steps.method_setup(steps.StepSetup(model, optax.adam(3e-2), batch_size=4), method)
    first, second = _task(16, 2, 0.0), _task(16, 3, 0.5)
    state = steps.init_state(jax.random.key(1), first.images[:1], 1.0, setup=setup)
    epochs, choices = (
        steps.train_epoch._cache_size(),
        consolidation.choose_strength_jit._cache_size(),
    )
    state, _ = steps.train_epoch(state, first, jnp.int32(4), setup=setup)
    state = consolidation.consolidate_task(
        state, first.images, first.labels, first.heads, setup=setup, method=method
    )
    seen = set()
    for _ in range(3):
        state, _ = steps.train_epoch(state, second, jnp.int32(4), setup=setup)
        state, chosen = consolidation.choose_strength_jit(
            state,
            second.images,
            second.labels,
            second.heads,
            setup=setup,
            method=method,
            num_examples=16,
        )
        seen.add(float(chosen.strength))
    assert len(seen) == 3  # λ moved at every choice ...
    # ... and each jitted function compiled once.
    assert steps.train_epoch._cache_size() == epochs + 1
    assert consolidation.choose_strength_jit._cache_size() == choices + 1


TIMINGS = ("task_wall_time_s", "fisher_wall_time_s", "wall_time_s", "environment")


def _without_timings(tree):
    if isinstance(tree, dict):
        return {k: _without_timings(v) for k, v in tree.items() if k not in TIMINGS}
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


def _evidence_config():
    """The resume tests' tiny run, EWC only, λ by the evidence after every epoch (not the
    default, task ends only, so that checkpoints fall between choices within a task)."""
    config = tiny_config(methods=("ewc",), optimizer="adam", learning_rate=3e-3, evidence_every=1)
    config.strengths.ewc = "evidence"
    return config


class Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint was written."""


@pytest.fixture(scope="module")
def evidence_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evidence-reference")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as log:
        patch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        results = train.train_and_evaluate(_evidence_config(), workdir)
    return results, log.getvalue()


def test_results_carry_the_strength_chosen_per_task(evidence_reference):
    results, log = evidence_reference
    run = results["runs"][0]
    assert run["strengths_per_task"][0] is None  # the first task has no prior
    assert run["strengths_per_task"][1] > 0
    # Task 2 of 3 epochs (45 steps each): choices after epochs 1 and 2, then at its end.
    assert [(c["task"], c["epoch"]) for c in run["strength_choices"]] == [(1, 1), (1, 2), (1, 3)]
    assert run["strength_choices"][-1]["strength"] == run["strengths_per_task"][1]
    assert results["summary"]["ewc"]["strengths_per_task"] == [run["strengths_per_task"]]
    assert f"evidence λ {run['strengths_per_task'][1]:.4g}" in log
    assert "ewc: evidence λ per task (per seed): - " in log


def test_stopped_evidence_run_resumes_bit_identical(tmp_path, monkeypatch, evidence_reference):
    expected = _without_timings(evidence_reference[0])
    original_save = checkpoint.RunCheckpoints.save
    # Saves: task 1 step 90, task 2 step 0, task 2 step 90 (after two choices), finished.
    for stop_after in (2, 3):
        workdir = tmp_path / f"stopped-{stop_after}"
        count = 0

        def save_then_stop(self, arrays, progress, stop_after=stop_after):
            nonlocal count
            path = original_save(self, arrays, progress)
            count += 1
            if count == stop_after:
                raise Killed
            return path

        monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save_then_stop)
        monkeypatch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        with pytest.raises(Killed):
            train.train_and_evaluate(_evidence_config(), workdir)
        monkeypatch.setattr(checkpoint.RunCheckpoints, "save", original_save)
        resumed = _without_timings(train.train_and_evaluate(_evidence_config(), workdir))
        assert resumed == expected, f"stopped after checkpoint {stop_after}"


@pytest.mark.slow
def test_sigkill_mid_task_evidence_run_resumes_bit_identical(tmp_path, evidence_reference):
    args = [
        *(a for a in TINY_ARGS if not a.startswith("--config.methods")),
        "--config.methods=ewc",
        "--config.optimizer=adam",
        "--config.learning_rate=3e-3",
        "--config.strengths.ewc=evidence",
        "--config.evidence_every=1",
    ]
    resumed = kill_after_line_then_resume(
        args, tmp_path / "killed", "[ewc seed 0] checkpoint", "(task 2, step 90)", tmp_path
    )
    assert "[ewc seed 0] resuming task 2/2 at step 90" in resumed.stdout
    import json

    results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert _without_timings(results["runs"]) == _without_timings(evidence_reference[0]["runs"])
