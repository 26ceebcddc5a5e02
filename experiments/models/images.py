"""Flax Linen models for the continual-learning benchmarks.

Every model is called as ``model.apply({"params": params}, images, heads)`` with images
``[B, H, W, C]`` and int32 ``heads`` ``[B]`` (which output head each example uses), and returns
logits ``[B, num_outputs]``. Single-head models ignore ``heads``, so one train step serves all
scenarios and the head index stays a traced value: switching tasks never recompiles.

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = MLP(hidden_sizes=(32,), num_outputs=10)
    >>> x = jnp.zeros((4, 28, 28, 1))
    >>> params = model.init(jax.random.key(0), x, jnp.zeros(4, jnp.int32))["params"]
    >>> model.apply({"params": params}, x, jnp.zeros(4, jnp.int32)).shape
    (4, 10)

The initial parameters come from :func:`init_params`: Flax's own initialisers (``"flax"``),
PyTorch's (``"torch"``), or a PyTorch ``state_dict`` saved as ``.npz`` (a path), so that a run can
start from exactly the weights a PyTorch run started from.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.spec import ConfigError

MODELS = ("tutorial_mlp", "mlp", "multihead_mlp", "cnn")
INITS = ("flax", "torch")
"""The named initialisations; any other ``init`` is the path of an ``.npz`` state_dict."""


class MLP(nn.Module):
    """A ReLU multilayer perceptron on flattened images.

    Attributes:
        hidden_sizes: widths of the hidden layers.
        num_outputs: number of logits.
        relu_on_logits: apply a ReLU to the logits too, as the PyTorch EWC tutorial's model does.
    """

    hidden_sizes: Sequence[int]
    num_outputs: int
    relu_on_logits: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, heads: jax.Array | None = None) -> jax.Array:
        del heads
        x = images.reshape(images.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        logits = nn.Dense(self.num_outputs)(x)
        return nn.relu(logits) if self.relu_on_logits else logits


def tutorial_mlp(num_outputs: int = 10, relu_on_logits: bool = True) -> MLP:
    """The PyTorch EWC tutorial's MLP, 784-256-256-256-10, ReLU on the logits by default."""
    return MLP(hidden_sizes=(256, 256, 256), num_outputs=num_outputs, relu_on_logits=relu_on_logits)


class MultiHeadMLP(nn.Module):
    """A shared ReLU trunk with one linear head per task (task-incremental learning).

    All heads are one ``Dense(num_heads * num_outputs)``; each example's logits are the slice of
    its head, so the head index is data, not a Python branch.

    Attributes:
        hidden_sizes: widths of the shared hidden layers.
        num_heads: number of heads (tasks).
        num_outputs: logits per head.
    """

    hidden_sizes: Sequence[int]
    num_heads: int
    num_outputs: int

    @nn.compact
    def __call__(self, images: jax.Array, heads: jax.Array | None = None) -> jax.Array:
        x = images.reshape(images.shape[0], -1)
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        all_logits = nn.Dense(self.num_heads * self.num_outputs)(x)
        all_logits = all_logits.reshape(x.shape[0], self.num_heads, self.num_outputs)
        if heads is None:
            heads = jnp.zeros((x.shape[0],), jnp.int32)
        return all_logits[jnp.arange(x.shape[0]), heads]


class SmallCNN(nn.Module):
    """Two 3x3 conv + max-pool blocks and a dense layer; one or several heads.

    Attributes:
        num_outputs: logits per head.
        num_heads: number of heads (1 unless task-incremental).
        features: channels of the two conv layers.
        hidden_size: width of the dense layer.
    """

    num_outputs: int
    num_heads: int = 1
    features: Sequence[int] = (32, 64)
    hidden_size: int = 128

    @nn.compact
    def __call__(self, images: jax.Array, heads: jax.Array | None = None) -> jax.Array:
        x = images
        for channels in self.features:
            x = nn.relu(nn.Conv(channels, kernel_size=(3, 3))(x))
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden_size)(x))
        all_logits = nn.Dense(self.num_heads * self.num_outputs)(x)
        all_logits = all_logits.reshape(x.shape[0], self.num_heads, self.num_outputs)
        if heads is None:
            heads = jnp.zeros((x.shape[0],), jnp.int32)
        return all_logits[jnp.arange(x.shape[0]), heads]


