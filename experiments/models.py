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
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODELS = ("tutorial_mlp", "mlp", "multihead_mlp", "cnn")


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
