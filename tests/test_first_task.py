"""Shared first-task params (``config.first_task_params``): a run that loads task 1 gives the
matrix of the run that trained it, a store of another task 1 or a damaged one is refused in one
line, SI trains task 1 itself, and the store's save is all or nothing, first writer wins."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_lm import needs_fortunes

from experiments.configs import fortunes_lm
from experiments.runs.experiment import train_and_evaluate
from experiments.storage import checkpoint
from experiments.storage.first_task import FirstTaskError, FirstTaskParams


def _config(shared, methods=("ewc",), **overrides):
    """``fortunes_lm.py:small`` cut down: 2 languages, 6 steps each, 24 Fisher windows."""
    config = fortunes_lm.get_config("small")
    config.methods = methods
    config.steps_per_task = 6
    config.eval_every_steps = 3
    config.fisher_samples = 24
    config.test_limit = 32
    config.first_task_params = str(shared) if shared else ""
    for field, value in overrides.items():
        config[field] = value
    return config


def _matrices(results):
    return {run["method"]: np.asarray(run["accuracy_matrix"]) for run in results["runs"]}


@pytest.mark.slow
@needs_fortunes
def test_a_run_that_loads_task_1_gives_the_matrix_of_the_run_that_trained_it(tmp_path, capsys):
    shared = tmp_path / "first_task"
    # The reference: no shared params at all (the loop as it was).
    alone = train_and_evaluate(_config(None), tmp_path / "alone")
    trained = train_and_evaluate(_config(shared), tmp_path / "trains")
    assert "task 1 saved to" in capsys.readouterr().out
    assert (shared / "seed0" / checkpoint.MARKER).is_file()
    loaded = train_and_evaluate(_config(shared, ("ewc", "finetune")), tmp_path / "loads")
    out = capsys.readouterr().out
    assert out.count("task 1: 6 steps loaded from") == 2 and "saved to" not in out
    # Bit for bit: the loaded run restarts from the saver's parameters, optimiser state and key.
    np.testing.assert_array_equal(_matrices(trained)["ewc"], _matrices(alone)["ewc"])
    np.testing.assert_array_equal(_matrices(loaded)["ewc"], _matrices(alone)["ewc"])
    # Finetune's task 1 row is EWC's (no penalty before the first consolidation), its task 2
    # row its own: the matrix of finetune training task 1 itself.
    finetune = train_and_evaluate(_config(None, ("finetune",)), tmp_path / "finetune")
    np.testing.assert_allclose(
        _matrices(loaded)["finetune"], _matrices(finetune)["finetune"], rtol=1e-5
    )
    assert not np.allclose(_matrices(loaded)["finetune"][1], _matrices(loaded)["ewc"][1])
    # The learning curve of task 1 comes with the params.
    curves = next(run["curves"] for run in loaded["runs"] if run["method"] == "ewc")
    reference = next(run["curves"] for run in alone["runs"])
    assert [c for c in curves if c["task"] == 0] == [c for c in reference if c["task"] == 0]

    # Another task 1 (a batch size of 8, not 16) is refused in one line naming the difference.
    with pytest.raises(FirstTaskError, match=r"another task 1 .*batch_size: 16 -> 8") as error:
        train_and_evaluate(_config(shared, batch_size=8), tmp_path / "other")
    assert "\n" not in str(error.value) and "seed0" in str(error.value)

    # SI's path integral runs during task 1: it trains task 1 itself and saves nothing.
    si_shared = tmp_path / "si_first_task"
    train_and_evaluate(_config(si_shared, ("si",)), tmp_path / "si")
    assert "[si seed 0] trains task 1 itself" in capsys.readouterr().out
    assert not si_shared.exists()

    # A flipped byte of a saved array is refused, and so is an edited marker.
    state = shared / "seed0" / checkpoint.STATE
    victim = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(FirstTaskError, match=r"are damaged: state/.* is changed since it was"):
        train_and_evaluate(_config(shared), tmp_path / "corrupt")


@pytest.mark.slow
@needs_fortunes
def test_a_sweep_loads_task_1_of_its_seeds_single_run_and_refuses_another_scenario(
    tmp_path, capsys
):
    shared = tmp_path / "first_task"

    def sweep_config(directory, seeds=1):
        config = _config(directory)
        config.sweep.seeds, config.sweep.strengths = seeds, (0.1, 1.0)
        return config

    reference = train_and_evaluate(sweep_config(None), tmp_path / "reference")
    train_and_evaluate(_config(shared, seeds=(0, 1)), tmp_path / "singles")
    loaded = train_and_evaluate(sweep_config(shared), tmp_path / "sweep")
    assert f"loaded from {shared / 'seed0'} " in capsys.readouterr().out
    # Both strengths restart from seed 0's single run; the reference sweep's vmapped task 1 is
    # the same training in another compiled program: equal to rounding.
    assert [r["strength"] for r in loaded["runs"]] == [0.1, 1.0]
    for ours, theirs in zip(loaded["runs"], reference["runs"], strict=True):
        np.testing.assert_allclose(ours["accuracy_matrix"], theirs["accuracy_matrix"], rtol=1e-4)
    first, second = (np.asarray(r["accuracy_matrix"]) for r in loaded["runs"])
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.allclose(first[1], second[1])
    # A sweep builds every run's scenario from its first seed: seed 1's run trains on seed 0's
    # subset of windows (train_limit), another task 1 than seed 1's single run saved.
    with pytest.raises(FirstTaskError, match=r"seed1 were trained .*differs in train_data_sha"):
        train_and_evaluate(sweep_config(shared, seeds=2), tmp_path / "two_seeds")


def test_store_save_is_first_writer_wins_and_refuses_edits_and_other_identities(tmp_path):
    identity = {"seed": 0, "steps": 5}
    store = FirstTaskParams(tmp_path, 0, identity)
    assert store.load({"w": jnp.zeros(3)}) is None
    assert store.save({"w": jnp.arange(3.0)}, {"steps_done": 5}) == tmp_path / "seed0"
    # A second writer (another run finishing task 1 at the same time) leaves the first copy.
    assert store.save({"w": jnp.ones(3)}, {"steps_done": 5}) is None
    arrays, progress = store.load({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(arrays["w"], [0.0, 1.0, 2.0])
    assert progress == {"steps_done": 5}
    assert [p.name for p in tmp_path.iterdir()] == ["seed0"]  # no staging directory left

    other = FirstTaskParams(tmp_path, 0, {"seed": 0, "steps": 6})
    with pytest.raises(FirstTaskError, match=r"another task 1 \(differs in steps: 5 -> 6\)"):
        other.load({"w": jnp.zeros(3)})
    with pytest.raises(FirstTaskError, match=r"cannot be restored|hold arrays of another model"):
        store.load({"w": jnp.zeros(4)})

    marker_path = tmp_path / "seed0" / checkpoint.MARKER
    marker = json.loads(marker_path.read_text())
    marker["progress"]["steps_done"] = 50
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(FirstTaskError, match=r"checkpoint\.json was changed since it was saved"):
        store.load({"w": jnp.zeros(3)})
    marker_path.write_text("{not json")
    with pytest.raises(FirstTaskError, match="are corrupt"):
        store.load({"w": jnp.zeros(3)})


def test_the_large_lm_config_shares_its_pretraining_and_has_about_1_3m_parameters():
    import jax

    from experiments import config as config_lib
    from experiments import models

    spec = config_lib.read_spec(fortunes_lm.get_config("large"))
    assert spec.first_task_params == fortunes_lm.LARGE_FIRST_TASK
    assert [m.name for m in spec.methods] == ["finetune", "l2", "ewc", "online_ewc", "kfac"]
    assert all(m.method.shares_first_task for m in spec.methods)
    # The seed-0 sweep's best (docs/results.md).
    strengths = {m.name: m.strength for m in spec.methods if m.name != "finetune"}
    assert strengths == {"l2": 0.03, "ewc": 1.0, "online_ewc": 1.0, "kfac": 1.0}
    model = models.build(spec.model, num_heads=1, num_outputs=256)
    tokens = jnp.zeros((1, 64), jnp.int32)
    shapes = jax.eval_shape(
        lambda key: models.init_params(model, key, tokens, jnp.zeros(1, jnp.int32), "flax"),
        jax.random.key(0),
    )
    # Per block: attention 4 (D² + D), MLP 8 D² + 5 D, two LayerNorms 4 D; embeddings 256 D and
    # 64 D; the final LayerNorm 2 D and the output layer 256 D + 256.
    width, blocks = 160, 4
    per_block = 4 * (width**2 + width) + 8 * width**2 + 5 * width + 4 * width
    expected = blocks * per_block + 256 * width + 64 * width + 2 * width + 256 * width + 256
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == expected == 1_329_856