def build_model(
    name: str,
    *,
    num_heads: int,
    num_outputs: int,
    hidden_sizes: Sequence[int] = (256, 256, 256),
    relu_on_logits: bool = False,
) -> nn.Module:
    """The model a config names, sized for a scenario.

    ``"mlp"`` and ``"tutorial_mlp"`` become a :class:`MultiHeadMLP` when the scenario has several
    heads (task-incremental), so any config can run any split setting.

    Args:
        name: one of :data:`MODELS`.
        num_heads: heads the scenario needs.
        num_outputs: logits per head.
        hidden_sizes: hidden widths of the MLPs (``tutorial_mlp`` always uses 256-256-256).
        relu_on_logits: ReLU on the logits of a single-head MLP (the tutorial's quirk).

    Returns:
        An unbound Flax module.

    Raises:
        ValueError: unknown name, or ``relu_on_logits`` with several heads.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {MODELS}")
    if name == "cnn":
        return SmallCNN(num_outputs=num_outputs, num_heads=num_heads)
    sizes = (256, 256, 256) if name == "tutorial_mlp" else tuple(hidden_sizes)
    if num_heads > 1 or name == "multihead_mlp":
        if relu_on_logits:
            raise ValueError("relu_on_logits is only supported by single-head MLPs")
        return MultiHeadMLP(hidden_sizes=sizes, num_heads=num_heads, num_outputs=num_outputs)
    return MLP(hidden_sizes=sizes, num_outputs=num_outputs, relu_on_logits=relu_on_logits)


def num_layers(name: str, hidden_sizes: Sequence[int] = (256, 256, 256)) -> int:
    """How many Dense/Conv layers (weight/bias pairs) :func:`build_model` gives ``name``.

    Example:
        >>> num_layers("mlp", (400, 400)), num_layers("tutorial_mlp"), num_layers("cnn")
        (3, 4, 4)
    """
    if name == "cnn":
        return 4
    return (3 if name == "tutorial_mlp" else len(hidden_sizes)) + 1


def _layers(params: dict[str, Any]) -> list[str]:
    """Names of the Dense/Conv layers (sub-dicts with a ``kernel``), in order of definition.

    Flax inserts a compact module's submodules into the params dict in the order ``__call__``
    creates them, and :meth:`flax.linen.Module.init` returns that dict as built; any tree
    operation (``jax.tree.map``) sorts the keys instead, so the order is read before one.
    """
    return [name for name, value in params.items() if isinstance(value, dict) and "kernel" in value]


def torch_init(params: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """Redraws every Dense/Conv layer as ``torch.nn.Linear`` / ``torch.nn.Conv2d`` initialise it.

    Weights and biases both follow ``U(-1/√fan_in, 1/√fan_in)``, with ``fan_in`` the kernel's
    inputs per output: ``in`` for a Dense kernel ``[in, out]``, ``kh·kw·in`` for a Conv kernel
    ``[kh, kw, in, out]`` (PyTorch's ``kaiming_uniform_(a=√5)`` is exactly this bound). The
    variance is ``1/(3 fan_in)``: Flax's default ``lecun_normal`` has three times that (√3 larger
    weights) and zero biases.

    Args:
        params: the model's parameters from ``model.init`` (only the shapes are used).
        key: PRNG key; each layer's weight and bias get their own split of it.

    Returns:
        Parameters of the same structure, every ``kernel`` and ``bias`` redrawn.

    References:
        PyTorch, ``torch.nn.Linear.reset_parameters`` and ``torch.nn.Conv2d`` (``_ConvNd``).
    """
    names = _layers(params)
    keys = jax.random.split(key, 2 * max(len(names), 1))
    new = dict(params)
    for index, name in enumerate(names):
        layer = dict(params[name])
        kernel = layer["kernel"]
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
        for offset, leaf in enumerate(("kernel", "bias")):
            if leaf in layer:
                value = layer[leaf]
                layer[leaf] = jax.random.uniform(
                    keys[2 * index + offset], value.shape, value.dtype, -bound, bound
                )
        new[name] = layer
    return new


StateDictLayer = tuple[str, np.ndarray, np.ndarray]
"""One layer of a PyTorch state_dict: ``(prefix, weight, bias)``, e.g. ``("fc1", W, b)``."""


def read_state_dict(path: str) -> tuple[StateDictLayer, ...]:
    """The weight/bias pairs of a PyTorch ``state_dict`` saved with ``numpy.savez``, in order.

    Save one with ``np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})``:
    numpy keeps the keys in the order given, which for a ``state_dict`` is the order the layers
    were defined in. Keys are grouped by their prefix (``fc1.weight`` and ``fc1.bias`` form layer
    ``fc1``); every layer needs exactly a ``weight`` and a ``bias``.

    Args:
        path: the ``.npz`` file.

    Returns:
        ``(prefix, weight, bias)`` per layer, in the file's order, float32.

    Raises:
        ConfigError: no such file, not an npz, or keys that are not weight/bias pairs.
    """
    if not os.path.isfile(path):
        raise ConfigError(
            f"init {path!r} is neither 'flax', 'torch' nor an existing .npz file of a PyTorch "
            "state_dict"
        )
    return _read_state_dict(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_state_dict(path: str, mtime_ns: int) -> tuple[StateDictLayer, ...]:
    """:func:`read_state_dict`, cached per file version (a traced init reads it once)."""
    del mtime_ns
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"init file {path} is not an .npz archive of arrays (write one with np.savez)"
        ) from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"init file {path} holds one array (np.save); the init needs an .npz of the "
            "state_dict's named arrays, written with np.savez"
        )
    with loaded as archive:
        arrays = {key: np.asarray(archive[key]) for key in archive.files}
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.number) and not np.all(np.isfinite(value)):
            raise ConfigError(f"init file {path}: array {key!r} holds NaN or infinite values")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise ConfigError(
                f"init file {path}: key {key!r} is not a '<layer>.weight' or '<layer>.bias' of a "
                "Linear/Conv2d layer"
            )
        groups.setdefault(prefix, {})[leaf] = value
    layers = []
    for prefix, pair in groups.items():
        if set(pair) != {"weight", "bias"}:
            raise ConfigError(f"init file {path}: layer {prefix!r} needs a weight and a bias")
        layers.append((prefix, pair["weight"].astype(np.float32), pair["bias"].astype(np.float32)))
    return tuple(layers)


def _torch_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch weight shape of a Flax kernel: ``[in, out] -> [out, in]``,
    ``[kh, kw, in, out] -> [out, in, kh, kw]``."""
    if len(kernel_shape) == 4:
        kh, kw, fan_in, out = kernel_shape
        return (out, fan_in, kh, kw)
    return tuple(kernel_shape[::-1])


