"""What the run-time value checks cost inside a jitted training step.

Run::

    python -m benchmarks.checks --batch-sizes 32 256 --steps 200 --repeats 15

The step is the one an EWC user writes: an MLP (784-100-100-10, ReLU), softmax cross-entropy plus
``ewc_jax.penalty``, and ``optax.chain(ewc_jax.add_ewc_penalty(λ), optax.adam(1e-3))``. ``λ`` is
a traced argument of the step (as in a sweep over strengths), so its check is compiled into the
step: the worst case. With a Python-float ``λ`` the check runs once, at trace time, and the
compiled steps are identical (``--python-strength`` shows that ratio too).

The same step is compiled twice, once normally and once traced inside
``ewc_jax.checks_enabled(False)``. Samples of ``--steps`` steps alternate between the two
(checked first in odd repeats, unchecked first in even ones), and the report gives the ratio of
the medians, the median of the per-repeat ratios, and the ratio of the median process CPU
times (steadier than wall-clock time on a shared machine).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import optax

import ewc_jax

SIZES = (784, 100, 100, 10)


def _mlp(params: dict, x: jax.Array) -> jax.Array:
    for i in range(len(SIZES) - 1):
        x = x @ params[f"w{i}"] + params[f"b{i}"][None]
        if i < len(SIZES) - 2:
            x = jax.nn.relu(x)
    return x


def _init(key: jax.Array) -> dict:
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        key, k = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(k, (a, b)) / jnp.sqrt(jnp.asarray(a, jnp.float32))
        params[f"b{i}"] = jnp.zeros((b,))
    return params


def make_step(checks: bool, python_strength: float | None) -> Callable[..., Any]:
    """A jitted train step, traced (on first call) with the checks on or off."""

    def step(params, opt_state, ewc, strength, x, y):
        if python_strength is not None:
            strength = python_strength
        tx = optax.chain(ewc_jax.add_ewc_penalty(strength), optax.adam(1e-3))

        def loss_fn(p):
            logits = _mlp(p, x)
            task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return task + ewc_jax.penalty(p, ewc, strength)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step)

    def traced_with_switch(*args):
        with ewc_jax.checks_enabled(checks):
            return jitted(*args)

    return traced_with_switch


def _sample(step, state, steps: int) -> tuple[float, float, Any]:
    """Wall-clock and process CPU seconds of ``steps`` steps (CPU time: on a shared machine,
    the time spent waiting for a core does not count)."""
    params, opt_state, ewc, strength, x, y = state
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, ewc, strength, x, y)
    jax.block_until_ready((params, loss))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall, cpu, (params, opt_state, ewc, strength, x, y)


def measure(batch: int, steps: int, repeats: int, python_strength: float | None) -> dict:
    key = jax.random.key(0)
    params = _init(key)
    fisher = jax.tree.map(lambda p: jnp.abs(jax.random.normal(key, p.shape)) * 1e-3, params)
    ewc = ewc_jax.consolidate(None, jax.tree.map(lambda p: p + 0.01, params), fisher)
    tx = optax.chain(ewc_jax.add_ewc_penalty(100.0), optax.adam(1e-3))
    opt_state = ewc_jax.set_ewc_state(tx.init(params), ewc)
    x = jax.random.normal(jax.random.key(1), (batch, SIZES[0]))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, SIZES[-1])
    strength = jnp.asarray(100.0)
    steps_by = {True: make_step(True, python_strength), False: make_step(False, python_strength)}
    states = {c: (params, opt_state, ewc, strength, x, y) for c in steps_by}
    for checks, step in steps_by.items():  # compile and warm up
        *_, states[checks] = _sample(step, states[checks], max(steps // 4, 1))
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu_times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats):
        for checks in (True, False) if r % 2 else (False, True):
            wall, cpu, states[checks] = _sample(steps_by[checks], states[checks], steps)
            times[checks].append(wall / steps)
            cpu_times[checks].append(cpu / steps)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    paired = statistics.median(a / b for a, b in zip(times[True], times[False], strict=True))
    cpu_ratio = statistics.median(cpu_times[True]) / statistics.median(cpu_times[False])
    return {
        "batch": batch,
        "on_us": on * 1e6,
        "off_us": off * 1e6,
        "ratio": on / off,
        "paired": paired,
        "cpu_ratio": cpu_ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--steps", type=int, default=200, help="steps per timing sample")
    parser.add_argument("--repeats", type=int, default=15, help="samples per variant")
    parser.add_argument(
        "--python-strength", action="store_true", help="also time a Python-float strength"
    )
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; MLP {SIZES}, adam")
    print(
        "strength | batch | checks on µs/step | off µs/step | on/off (medians) | paired median "
        "| CPU-time on/off"
    )
    variants = [("traced", None)] + ([("python", 100.0)] if args.python_strength else [])
    for name, python_strength in variants:
        for batch in args.batch_sizes:
            m = measure(batch, args.steps, args.repeats, python_strength)
            print(
                f"{name:8} | {batch:5} | {m['on_us']:17.1f} | {m['off_us']:11.1f} | "
                f"{m['ratio']:16.4f} | {m['paired']:13.4f} | {m['cpu_ratio']:.4f}"
            )


if __name__ == "__main__":
    main()
