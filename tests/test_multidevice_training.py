"""Data-parallel training and sharded sweeps on 8 simulated CPU devices equal one device.

XLA fixes the device count at start-up, so the checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The batch size (12), the evaluation
chunk (50), the test set (203) and the Fisher sample count (37) are not multiples of 8, so
equality with one device also shows that padding is masked and no example is dropped.
"""

import pytest
from test_multidevice import run_on_8_devices


@pytest.mark.slow
def test_training_and_sweep_on_8_devices_equal_one_device():
    out = run_on_8_devices(
        """
        import tempfile
        import jax, jax.numpy as jnp, numpy as np
        import ewc_jax
        from experiments import config as config_lib, scenarios
        from experiments.runs import experiment as train
        from experiments.training import consolidation, device as device_data, steps
        from experiments.configs import default
        from experiments.data import load_dataset

        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")
        assert jax.device_count() == 8, jax.devices()

        config = default.get_config()
        config.datasets = ("embedded:digits",)
        config.num_tasks = 2
        config.train_limit = 300
        config.test_limit = 203
        config.hidden_sizes = (16,)
        config.batch_size = 12
        config.eval_batch_size = 50
        config.steps_per_task = 30
        config.learning_rate = 0.05
        config.methods = ("ewc",)
        config.strength = 20.0
        config.fisher_samples = 37
        datasets = {"embedded:digits": load_dataset("embedded:digits")}
        run_spec = config_lib.read_spec(config)
        scenario = scenarios.build_scenario(run_spec.data, datasets, 0)
        spec = run_spec.methods[0]

        def train_two_tasks(mesh):
            setup = steps.build_setup(
                run_spec.model, run_spec.optimizer, run_spec.schedule, scenario, mesh=mesh
            )
            data = device_data.put_scenario(scenario, mesh=mesh)
            state = steps.init_state(
                jax.random.key(0), data.test[0].images[:1], config.strength, setup=setup
            )
            accuracy = []
            for i, task in enumerate(data.train):
                state = steps.reset_optimizer(state, setup=setup)._replace(
                    key=jax.random.key(i + 1)
                )
                state, loss = steps.train_epoch(state, task, jnp.int32(25), setup=setup)
                accuracy.append(
                    [float(steps.evaluate(state.params, t, setup=setup)) for t in data.test]
                )
                fisher = consolidation.fisher(
                    state.params, task.images[:37], task.labels[:37], task.heads[:37], None,
                    setup=setup, method=spec,
                )
                state = state._replace(
                    ewc_state=ewc_jax.consolidate(state.ewc_state, state.params, fisher)
                )
            return setup, data, state.params, np.asarray(accuracy), fisher

        assert device_data.data_mesh(run_spec.mesh) is None
        config.data_parallel = True
        mesh = device_data.data_mesh(config_lib.read_spec(config).mesh)
        assert mesh.devices.size == 8
        _, _, params_1, acc_1, fisher_1 = train_two_tasks(None)
        setup, data, params_8, acc_8, fisher_8 = train_two_tasks(mesh)
        assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(params_8))
        state_8 = steps.init_state(jax.random.key(0), data.test[0].images[:1], 1.0, setup=setup)
        hlo = steps.train_epoch.lower(
            state_8, data.train[0], jnp.int32(1), setup=setup
        ).compile().as_text()
        assert "all-reduce" in hlo
        np.testing.assert_allclose(acc_8, acc_1, atol=1e-6)
        for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
        for a, b in zip(jax.tree.leaves(fisher_8), jax.tree.leaves(fisher_1), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)

        # The whole run through train_and_evaluate, one device vs the mesh.
        matrices = {}
        for parallel in (False, True):
            config.data_parallel = parallel
            result = train.train_and_evaluate(config, tempfile.mkdtemp())
            matrices[parallel] = np.asarray(result["runs"][0]["accuracy_matrix"])
        np.testing.assert_allclose(matrices[True], matrices[False], atol=1e-6)

        # A sweep of 3 runs (padded to 8) split over the devices equals the unsplit sweep.
        config.sweep.seeds = 1
        config.sweep.strengths = (0.0, 5.0, 50.0)
        config.steps_per_task = 15
        sweeps = {}
        for parallel in (False, True):
            config.data_parallel = parallel
            result = train.train_and_evaluate(config, tempfile.mkdtemp())
            sweeps[parallel] = np.asarray([r["accuracy_matrix"] for r in result["runs"]])
        assert sweeps[True].shape == (3, 2, 2)
        np.testing.assert_allclose(sweeps[True], sweeps[False], atol=1e-6)
        print("ok", jax.device_count())
        """
    )
    assert "ok 8" in out
