"""Reproduction knobs: PyTorch's init, PyTorch state_dicts as initial weights, class order.

The state_dict import is checked against PyTorch itself: a torch model and the Flax model that
imported its weights give the same logits on the same inputs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import scenarios
from experiments.configs import default
from experiments.models import images as models
from tests.test_scenarios import make_dataset

IMAGES = np.random.default_rng(0).random((6, 28, 28, 1)).astype(np.float32)
HEADS = jnp.zeros(6, jnp.int32)


_INIT = jax.jit(models.init_params, static_argnums=(0, 4))


def _init(model, init, key=0):
    return _INIT(model, jax.random.key(key), jnp.asarray(IMAGES), HEADS, init)


def _save(path, module):
    np.savez(path, **{key: value.numpy() for key, value in module.state_dict().items()})
    return str(path)


@pytest.mark.parametrize(
    "model",
    [
        models.tutorial_mlp(),
        models.MultiHeadMLP(hidden_sizes=(64,), num_heads=5, num_outputs=2),
        models.SmallCNN(num_outputs=10, num_heads=2),
    ],
    ids=["tutorial_mlp", "multihead_mlp", "cnn"],
)
def test_torch_init_draws_weights_and_biases_uniformly_within_one_over_sqrt_fan_in(model):
    params = _init(model, "torch")
    flax_params = _init(model, "flax")
    for name, layer in params.items():
        kernel, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
        assert kernel.shape == flax_params[name]["kernel"].shape
        fan_in = math.prod(kernel.shape[:-1])  # Conv: kh * kw * in_channels, as torch's Conv2d
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        # Unlike Flax's zero biases, PyTorch's are drawn too.
        assert np.abs(bias).max() > 0.5 * bound
    # A big layer: the variance of U(-b, b) is b²/3 = 1/(3 fan_in); Flax's lecun_normal has 3x.
    big = max(params, key=lambda name: params[name]["kernel"].size)
    kernel = np.asarray(params[big]["kernel"])
    assert kernel.size >= 16_000
    fan_in = math.prod(kernel.shape[:-1])
    assert kernel.var() == pytest.approx(1 / (3 * fan_in), rel=0.05)
    # Flax's truncated lecun_normal: variance 1/fan_in.
    assert np.asarray(flax_params[big]["kernel"]).var() == pytest.approx(1 / fan_in, rel=0.1)
    # Seeded: the same key gives the same draw, another key another one.
    again, other = _init(model, "torch"), _init(model, "torch", key=1)
    first = models._layers(params)[0]
    np.testing.assert_array_equal(again[first]["kernel"], params[first]["kernel"])
    assert not np.array_equal(other[first]["kernel"], params[first]["kernel"])


def test_npz_state_dict_reproduces_torch_mlp_logits(tmp_path):
    torch = pytest.importorskip("torch", reason="the reference is PyTorch itself")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
        torch.nn.ReLU(),
    )
    path = _save(tmp_path / "mlp.npz", net)
    model = models.MLP(hidden_sizes=(64, 32), num_outputs=10, relu_on_logits=True)
    params = _init(model, path)
    logits = model.apply({"params": params}, jnp.asarray(IMAGES), HEADS)
    with torch.no_grad():
        expected = net(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_npz_state_dict_reproduces_torch_cnn_logits(tmp_path):
    torch = pytest.importorskip("torch", reason="the reference is PyTorch itself")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
            self.fc1 = torch.nn.Linear(64 * 7 * 7, 128)
            self.fc2 = torch.nn.Linear(128, 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # flattens (C, H, W)

    torch.manual_seed(1)
    net = Net()
    path = _save(tmp_path / "cnn.npz", net)
    model = models.SmallCNN(num_outputs=10)
    logits = model.apply({"params": _init(model, path)}, jnp.asarray(IMAGES), HEADS)
    with torch.no_grad():
        expected = net(torch.from_numpy(IMAGES).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-5)


def _layers_npz(path, shapes):
    arrays = {}
    for index, (out, fan_in) in enumerate(shapes):
        arrays[f"fc{index + 1}.weight"] = np.zeros((out, fan_in), np.float32)
        arrays[f"fc{index + 1}.bias"] = np.zeros(out, np.float32)
    np.savez(path, **arrays)
    return str(path)


def test_npz_mismatch_is_one_line_naming_the_layer_and_both_shapes(tmp_path):
    model = models.MLP(hidden_sizes=(64,), num_outputs=10)
    wrong = _layers_npz(tmp_path / "wrong.npz", [(64, 784), (10, 32)])
    with pytest.raises(config_lib.ConfigError) as error:
        _init(model, wrong)
    message = str(error.value)
    assert "\n" not in message
    assert "'fc2'" in message and "(10, 32)" in message and "(10, 64)" in message

    count = _layers_npz(tmp_path / "count.npz", [(64, 784)])
    with pytest.raises(config_lib.ConfigError, match=r"has 1 weight/bias layers \(fc1\)"):
        _init(model, count)


def test_config_checks_init_before_any_data_is_loaded(tmp_path):
    config = default.get_config()
    assert config.init == "flax" and config.class_order == "fixed"
    config.init = "torch"
    config_lib.validate(config)
    config.init = str(tmp_path / "missing.npz")
    with pytest.raises(config_lib.ConfigError, match="neither 'flax', 'torch' nor an existing"):
        config_lib.validate(config)
    config.init = _layers_npz(tmp_path / "three.npz", [(256, 784), (256, 256), (10, 256)])
    config_lib.validate(config)  # the default MLP 784-256-256-10 has three layers
    config.hidden_sizes = (256,)
    with pytest.raises(config_lib.ConfigError, match=r"has 3 weight/bias layers .* has 2"):
        config_lib.validate(config)
    stray = tmp_path / "stray.npz"
    np.savez(stray, **{"bn.running_mean": np.zeros(3, np.float32)})
    config.init = str(stray)
    with pytest.raises(config_lib.ConfigError, match=r"'bn\.running_mean' is not"):
        config_lib.validate(config)


def test_class_order_permuted_is_a_seeded_permutation_of_every_class():
    orders = {seed: scenarios.class_permutation(10, seed).tolist() for seed in range(4)}
    for order in orders.values():
        assert sorted(order) == list(range(10))
    assert orders[2] == scenarios.class_permutation(10, 2).tolist()
    assert len({tuple(order) for order in orders.values()}) == 4


def test_permuted_split_relabels_like_van_de_ven_before_grouping():
    dataset = make_dataset(num_train=200, num_test=50)
    config = default.get_config()
    config.scenario, config.split_mode = "split", "task"
    datasets = {config.datasets[0]: dataset}
    fixed = scenarios.build_scenario(config, datasets, seed=3)
    assert fixed.task_names == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    config.class_order = "permuted"
    config_lib.validate(config)
    permuted = scenarios.build_scenario(config, datasets, seed=3)
    order = scenarios.class_permutation(10, 3)
    # van de Ven: label y becomes p[y] with p = argsort(order); task t holds new labels 2t, 2t+1.
    p = np.argsort(order)
    for t, task in enumerate(permuted.tasks):
        classes = [int(order[2 * t]), int(order[2 * t + 1])]
        assert task.name == f"{classes[0]}/{classes[1]}" and task.head == t
        kept = np.isin(dataset.train_labels, classes)
        np.testing.assert_array_equal(task.train_images, dataset.train_images[kept])
        np.testing.assert_array_equal(task.train_labels, p[dataset.train_labels[kept]] - 2 * t)
    config.split_mode = "class"
    labels = scenarios.build_scenario(config, datasets, seed=3).tasks[0].test_labels
    assert set(labels.tolist()) == {0, 1}  # positions, i.e. p[y]
    config.scenario = "permuted"
    with pytest.raises(config_lib.ConfigError, match="split scenario only"):
        config_lib.validate(config)
