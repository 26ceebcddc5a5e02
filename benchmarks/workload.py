"""The problem every benchmark runs: the tutorial's MLP, its weights and its inputs.

The model and the data come from :mod:`experiments` (``experiments.models.tutorial_mlp``,
``experiments.data.load_dataset("embedded:mnist")``); this module only draws the weights both
frameworks share and turns the dataset into the benchmark's ``N`` examples. Weights travel as
framework-neutral numpy ``(kernel[in, out], bias[out])`` pairs, one per Dense layer, which
:func:`flax_params` loads into Flax and ``benchmarks.torch_tutorial.build_mlp`` into PyTorch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.torch_tutorial import LayerArrays
from experiments.data import load_dataset
from experiments.models import tutorial_mlp

LAYER_SIZES = (784, 256, 256, 256, 10)
"""The tutorial's MLP: 784-256-256-256-10, a ReLU after every layer (335,114 parameters)."""

DATA_SOURCES = ("mnist", "random")


@functools.cache
def apply_fn() -> Callable[[Any, jax.Array], jax.Array]:
    """``apply(params, inputs[B, 784]) -> logits[B, 10]`` of ``experiments.models.tutorial_mlp``.

    Always the same object: ``fisher_diagonal`` caches its compilation per ``apply_fn``, and an
    equal but new bound method compiles again.
    """
    return tutorial_mlp().apply


def tutorial_weights(seed: int, sizes: Sequence[int] = LAYER_SIZES) -> list[LayerArrays]:
    """PyTorch-default initialisation, U(±1/√fan_in) for kernel and bias, as float32 numpy.

    Args:
      seed: numpy seed.
      sizes: layer widths, input first.

    Returns:
      ``(kernel[in, out], bias[out])`` per layer.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / np.sqrt(fan_in)
        kernel = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        bias = rng.uniform(-bound, bound, fan_out).astype(np.float32)
        weights.append((kernel, bias))
    return weights


def flax_params(weights: Sequence[LayerArrays]) -> dict[str, Any]:
    """Flax variables ``{"params": {"Dense_i": {"kernel", "bias"}}}`` holding ``weights``."""
    return {
        "params": {
            f"Dense_{i}": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
            for i, (kernel, bias) in enumerate(weights)
        }
    }


def layer_arrays(params: dict[str, Any]) -> list[LayerArrays]:
    """Inverse of :func:`flax_params`: ``(kernel, bias)`` numpy pairs in layer order."""
    layers = params["params"]
    return [
        (np.asarray(layers[f"Dense_{i}"]["kernel"]), np.asarray(layers[f"Dense_{i}"]["bias"]))
        for i in range(len(layers))
    ]


def preactivations_numpy(weights: Sequence[LayerArrays], x: np.ndarray) -> list[np.ndarray]:
    """Every Dense layer's output before its ReLU, in float64: the referee for rounding."""
    h = x.astype(np.float64)
    outputs = []
    for kernel, bias in weights:
        z = h @ kernel.astype(np.float64) + bias
        outputs.append(z)
        h = np.maximum(z, 0.0)
    return outputs


def forward_numpy(weights: Sequence[LayerArrays], x: np.ndarray) -> np.ndarray:
    """The tutorial MLP's ReLU'd logits in float64, the referee for argmax near-ties."""
    return np.maximum(preactivations_numpy(weights, x)[-1], 0.0)


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 embedded MNIST digits (train and test), flattened; parsed once (it takes s)."""
    dataset = load_dataset("embedded:mnist")
    x = np.concatenate([dataset.train_images, dataset.test_images]).reshape(-1, LAYER_SIZES[0])
    y = np.concatenate([dataset.train_labels, dataset.test_labels])
    x.flags.writeable = y.flags.writeable = False
    return x, y


def make_data(
    n: int,
    weights: Sequence[LayerArrays],
    *,
    data: str = "mnist",
    seed: int = 0,
    min_margin: float = 1e-4,
    min_kink_distance: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 inputs in [0, 1] and their true labels, free of argmax ties and ReLU kinks.

    ``"mnist"`` tiles the 5,000 embedded digits of ``experiments.data``; every copy after the first
    gets Gaussian noise (σ 0.1, clipped). ``"random"`` draws uniform pixels and random labels.
    Two kinds of examples are dropped (decided in float64), because float32 rounding would answer
    them differently in each framework and the Fisher comparison would test rounding, not the
    method: those whose two largest (ReLU'd) logits are closer than ``min_margin`` (a different
    argmax label; that includes examples whose logits are all ReLU'd to zero), and those with a
    Dense output within ``min_kink_distance`` of the ReLU's kink at 0 (a different ReLU mask: one
    such example of 10,000 moved the exact Fisher of the first two layers by 5e-5 relative).

    Args:
      n: number of examples to return.
      weights: the model the margins are computed with.
      data: ``"mnist"`` or ``"random"``.
      seed: numpy seed for noise and random data.
      min_margin: smallest kept gap between the top two logits.
      min_kink_distance: smallest kept ``|z|`` of any Dense layer's output ``z`` before its ReLU.

    Returns:
      ``(inputs[n, 784] float32, labels[n] int32)``.

    Raises:
      ValueError: ``data`` is not one of :data:`DATA_SOURCES`.
    """
    if data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}")
    rng = np.random.default_rng(seed)
    kept_x: list[np.ndarray] = []
    kept_y: list[np.ndarray] = []
    have, copy = 0, 0
    while have < n:
        if data == "mnist":
            x, y = _mnist()
            if copy > 0:
                x = np.clip(x + rng.normal(0.0, 0.1, x.shape).astype(np.float32), 0.0, 1.0)
        else:
            x = rng.uniform(0.0, 1.0, (5000, LAYER_SIZES[0])).astype(np.float32)
            y = rng.integers(0, LAYER_SIZES[-1], 5000).astype(np.int32)
        preactivations = preactivations_numpy(weights, x)
        top2 = np.sort(np.maximum(preactivations[-1], 0.0), axis=1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] >= min_margin
        for z in preactivations:
            keep &= np.min(np.abs(z), axis=1) >= min_kink_distance
        kept_x.append(x[keep])
        kept_y.append(y[keep])
        have += int(keep.sum())
        copy += 1
    return np.concatenate(kept_x)[:n], np.concatenate(kept_y)[:n]
