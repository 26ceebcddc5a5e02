"""Low-rank adapters on the language model (``config.lora_rank``): the adapted model against the
base model with merged kernels, the frozen halves of each task, the penalty over the adapters
only against a hand-computed sum, the config's refusals and a small end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_lm import needs_fortunes

import ewc_jax
from experiments import config as config_lib
from experiments.configs import fortunes_lm
from experiments.models.language import CausalTransformer
from experiments.runs import experiment as train
from experiments.training import consolidation, steps
from experiments.training import device as device_data
from experiments.training.methods import MethodSpec

RANK, ALPHA = 3, 6.0


def _split(tree, path=()):
    """``(base, adapters)`` by hand: ``{path: leaf}`` of the leaves outside and under a
    ``lora`` key (independent of :func:`experiments.models.lora.adapter_mask`)."""
    base, adapters = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner_base, inner_adapters = _split(value, (*path, key))
            base.update(inner_base)
            adapters.update(inner_adapters)
        elif "lora" in path:
            adapters[(*path, key)] = value
        else:
            base[(*path, key)] = value
    return base, adapters


def _strip(tree):
    """``tree`` without its ``lora`` sub-trees: the base model's parameters."""
    return {k: _strip(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "lora"}


def _merged(tree):
    """The base model's parameters with every adapter folded into its kernel,
    ``W + (α / r) A B`` (A: input axes x r; B: r x output axes)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and "lora" in value:
            a, b = value["lora"]["a"], value["lora"]["b"]
            update = np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), axes=1)
            kernel = np.asarray(value["kernel"], np.float64) + ALPHA / RANK * update
            out[key] = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": value["bias"]}
        elif isinstance(value, dict):
            out[key] = _merged(value)
        else:
            out[key] = value
    return out


def _models():
    return CausalTransformer(1, 16, 2), CausalTransformer(
        1, 16, 2, lora_rank=RANK, lora_alpha=ALPHA
    )


def test_adapters_at_zero_give_exactly_the_base_model_and_otherwise_the_merged_kernels():
    base_model, lora_model = _models()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 8)), jnp.int32)
    params = lora_model.init(jax.random.key(0), tokens)["params"]
    base_params = base_model.init(jax.random.key(0), tokens)["params"]
    # The base keeps the names and initial values of the model without adapters.
    assert jax.tree.structure(_strip(params)) == jax.tree.structure(base_params)
    for got, want in zip(
        jax.tree.leaves(_strip(params)), jax.tree.leaves(base_params), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    _, adapters = _split(params)
    # q, k, v, out and the two MLP layers, each with A and B; B starts at zero, A does not.
    assert len(adapters) == 12
    assert all(np.all(v == 0) for k, v in adapters.items() if k[-1] == "b")
    assert all(np.std(v) > 0 for k, v in adapters.items() if k[-1] == "a")
    logits = lora_model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(logits, base_model.apply({"params": base_params}, tokens))

    # With random B the adapted model is the base model with W + (α / r) A B.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    leaves = [
        0.3 * jax.random.normal(k, v.shape) if path.endswith("['lora']['b']") else v
        for k, v, path in zip(keys, leaves, paths, strict=True)
    ]
    params = jax.tree.unflatten(treedef, leaves)
    logits = lora_model.apply({"params": params}, tokens)
    reference = base_model.apply({"params": _merged(params)}, tokens)
    assert float(jnp.max(jnp.abs(logits - base_model.apply({"params": base_params}, tokens)))) > 0.1
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)


def _setup_and_data(lora=True):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (24, 8)).astype(np.int32)
    targets = rng.integers(0, 256, (24, 8)).astype(np.int32)
    data = device_data.pad_task_data(tokens, targets, np.zeros(24, np.int32), 24)
    model = _models()[1 if lora else 0]
    setup = steps.StepSetup(
        model, optax.sgd(0.3), batch_size=8, metric="bits_per_character", lora=lora
    )
    return setup, data


def _bits(tree):
    return [np.asarray(leaf).view(np.uint32) for leaf in jax.tree.leaves(tree)]


def test_first_task_trains_the_base_and_later_tasks_only_the_adapters_bit_for_bit():
    setup, data = _setup_and_data()
    state = steps.init_state(jax.random.key(0), data.images[:1], 0.0, setup=setup)
    before_base, before_adapters = _split(state.params)
    compiled = steps.train_epoch._cache_size()
    state, _ = steps.train_epoch(state, data, jnp.int32(3), setup=setup, task=jnp.int32(0))
    base, adapters = _split(state.params)
    assert all(np.array_equal(_bits(adapters[k]), _bits(v)) for k, v in before_adapters.items())
    assert all(not np.array_equal(base[k], v) for k, v in before_base.items())
    # The first task trains the base as the model without adapters does (to float rounding:
    # the compiled programs differ).
    plain_setup, _ = _setup_and_data(lora=False)
    plain = steps.init_state(jax.random.key(0), data.images[:1], 0.0, setup=plain_setup)
    plain, _ = steps.train_epoch(plain, data, jnp.int32(3), setup=plain_setup)
    pairs = zip(jax.tree.leaves(_strip(state.params)), jax.tree.leaves(plain.params), strict=True)
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    state = steps.reset_optimizer(state, setup=setup)
    state, _ = steps.train_epoch(state, data, jnp.int32(3), setup=setup, task=jnp.int32(1))
    after_base, after_adapters = _split(state.params)
    # The task is traced: one program for the adapters' setup (both tasks), one for the plain.
    assert steps.train_epoch._cache_size() == compiled + 2
    for key, value in base.items():  # the base is frozen: every bit as before
        np.testing.assert_array_equal(_bits(after_base[key]), _bits(value), err_msg=str(key))
    assert all(not np.array_equal(after_adapters[k], v) for k, v in adapters.items())


@pytest.mark.parametrize("name", ["l2", "ewc"])
def test_penalty_covers_the_adapters_only_and_equals_the_sum_over_their_leaves(name):
    setup, data = _setup_and_data()
    method = MethodSpec(name, strength=0.7, estimator="empirical", fisher_samples=24)
    setup = steps.method_setup(setup, method)
    state = steps.init_state(jax.random.key(0), data.images[:1], 0.7, setup=setup)
    state, _ = steps.train_epoch(state, data, jnp.int32(3), setup=setup, task=jnp.int32(0))
    state, _ = steps.train_epoch(state, data, jnp.int32(2), setup=setup, task=jnp.int32(1))
    anchor = state.params
    state = consolidation.consolidate_task(
        state, data.images, data.labels, data.heads, setup=setup, method=method
    )
    # The state holds the adapters' leaves only.
    _, anchor_adapters = _split(anchor)
    assert len(jax.tree.leaves(state.ewc_state.precision)) == len(anchor_adapters)
    if name == "l2":
        precision = {k: np.ones_like(v) for k, v in anchor_adapters.items()}
    else:
        full = ewc_jax.fisher_diagonal(
            setup.logits, anchor, (data.images, data.heads), data.labels, estimator="empirical"
        )
        precision = _split(full)[1]
    # Move every parameter, base included, by a known amount.
    moved = jax.tree.map(
        lambda p: p + jnp.linspace(-0.2, 0.3, p.size, dtype=jnp.float32).reshape(p.shape), anchor
    )
    _, moved_adapters = _split(moved)
    by_hand = (
        0.5
        * 0.7
        * sum(
            np.sum(
                np.asarray(precision[k], np.float64)
                * (np.asarray(moved_adapters[k], np.float64) - np.asarray(v, np.float64)) ** 2
            )
            for k, v in anchor_adapters.items()
        )
    )
    got = ewc_jax.penalty(moved, state.ewc_state, 0.7, where=setup.where)
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    assert by_hand > 0


def _kronecker_quadratic(fisher, anchor, params, paths):
    """``Σ_layers vec(X)ᵀ (A ⊗ G) vec(X)`` with ``X = W - W̄`` the kernel as ``[in, out]``
    (``in``: its leading axes; ``out``: the size of ``G``), in float64, over the layers of
    ``fisher`` whose kernel path is in ``paths``."""
    leaves, now = jax.tree.leaves(anchor), jax.tree.leaves(params)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(anchor)]
    total, seen = 0.0, set()
    for factors in fisher.layers:
        if names[factors.kernel] not in paths:
            continue
        assert factors.bias is None  # an adapter factor has no bias
        seen.add(names[factors.kernel])
        out = factors.g.shape[0]
        x = np.asarray(now[factors.kernel], np.float64) - np.asarray(
            leaves[factors.kernel], np.float64
        )
        v = x.reshape(-1, out).reshape(-1)
        kron = np.kron(np.asarray(factors.a, np.float64), np.asarray(factors.g, np.float64))
        total += v @ kron @ v
    assert seen == set(paths), (seen, paths)
    return total


def test_kfac_over_the_adapters_keeps_the_base_frozen_and_penalises_the_adapters():
    """K-FAC with adapters: one Kronecker term per adapter factor (A and B of each of the six
    adapted layers) and none for the base, whose bits stay frozen through the next task; the
    penalty is zero on the base and, on the adapters, the explicit ``jnp.kron`` quadratic of the
    whole model's K-FAC factors (computed without ``where=``)."""
    setup, data = _setup_and_data()
    method = MethodSpec("kfac", strength=0.7, estimator="empirical", fisher_samples=24)
    setup = steps.method_setup(setup, method)
    state = steps.init_state(jax.random.key(0), data.images[:1], 0.7, setup=setup)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    adapter_paths = {n for n in names if "['lora']" in n}
    assert len(adapter_paths) == 12
    assert {names[t.kernel] for t in state.ewc_state.layers} == adapter_paths
    state, _ = steps.train_epoch(state, data, jnp.int32(3), setup=setup, task=jnp.int32(0))
    anchor = state.params
    state = consolidation.consolidate_task(
        state, data.images, data.labels, data.heads, setup=setup, method=method
    )
    base, _ = _split(anchor)
    state = steps.reset_optimizer(state, setup=setup)
    state, _ = steps.train_epoch(state, data, jnp.int32(3), setup=setup, task=jnp.int32(1))
    after_base, after_adapters = _split(state.params)
    for key, value in base.items():  # the base is frozen: every bit as after the first task
        np.testing.assert_array_equal(_bits(after_base[key]), _bits(value), err_msg=str(key))

    full = ewc_jax.kfac.kfac_fisher(
        setup.logits, anchor, (data.images, data.heads), data.labels, estimator="empirical"
    )
    by_hand = 0.5 * 0.7 * _kronecker_quadratic(full, anchor, state.params, adapter_paths)
    got = ewc_jax.penalty(state.params, state.ewc_state, 0.7, where=setup.where)
    assert by_hand > 0
    assert float(got) == pytest.approx(by_hand, rel=1e-4)
    # Moving the base changes nothing; the gradient is zero there, not on the adapters.
    moved_base = jax.tree_util.tree_map_with_path(
        lambda p, v: v if "lora" in jax.tree_util.keystr(p) else v + 0.5, state.params
    )
    assert float(ewc_jax.penalty(moved_base, state.ewc_state, 0.7, where=setup.where)) == float(got)
    grads = jax.grad(ewc_jax.penalty)(state.params, state.ewc_state, 0.7, where=setup.where)
    grad_base, grad_adapters = _split(grads)
    assert all(not np.any(v) for v in grad_base.values())
    assert sum(float(np.sum(np.abs(v))) for v in grad_adapters.values()) > 0
    assert set(grad_adapters) == set(after_adapters)


def test_lora_config_is_validated():
    def refused(match, **fields):
        config = fortunes_lm.get_config("small")
        for key, value in fields.items():
            config[key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.read_spec(config)

    refused(r"lora_rank must be >= 0", lora_rank=-1)
    refused(r"lora_alpha must be a finite number > 0", lora_rank=2, lora_alpha=0.0)
    refused(r"model 'mlp' has none", lora_rank=2, model="mlp")
    refused(
        r"strengths.kfac=evidence with lora_rank > 0",
        lora_rank=2,
        methods=("kfac",),
        strengths={"kfac": "evidence"},
    )
    config = fortunes_lm.get_config("lora")
    assert config_lib.read_spec(config).model.lora_rank == 8
    config.methods = ("kfac",)  # K-FAC over the adapters (where=) is accepted
    assert config_lib.read_spec(config).model.lora_rank == 8


@pytest.mark.slow
@needs_fortunes
@pytest.mark.parametrize("method", ["l2", "kfac"])
def test_small_lm_with_adapters_end_to_end(tmp_path, method):
    config = fortunes_lm.get_config("small")
    config.lora_rank = 2
    config.methods = (method,)
    config.steps_per_task = 10
    config.train_limit = 128
    config.test_limit = 32
    config.fisher_samples = 16
    result = train.train_and_evaluate(config, tmp_path)
    matrix = np.asarray(result["runs"][0]["accuracy_matrix"])
    assert result["metric"] == "bits_per_character" and matrix.shape == (2, 2)
    # Below uniform (8 bits a byte), and German's adapters moved English's bits per character.
    assert np.all(np.diag(matrix) < 8.0) and matrix[1, 0] != matrix[0, 0], matrix
    saved = json.loads((tmp_path / "results.json").read_text())
    np.testing.assert_array_equal(saved["runs"][0]["accuracy_matrix"], matrix)
    assert (tmp_path / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
