"""Model families for the path benchmark and the tests: layers the Fisher engine must handle.

Each entry builds ``(apply_fn, params, inputs, labels)`` for N examples at a given width, with
float32 Flax Linen modules: a transformer block (attention + LayerNorm + MLP), Dense layers over
``[B, T, D]`` sequences, ``DenseGeneral`` over two axes, ``nn.scan``-ned layers, convolutions
(plain and grouped), the tutorial MLP, and a tiny causal language model whose logits are
``[B, T, V]`` (sequence outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SEQUENCE_LENGTH = 8
NUM_CLASSES = 10


class TransformerBlock(nn.Module):
    """Pre-LN transformer block on ``[B, T, D]`` features, mean-pooled to ``[B, C]`` logits."""

    width: int
    heads: int = 2
    num_classes: int = NUM_CLASSES
    causal_logits: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nn.make_causal_mask(x[..., 0]) if self.causal_logits else None
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
        if self.causal_logits:
            return nn.Dense(self.num_classes)(nn.LayerNorm()(x))
        return nn.Dense(self.num_classes)(x.mean(axis=1))


class TinyLM(nn.Module):
    """A causal byte-level language model: tokens ``[B, T]`` in, logits ``[B, T, V]`` out."""

    width: int
    vocab: int = 16

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.width)(tokens)
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (tokens.shape[1], self.width)
        )
        block = TransformerBlock(self.width, num_classes=self.vocab, causal_logits=True)
        return block(x + positions[None])


class SequenceDense(nn.Module):
    """Dense layers applied at every position of ``[B, T, D]``, then pooled."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.Dense(self.width)(x)
        return nn.Dense(NUM_CLASSES)(x.mean(axis=1))


class TwoAxisDenseGeneral(nn.Module):
    """``DenseGeneral`` into (heads, head_dim) and back out over both axes, as attention does."""

    width: int
    heads: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.tanh(nn.DenseGeneral((self.heads, self.width // self.heads))(x))
        x = nn.DenseGeneral(self.width, axis=(-2, -1))(x)
        return nn.Dense(NUM_CLASSES)(x.mean(axis=1))


class _Cell(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return jnp.tanh(nn.Dense(self.width)(x)), None


class ScannedLayers(nn.Module):
    """Four Dense+tanh layers as one ``nn.scan`` (parameters stacked on a layer axis)."""

    width: int
    depth: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.width)(x.reshape(x.shape[0], -1))
        stack = nn.scan(
            _Cell,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
        )(self.width)
        x, _ = stack(x, None)
        return nn.Dense(NUM_CLASSES)(x)


class ConvNet(nn.Module):
    """Two 3x3 convolutions (optionally grouped), global average pool, Dense."""

    width: int
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.relu(nn.Conv(self.width, (3, 3), feature_group_count=self.groups)(x))
        return nn.Dense(NUM_CLASSES)(x.mean(axis=(1, 2)))


class MLP(nn.Module):
    """ReLU MLP on flat inputs."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(NUM_CLASSES)(x)


def _sequence_inputs(n: int, width: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((n, SEQUENCE_LENGTH, width)).astype(np.float32)


FAMILIES: dict[str, tuple[Callable[[int], nn.Module], Callable[..., np.ndarray]]] = {
    "transformer_block": (
        lambda w: TransformerBlock(w),
        _sequence_inputs,
    ),
    "sequence_dense": (lambda w: SequenceDense(w), _sequence_inputs),
    "dense_general_2axes": (lambda w: TwoAxisDenseGeneral(w), _sequence_inputs),
    "scanned_layers": (
        lambda w: ScannedLayers(w),
        lambda n, w, rng: rng.standard_normal((n, w)).astype(np.float32),
    ),
    "conv": (
        lambda w: ConvNet(w),
        lambda n, w, rng: rng.standard_normal((n, 8, 8, 3)).astype(np.float32),
    ),
    "grouped_conv": (
        lambda w: ConvNet(w, groups=2),
        lambda n, w, rng: rng.standard_normal((n, 8, 8, 3)).astype(np.float32),
    ),
    "mlp": (
        lambda w: MLP(w),
        lambda n, w, rng: rng.standard_normal((n, 4 * w)).astype(np.float32),
    ),
    "tiny_lm": (
        lambda w: TinyLM(w),
        lambda n, w, rng: rng.integers(0, 16, (n, SEQUENCE_LENGTH)).astype(np.int32),
    ),
}


def build(
    family: str, width: int, n: int, seed: int = 0
) -> tuple[Callable[..., jax.Array], Any, jax.Array, jax.Array]:
    """``(apply_fn, params, inputs, labels)`` of one family: N examples, float32.

    Labels are random classes of the logits' shape without the class axis (``[N]``, or
    ``[N, T]`` for the language model).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; known: {sorted(FAMILIES)}.")
    make_model, make_inputs = FAMILIES[family]
    rng = np.random.default_rng(seed)
    model = make_model(width)
    inputs = jnp.asarray(make_inputs(n, width, rng))
    params = model.init(jax.random.key(seed), inputs[:1])
    logits = jax.eval_shape(model.apply, params, inputs[:1])
    labels = jnp.asarray(rng.integers(0, logits.shape[-1], (n, *logits.shape[1:-1])), jnp.int32)
    return model.apply, params, inputs, labels
