"""Small models shared by the tests: plain functions, Flax Linen, Flax NNX and Equinox."""

import itertools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def init_plain_mlp(key, sizes, dtype=jnp.float32):
    """A dict-of-arrays MLP for a plain-function model."""
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "w": jax.random.normal(k1, (a, b), dtype) / jnp.sqrt(jnp.asarray(a, dtype)),
            "b": 0.1 * jax.random.normal(k2, (b,), dtype),
        }
    return params


def plain_mlp(params, x):
    """tanh MLP over a dict of arrays; logits [B, C]."""
    n = len(params)
    for i in range(n):
        layer = params[f"layer{i}"]
        x = x @ layer["w"] + layer["b"][None]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


class LinenMLP(nn.Module):
    """Linen MLP; ``relu_logits`` reproduces the PyTorch tutorial's ReLU on the logits."""

    features: tuple[int, ...] = (16, 16)
    num_classes: int = 5
    relu_logits: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        x = nn.Dense(self.num_classes)(x)
        return nn.relu(x) if self.relu_logits else x


class LinenCNN(nn.Module):
    """Small CNN: Conv (with bias broadcast over space), LayerNorm, DenseGeneral."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(x)
        x = nn.Conv(3, (3, 3), strides=2)(x)
        x = nn.LayerNorm()(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.DenseGeneral(8)(x)
        x = nn.tanh(x)
        return nn.Dense(self.num_classes)(x)


class LinenMultiHead(nn.Module):
    """Shared trunk with one head per task; ``task`` picks the head (task-incremental)."""

    num_tasks: int = 3
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, task: int = 0):
        x = nn.relu(nn.Dense(12)(x))
        heads = [nn.Dense(self.num_classes, name=f"head{t}") for t in range(self.num_tasks)]
        outs = [h(x) for h in heads]
        return outs[task]


class LinenMixed(nn.Module):
    """Dense layers mixed with parameters the fast path does not cover."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(10)(x)
        # A learned temperature used through exp: not a contraction.
        log_scale = self.param("log_scale", nn.initializers.constant(0.1), (10,))
        x = jnp.tanh(x * jnp.exp(log_scale)[None])
        # A weight used twice (tied): not tapped, differentiated per example in the same pass.
        tied = self.param("tied", nn.initializers.normal(0.3), (10, 10))
        x = jnp.tanh(x @ tied) @ tied
        # A sequence-like Dense: the same kernel at every position (several terms per example).
        x = x.reshape((x.shape[0], 2, 5))
        x = nn.Dense(3)(x).reshape((x.shape[0], 6))
        return nn.Dense(4)(x)


class NNXMLP(nnx.Module):
    """NNX MLP with Linear layers."""

    def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.l2 = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))


class NNXCNN(nnx.Module):
    """NNX Conv followed by Linear."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.linear = nnx.Linear(6 * 6 * 3, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        return self.linear(x.reshape((x.shape[0], -1)))


def nnx_apply(graphdef):
    """``apply_fn(state, x)`` for an NNX model split with ``nnx.split``."""

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply


class TinyCausalLM(nn.Module):
    """Embedding, one causal self-attention layer with LayerNorm, a position-wise MLP, and
    per-token logits ``[B, T, V]``: the smallest model with every part of a language model."""

    vocab: int = 5
    width: int = 6

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(h, h, mask=mask)
        x = x + nn.Dense(self.width)(jnp.tanh(nn.Dense(8)(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab)(x)


class EqxMLP(eqx.Module):
    """Equinox MLP on one unbatched example: Linear, ReLU, Linear, tanh, Linear."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, sizes, *, key, dtype=jnp.float32):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k, dtype=dtype)
            for (a, b), k in zip(itertools.pairwise(sizes), keys, strict=True)
        )

    def __call__(self, x):
        activations = (jax.nn.relu, jnp.tanh)
        for i, layer in enumerate(self.layers[:-1]):
            x = activations[i % 2](layer(x))
        return self.layers[-1](x)


class EqxCNN(eqx.Module):
    """Equinox CNN on one ``[C, H, W]`` example: Conv2d (bias ``[out, 1, 1]``), ReLU, Linear."""

    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, *, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 3, 3, key=k1, dtype=dtype)
        self.linear = eqx.nn.Linear(3 * 4 * 4, 4, key=k2, dtype=dtype)

    def __call__(self, x):
        return self.linear(jax.nn.relu(self.conv(x)).reshape(-1))


def eqx_split(model):
    """``(apply_fn, params)``: the Equinox recipe, ``apply_fn`` vmapped over the batch."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params
