"""K-FAC on the continual language model: ``fortunes_lm.py:small`` with ``--config.methods=kfac``
runs with K-FAC-expand and K-FAC-reduce, and its state has a Kronecker block for every Dense
and DenseGeneral layer of the transformer (attention's q/k/v/out projections, the MLP, the
output layer); embeddings and LayerNorms keep the diagonal Fisher."""

import jax
import numpy as np
import pytest
from test_lm import needs_fortunes

import ewc_jax
from experiments import config as config_lib
from experiments import scenarios
from experiments.configs import fortunes_lm
from experiments.data import load_datasets
from experiments.training import device as device_data
from experiments.training import loop, runners, steps


def _run(config):
    """The config's one run through :func:`experiments.training.loop.run` (what
    ``train_and_evaluate`` runs, without its reports): the bits-per-character matrix and the
    final state."""
    run_spec = config_lib.read_spec(config)
    scenario = scenarios.build_scenario(run_spec.data, load_datasets(config.datasets), 0)
    setup = steps.build_setup(run_spec.model, run_spec.optimizer, run_spec.schedule, scenario)
    data = device_data.put_for_methods(scenario, run_spec.methods, None)
    (spec,) = run_spec.methods
    plan = loop.make_plan(run_spec.schedule, run_spec.optimizer, data, spec, (0,), label="[lm]")
    fns = runners.single_run_fns(setup, spec, 0, data)
    final = loop.run(loop.start(plan, fns), plan, fns, data)
    return np.asarray(final.progress.accuracy_rows), final.arrays


@pytest.mark.slow
@needs_fortunes
def test_small_lm_config_runs_kfac_expand_and_reduce():
    results = {}
    for sequence in ewc_jax.kfac.SEQUENCE_MODES:
        config = fortunes_lm.get_config("small")
        config.methods = ("kfac",)
        config.kfac_sequence = sequence
        config.steps_per_task = 6
        config.eval_every_steps = 0
        config.fisher_samples = 24
        config.test_limit = 32
        assert config_lib.read_spec(config).methods[0].kfac_sequence == sequence
        results[sequence] = _run(config)

    for sequence, (matrix, arrays) in results.items():
        assert matrix.shape == (2, 2) and np.all(np.isfinite(matrix)), (sequence, matrix)
        assert np.all(matrix < 8.5), (sequence, matrix)  # about uniform bytes (8 bits) or better
        state = arrays.ewc_state
        assert isinstance(state, ewc_jax.kfac.KFACState) and int(state.num_tasks) == 2
        params = arrays.params
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        leaves = jax.tree.leaves(params)
        # Every kernel of the model is a Dense or DenseGeneral layer's (one block: query, key,
        # value [D, H, Dh], out [H, Dh, D], the MLP's two Dense, the output Dense): 7 blocks,
        # each with its own bias.
        kernels = [path for path in paths if path.endswith("['kernel']")]
        assert len(kernels) == 7
        blocks = {paths[t.kernel]: paths[t.bias] for t in state.layers}
        assert blocks == {k: k.replace("['kernel']", "['bias']") for k in kernels}, sequence
        for terms in state.layers:
            kernel = leaves[terms.kernel]
            out = terms.g.shape[-1]
            assert terms.a.shape[1:] == (kernel.size // out + 1,) * 2, paths[terms.kernel]
            assert leaves[terms.bias].size == out
        # The diagonal part holds the rest: embeddings, positions and LayerNorms.
        covered = {t.kernel for t in state.layers} | {t.bias for t in state.layers}
        for i, precision in enumerate(jax.tree.leaves(state.diagonal.precision)):
            if i in covered:
                np.testing.assert_array_equal(precision, 0.0, err_msg=paths[i])
            else:
                assert float(np.max(precision)) > 0, paths[i]
    # The mode reaches kfac_fisher: the input factors of a layer over the positions differ.
    expand, reduce = (results[s][1].ewc_state.layers for s in ("expand", "reduce"))
    assert not np.allclose(expand[0].a, reduce[0].a, rtol=1e-3)


def test_kfac_sequence_is_validated():
    config = fortunes_lm.get_config("small")
    config.methods = ("kfac",)
    config.kfac_sequence = "mean"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^unknown kfac_sequence 'mean'; valid choices: expand, reduce$",
    ):
        config_lib.validate(config)
