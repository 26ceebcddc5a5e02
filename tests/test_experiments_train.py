"""The experiments' models, the pure jitted train/eval/Fisher steps and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ewc_jax
from experiments import config as config_lib
from experiments import models, scenarios
from experiments.configs import default
from experiments.data import Dataset
from experiments.runs import experiment as train
from experiments.training import consolidation, loop, steps
from experiments.training import device as device_data
from experiments.training.methods import MethodSpec


def tiny_setup(tx=None, *, num_heads=1, num_outputs=3, batch_size=4, eval_batch_size=5):
    model = models.build_model(
        "mlp", num_heads=num_heads, num_outputs=num_outputs, hidden_sizes=(8,)
    )
    return steps.StepSetup(
        model, tx or optax.sgd(0.1), batch_size=batch_size, eval_batch_size=eval_batch_size
    )


def random_task_data(num, capacity, *, num_outputs=3, head=0, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((num, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, num_outputs, num).astype(np.int32)
    return device_data.pad_task_data(images, labels, np.full(num, head, np.int32), capacity)


def fresh_state(setup, data, *, key=0, strength=0.0):
    return steps.init_state(jax.random.key(key), data.images[:1], strength, setup=setup)


def test_multihead_mlp_returns_each_examples_own_head():
    model = models.MultiHeadMLP(hidden_sizes=(8,), num_heads=3, num_outputs=2)
    x = jax.random.uniform(jax.random.key(0), (6, 4, 4, 1))
    heads = jnp.array([0, 1, 2, 2, 1, 0], jnp.int32)
    params = model.init(jax.random.key(1), x, heads)["params"]
    logits = model.apply({"params": params}, x, heads)
    # Reference: the shared trunk by hand, then columns [2h, 2h + 2) of the joint head layer.
    hidden = jax.nn.relu(
        x.reshape(6, -1) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None]
    )
    every_head = hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
    for n, h in enumerate(heads.tolist()):
        np.testing.assert_allclose(logits[n], every_head[n, 2 * h : 2 * h + 2], rtol=1e-5)


def test_tutorial_mlp_matches_the_tutorial():
    model = models.tutorial_mlp()
    x = jnp.ones((2, 28, 28, 1))
    params = model.init(jax.random.key(0), x)["params"]
    shapes = [params[f"Dense_{i}"]["kernel"].shape for i in range(4)]
    assert shapes == [(784, 256), (256, 256), (256, 256), (256, 10)]
    assert bool(jnp.all(model.apply({"params": params}, x) >= 0))  # ReLU on the logits
    plain = models.tutorial_mlp(relu_on_logits=False)
    assert bool(jnp.any(plain.apply({"params": params}, -x) < 0))


def test_build_model_turns_mlps_multihead_for_task_incremental():
    assert isinstance(models.build_model("mlp", num_heads=5, num_outputs=2), models.MultiHeadMLP)
    assert isinstance(models.build_model("mlp", num_heads=1, num_outputs=2), models.MLP)
    cnn = models.build_model("cnn", num_heads=2, num_outputs=3)
    x = jnp.zeros((4, 8, 8, 1))
    heads = jnp.array([0, 1, 0, 1], jnp.int32)
    params = cnn.init(jax.random.key(0), x, heads)["params"]
    assert cnn.apply({"params": params}, x, heads).shape == (4, 3)
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet", num_heads=1, num_outputs=2)


def test_evaluate_counts_only_valid_rows_with_overlapping_last_chunk():
    setup = tiny_setup(eval_batch_size=5)
    data = random_task_data(num=11, capacity=13)  # chunks [0, 5), [5, 10), [8, 13)
    params = fresh_state(setup, data).params
    logits = setup.model.apply({"params": params}, data.images[:11], data.heads[:11])
    expected = np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(data.labels[:11]))
    assert float(steps.evaluate(params, data, setup=setup)) == pytest.approx(expected)


def test_train_epoch_takes_exactly_num_steps_steps():
    setup = tiny_setup(optax.adam(1e-2), batch_size=4)
    data = random_task_data(num=10, capacity=16)  # 4 scan iterations
    state = fresh_state(setup, data)
    for num_steps in (0, 1, 3):
        new_state, _ = steps.train_epoch(state, data, jnp.int32(num_steps), setup=setup)
        assert int(new_state.opt_state[0].count) == num_steps
        moved = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
        )
        assert any(moved) == (num_steps > 0)


def test_changing_ewc_state_strength_task_and_steps_does_not_recompile():
    setup = tiny_setup()
    task_a = random_task_data(num=12, capacity=16, seed=0)
    task_b = random_task_data(num=16, capacity=16, seed=1)
    state = fresh_state(setup, task_a)
    compiled = steps.train_epoch._cache_size(), steps.evaluate._cache_size()
    state, _ = steps.train_epoch(state, task_a, jnp.int32(3), setup=setup)
    fisher = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
    state = state._replace(
        ewc_state=ewc_jax.consolidate(state.ewc_state, state.params, fisher),
        strength=jnp.float32(7.0),
    )
    state, _ = steps.train_epoch(state, task_b, jnp.int32(4), setup=setup)
    state = state._replace(
        ewc_state=ewc_jax.consolidate(
            state.ewc_state, state.params, fisher, mode="online", gamma=0.5
        ),
        strength=jnp.float32(3.0),
    )
    steps.train_epoch(state, task_a, jnp.int32(2), setup=setup)
    steps.evaluate(state.params, task_a, setup=setup)
    steps.evaluate(state.params, task_b, setup=setup)
    # One new entry in each jit cache: the first call compiled, every later one reused it.
    assert steps.train_epoch._cache_size() == compiled[0] + 1
    assert steps.evaluate._cache_size() == compiled[1] + 1


def test_penalty_holds_parameters_at_the_anchor():
    setup = tiny_setup(optax.sgd(0.05))
    data = random_task_data(num=16, capacity=16)
    start = fresh_state(setup, data)
    anchor = start.params
    ewc_state = ewc_jax.consolidate(None, anchor, jax.tree.map(jnp.ones_like, anchor))

    def drift(strength):
        state = start._replace(ewc_state=ewc_state, strength=jnp.float32(strength))
        for _ in range(10):
            state, _ = steps.train_epoch(state, data, jnp.int32(4), setup=setup)
        squares = jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), state.params, anchor)
        return float(sum(jax.tree.leaves(squares)))

    # With precision 1 the penalty is L2 towards the anchor: 40 steps drift far less under it.
    free, held = drift(0.0), drift(19.0)
    assert held < 0.05 * free


def test_fisher_of_a_head_leaves_other_heads_at_zero():
    setup = tiny_setup(num_heads=3, num_outputs=2)
    data = random_task_data(num=8, capacity=8, num_outputs=2, head=1)
    params = fresh_state(setup, data).params
    spec = MethodSpec("ewc", strength=1.0, estimator="exact", fisher_samples=8)
    fisher = consolidation.fisher(
        params, data.images, data.labels, data.heads, jax.random.key(0), setup=setup, method=spec
    )
    head_kernel = np.asarray(fisher["Dense_1"]["kernel"])  # columns: head 0 | head 1 | head 2
    assert np.all(head_kernel[:, 0:2] == 0) and np.all(head_kernel[:, 4:6] == 0)
    assert np.any(head_kernel[:, 2:4] > 0)

    # Against a dense reference: mean over examples and classes of p_c * (d log p_c / dθ)².
    def log_probs(p, x, h):
        return jax.nn.log_softmax(setup.logits(p, (x[None], h[None]))[0])

    reference = jnp.zeros_like(params["Dense_1"]["kernel"])
    for n in range(8):
        x, h = data.images[n], data.heads[n]
        jac = jax.jacrev(log_probs)(params, x, h)["Dense_1"]["kernel"]  # [C, in, out]
        probs = jnp.exp(log_probs(params, x, h))
        reference += jnp.einsum("c,cio->io", probs, jac**2) / 8
    np.testing.assert_allclose(head_kernel, reference, rtol=1e-4, atol=1e-7)


def run_config(**overrides):
    config = default.get_config()
    for field, value in overrides.items():
        config[field] = value
    return config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"methods": ("finetune", "ewk")}, "unknown method 'ewk'"),
        ({"methods": ("sgd",)}, "unknown method 'sgd'"),
        ({"estimator": "diagonal"}, "unknown estimator 'diagonal'"),
        ({"scenario": "shuffled"}, "unknown scenario 'shuffled'"),
        ({"scenario": "split", "split_mode": "both"}, "unknown split_mode 'both'"),
        ({"optimizer": "lbfgs"}, "unknown optimizer"),
        ({"strength": -1.0}, r"strength must be a finite number >= 0"),
        ({"gamma": 1.5}, r"gamma must lie in \[0, 1\]"),
        ({"gamma": -0.1}, r"gamma must lie in \[0, 1\]"),
        ({"methods": ("ewc", "ewc")}, "methods listed twice"),
        ({"seeds": (0, "x")}, "cannot parse"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"method": "ewc"}, "config field 'method' was replaced by 'methods', a tuple"),
        ({"seed": 3}, "config field 'seed' was replaced by 'seeds'"),
        ({"dataset": "embedded:mnist"}, "config field 'dataset' was replaced by 'datasets'"),
        ({"datasets": ("embedded:mnist,embedded:digits",)}, "holds a comma-separated string"),
        ({"datasets": ("embedded:mnist", "embedded:digits")}, "needs one dataset"),
    ],
)
def test_bad_config_is_rejected_before_anything_is_written(tmp_path, overrides, match):
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match=match):
        train.train_and_evaluate(run_config(**overrides), workdir)
    assert not workdir.exists()


def test_negative_per_method_strength_is_rejected():
    config = default.get_config()
    config.strengths.l2 = -0.5
    with pytest.raises(config_lib.ConfigError, match=r"strengths.l2 must be a finite number >= 0"):
        config_lib.validate(config)


def test_method_specs_resolve_strengths_and_gamma():
    config = default.get_config()
    config.methods = ("finetune", "l2", "ewc", "online_ewc", "joint")
    config.strength = 50.0
    config.strengths.l2 = 0.25
    config.gamma = 0.9
    specs = {spec.name: spec for spec in config_lib.read_spec(config).methods}
    assert {name: spec.strength for name, spec in specs.items()} == {
        "finetune": 0.0,
        "l2": 0.25,
        "ewc": 50.0,
        "online_ewc": 50.0,
        "joint": 0.0,
    }
    assert specs["online_ewc"].gamma == 0.9 and specs["ewc"].gamma == 1.0
    config.methods = ("joint",)
    assert [spec.name for spec in config_lib.read_spec(config).methods] == ["joint"]
    # Method names hold no commas: a comma-separated one is a list, in the API as on the CLI.
    config.methods = ("finetune, si", "mas")
    spec = config_lib.read_spec(config)
    assert [m.name for m in spec.methods] == spec.resolved["methods"] == ["finetune", "si", "mas"]
    assert config.methods == ("finetune, si", "mas")  # the config itself is left as it was


@pytest.mark.slow
def test_divergence_names_the_unstable_product(tmp_path):
    config = default.get_config()
    config.datasets = ("embedded:digits",)
    config.num_tasks = 2
    config.methods = ("ewc",)
    config.learning_rate = 0.5
    config.strength = 1e7
    config.fisher_samples = 64
    with pytest.raises(loop.TrainingDivergedError, match="lower the strength or the learning"):
        train.train_and_evaluate(config, tmp_path)


def test_joint_training_data_grows_with_each_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50).astype(np.int32)
    images = rng.random((50, 4, 4, 1)).astype(np.float32)
    scenario = scenarios.split(Dataset("d", images, labels, images, labels, 10), "task")
    data = device_data.put_scenario(scenario, need_train=True, need_joint=True)
    sizes = [len(t.train_labels) for t in scenario.tasks]
    assert [int(d.num_valid) for d in data.joint_train] == np.cumsum(sizes).tolist()
    assert {d.images.shape for d in data.joint_train} == {(sum(sizes), 4, 4, 1)}
    assert {d.images.shape for d in data.train} == {(max(sizes), 4, 4, 1)}
    heads = np.asarray(data.joint_train[-1].heads)
    np.testing.assert_array_equal(heads, np.repeat(np.arange(5), sizes))
