"""FSDP (``param_sharding="fsdp"``): params, optimiser and EWC state split over 8 simulated CPU
devices give the single-device results, and a checkpoint restores them split.

XLA fixes the device count at start-up, so the run is one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``test_multidevice.run_on_8_devices``).
"""

import pytest
from jax.sharding import PartitionSpec as P
from test_lm import needs_fortunes
from test_multidevice import run_on_8_devices

from experiments import config as config_lib
from experiments.configs import fortunes_lm
from experiments.training.device import fsdp_spec


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert fsdp_spec((32, 256), 8) == P(None, "data")
    assert fsdp_spec((64, 8), 8) == P("data")
    assert fsdp_spec((2, 16, 16), 8) == P(None, "data")  # a tie: the first
    assert fsdp_spec((3, 5), 8) == P()
    assert fsdp_spec((0, 3), 8) == P()
    assert fsdp_spec((), 8) == P()


def test_fsdp_config_is_validated():
    config = fortunes_lm.get_config("small")
    config.param_sharding = "zero3"
    with pytest.raises(config_lib.ConfigError, match="unknown param_sharding 'zero3'"):
        config_lib.validate(config)
    config.param_sharding = "fsdp"
    with pytest.raises(config_lib.ConfigError, match="set data_parallel"):
        config_lib.validate(config)
    config.data_parallel = True
    config_lib.validate(config)
    config.sweep.seeds = 2
    with pytest.raises(config_lib.ConfigError, match="for single runs"):
        config_lib.validate(config)


@pytest.mark.slow
@needs_fortunes
def test_fsdp_lm_on_8_devices_equals_one_device_and_resumes_sharded():
    out = run_on_8_devices(
        """
        import dataclasses, shutil, tempfile
        from pathlib import Path
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from experiments import config as config_lib, scenarios
        from experiments.runs import experiment as train, resume
        from experiments.storage import checkpoint
        from experiments.training import device as device_data, loop, runners, steps
        from experiments.configs import fortunes_lm
        from experiments.data import load_datasets

        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")
        assert jax.device_count() == 8

        def small(**fields):
            config = fortunes_lm.get_config("small")
            config.steps_per_task = 12
            config.batch_size = 12  # not a multiple of 8: padded, masked
            config.fisher_samples = 37
            config.test_limit = 61
            config.methods = ("ewc", "kfac")
            for name, value in fields.items():
                config[name] = value
            return config

        # One device, replicated: the matrices of results.json (EWC, K-FAC-expand).
        result = train.train_and_evaluate(small(), tempfile.mkdtemp())
        matrix_1, kfac_1 = (np.asarray(run["accuracy_matrix"]) for run in result["runs"])

        # FSDP over 8: the loop of train.run_all, its state kept and checkpointed as there.
        config = small(data_parallel=True, param_sharding="fsdp")
        run_spec = config_lib.read_spec(config)
        scenario = scenarios.build_scenario(run_spec.data, load_datasets(config.datasets), 0)
        mesh = device_data.data_mesh(run_spec.mesh)
        setup = steps.build_setup(
            run_spec.model, run_spec.optimizer, run_spec.schedule, scenario, mesh=mesh,
            param_sharding="fsdp",
        )
        data = device_data.put_for_methods(scenario, run_spec.methods, mesh)
        spec = run_spec.methods[0]
        plan = loop.make_plan(
            run_spec.schedule, run_spec.optimizer, data, spec, (0,), label="[fsdp]"
        )
        fns = runners.single_run_fns(setup, spec, 0, data)
        directory = Path(tempfile.mkdtemp()) / "ewc-seed0"
        saved = []

        def save(state):  # as resume.run_with_checkpoints saves
            ckpts = checkpoint.RunCheckpoints(directory, "f" * 64)
            progress = dataclasses.asdict(state.progress)
            saved.append(ckpts.save(resume.storable(state.arrays), progress))

        final = loop.run(loop.start(plan, fns), plan, fns, data, save)
        matrix_8 = np.asarray(final.progress.accuracy_rows)
        print("max difference", np.abs(matrix_8 - matrix_1).max())
        np.testing.assert_allclose(matrix_8, matrix_1, rtol=2e-5)

        def check_split(arrays, what):
            kernel = arrays.params["Dense_0"]["kernel"]  # [32, 256]: columns split
            assert kernel.sharding.spec == P(None, "data"), (what, kernel.sharding)
            assert {s.data.shape for s in kernel.addressable_shards} == {(32, 32)}, what
            adam = arrays.opt_state[0]
            for tree in (adam.mu, adam.nu, arrays.ewc_state.anchor, arrays.ewc_state.precision):
                leaves = jax.tree.leaves(tree)
                want = device_data.param_shardings(leaves, mesh)
                for leaf, sharding in zip(leaves, want, strict=True):
                    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), what
            split = [leaf for leaf in jax.tree.leaves(arrays.params) if leaf.sharding.spec != P()]
            return len(split), len(jax.tree.leaves(arrays.params))

        print("split leaves", check_split(final.arrays, "trained"))
        ckpts = checkpoint.RunCheckpoints(directory, "f" * 64)
        restored, _ = ckpts.restore(resume.storable(loop.start(plan, fns).arrays))
        restored = resume.from_storable(restored)
        check_split(restored, "restored")
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(final.arrays), strict=True):
            if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        # Resume from the checkpoint after task 1: the same second row, bit for bit.
        shutil.rmtree(saved[-1])
        progress = resume.run_with_checkpoints(
            plan, fns, data, checkpoint.RunCheckpoints(directory, "f" * 64)
        )
        assert progress.task == 2
        np.testing.assert_array_equal(progress.accuracy_rows, final.progress.accuracy_rows)

        # K-FAC on the FSDP-split params: its factors and penalty give the same matrix.
        spec = run_spec.methods[1]
        plan = loop.make_plan(
            run_spec.schedule, run_spec.optimizer, data, spec, (0,), label="[fsdp kfac]"
        )
        fns = runners.single_run_fns(setup, spec, 0, data)
        final = loop.run(loop.start(plan, fns), plan, fns, data)
        assert len(final.arrays.ewc_state.layers) == 7  # q, k, v, out, 2 MLP, output layer
        kfac_8 = np.asarray(final.progress.accuracy_rows)
        print("kfac max difference", np.abs(kfac_8 - kfac_1).max())
        np.testing.assert_allclose(kfac_8, kfac_1, rtol=2e-5)
        print("ok", jax.device_count())
        """
    )
    print(out)
    assert "ok 8" in out