def _torch_to_flax(weight: np.ndarray, previous_kernel: Any) -> np.ndarray:
    """A PyTorch weight in Flax's layout: Dense ``[out, in] -> [in, out]``, Conv
    ``[out, in, kh, kw] -> [kh, kw, in, out]``.

    A Dense layer right after a Conv layer reads features PyTorch flattened as ``(C, H, W)``;
    Flax flattens ``(H, W, C)``, so its input axis is reordered as well.
    """
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    if previous_kernel is not None and len(previous_kernel.shape) == 4:
        channels = previous_kernel.shape[-1]
        out, fan_in = weight.shape
        spatial = fan_in // channels
        weight = weight.reshape(out, channels, spatial).transpose(0, 2, 1).reshape(out, fan_in)
    return weight.T


def import_state_dict(
    params: dict[str, Any], layers: Sequence[StateDictLayer], source: str = "state_dict"
) -> dict[str, Any]:
    """The model's parameters with every Dense/Conv layer taken from a PyTorch ``state_dict``.

    The ``i``-th weight/bias pair of ``layers`` becomes the ``i``-th layer the Flax model
    defines (:func:`_layers`), transposed to Flax's layout (:func:`_torch_to_flax`).

    Args:
        params: the model's parameters from ``model.init`` (only the structure and shapes count).
        layers: :func:`read_state_dict`'s pairs.
        source: the file's name, for error messages.

    Returns:
        Parameters of the same structure holding the imported values.

    Raises:
        ConfigError: the layer counts differ, or a weight or bias has the wrong shape; the message
            names the layer and both shapes.
    """
    names = _layers(params)
    if len(names) != len(layers):
        raise ConfigError(
            f"init file {source} has {len(layers)} weight/bias layers "
            f"({', '.join(prefix for prefix, _, _ in layers)}), the model has {len(names)} "
            f"({', '.join(names)})"
        )
    new, previous = dict(params), None
    for name, (prefix, weight, bias) in zip(names, layers, strict=True):
        kernel = params[name]["kernel"]
        want = _torch_shape(tuple(kernel.shape))
        if weight.shape != want or bias.shape != params[name]["bias"].shape:
            raise ConfigError(
                f"init file {source}: layer {prefix!r} (the model's {name}) has weight "
                f"{tuple(weight.shape)} and bias {tuple(bias.shape)}, the model needs weight "
                f"{want} and bias {tuple(params[name]['bias'].shape)} (PyTorch layout)"
            )
        new[name] = {
            **params[name],
            "kernel": jnp.asarray(_torch_to_flax(weight, previous), kernel.dtype),
            "bias": jnp.asarray(bias, params[name]["bias"].dtype),
        }
        previous = kernel
    return new


def init_params(
    model: nn.Module, key: jax.Array, images: jax.Array, heads: jax.Array, init: str = "flax"
) -> dict[str, Any]:
    """The model's initial parameters: Flax's, PyTorch's, or a PyTorch ``state_dict``'s.

    Args:
        model: a model of this module.
        key: PRNG key (unused for an ``.npz``).
        images: an example batch ``[B, H, W, C]``.
        heads: its head indices ``[B]``.
        init: ``"flax"`` (Flax's initialisers: ``lecun_normal`` kernels, zero biases),
            ``"torch"`` (:func:`torch_init`) or the path of an ``.npz`` state_dict
            (:func:`read_state_dict`, :func:`import_state_dict`).

    Returns:
        The ``params`` collection.

    Raises:
        ConfigError: an ``.npz`` that does not fit the model.
    """
    params = model.init(key, images, heads)["params"]
    if init == "flax":
        return params
    if init == "torch":
        return torch_init(params, key)
    return import_state_dict(params, read_state_dict(init), source=init)
