"""The floor under the argmax Fisher: the same one-pass arithmetic written minimally in plain JAX
and in plain PyTorch, next to ``ewc_jax.fisher_diagonal``, timed round-robin in one process.

Run::

    python -m benchmarks.minimal --n 10000 --repeats 7

Both minimal programs compute, for the tutorial MLP (784-256-256-256-10, ReLU on every layer)
and argmax labels, one forward pass, one backward pass for the layer-output gradients ``δ``
(never the weight gradients) and per layer ``(a²)ᵀ δ²``: the least arithmetic the method needs
(about 16 GFLOP at N = 10,000). Two bare GEMMs of the first layer's shapes show what each
framework's matrix multiply costs: ``x @ W`` (the forward) and ``aᵀ b`` (the contraction over
the N examples). If ewc_jax is within a few percent of the minimal JAX program and that program is
level with PyTorch's, the remaining gap to a target is the matmul library's, not the method's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

import ewc_jax
from benchmarks import workload


def minimal_jax(layers: list[tuple[jax.Array, jax.Array]]) -> Callable[[jax.Array], list]:
    """Plain JAX one-pass argmax Fisher sums (``Σ_n g_n²`` per kernel and bias)."""

    @jax.jit
    def fisher_sums(x):
        acts, pre, h = [x], [], x
        for w, b in layers:
            z = h @ w + b[None]
            pre.append(z)
            h = jax.nn.relu(z)
            acts.append(h)
        probs = jax.nn.softmax(h)
        onehot = jax.nn.one_hot(jnp.argmax(h, -1), h.shape[-1], dtype=h.dtype)
        d = jnp.where(pre[-1] > 0, onehot - probs, 0)
        out = []
        for i in reversed(range(len(layers))):
            out.append((jnp.square(acts[i]).T @ jnp.square(d), jnp.sum(jnp.square(d), 0)))
            if i:
                d = jnp.where(pre[i - 1] > 0, d @ layers[i][0].T, 0)
        return out

    return fisher_sums


def minimal_torch(layers: list[tuple[Any, Any]]) -> Callable[[Any], list]:
    """The same in plain PyTorch (``torch.no_grad``, weights ``[in, out]``)."""
    import torch

    def fisher_sums(x):
        with torch.no_grad():
            acts, pre, h = [x], [], x
            for w, b in layers:
                z = torch.addmm(b, h, w)
                pre.append(z)
                h = torch.relu(z)
                acts.append(h)
            probs = torch.softmax(h, -1)
            onehot = torch.nn.functional.one_hot(h.argmax(-1), h.shape[-1]).to(h.dtype)
            d = (onehot - probs) * (pre[-1] > 0)
            out = []
            for i in reversed(range(len(layers))):
                out.append(((acts[i] ** 2).T @ d**2, (d**2).sum(0)))
                if i:
                    d = (d @ layers[i][0].T) * (pre[i - 1] > 0)
            return out

    return fisher_sums


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    weights = workload.tutorial_weights(0)
    x_np, _ = workload.make_data(args.n, weights)
    params = workload.flax_params(weights)
    apply_fn = workload.apply_fn()
    layers = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]
    x = jnp.asarray(x_np)
    xt = torch.from_numpy(x_np.copy())
    torch_layers = [
        (torch.from_numpy(np.array(w)), torch.from_numpy(np.array(b))) for w, b in weights
    ]
    a, b = x, jnp.asarray(np.random.default_rng(0).random((args.n, 256), np.float32))
    at, bt = torch.from_numpy(np.asarray(a).copy()), torch.from_numpy(np.asarray(b).copy())
    w1, w1t = layers[0][0], torch_layers[0][0]
    jax_fisher, torch_fisher = minimal_jax(layers), minimal_torch(torch_layers)
    xw, atb = jax.jit(lambda a, w: a @ w), jax.jit(lambda a, b: a.T @ b)
    runners = {
        "ewc_jax.fisher_diagonal argmax": lambda: jax.block_until_ready(
            ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="argmax")
        ),
        "minimal JAX one pass": lambda: jax.block_until_ready(jax_fisher(x)),
        "minimal PyTorch one pass": lambda: torch_fisher(xt),
        "JAX x @ W1": lambda: jax.block_until_ready(xw(a, w1)),
        "PyTorch x @ W1": lambda: at @ w1t,
        "JAX aᵀb (contract N)": lambda: jax.block_until_ready(atb(a, b)),
        "PyTorch aᵀb (contract N)": lambda: at.T @ bt,
    }
    # The minimal programs agree with the library (sums / N = the Fisher).
    lib = ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="argmax")
    mine = jax_fisher(x)[-1][0] / args.n
    first = np.asarray(jax.tree.leaves(lib["params"]["Dense_0"])[1])
    err = float(np.max(np.abs(np.asarray(mine) - first)) / np.max(np.abs(first)))
    theirs = torch_fisher(xt)[-1][0].numpy() / args.n
    err_t = float(np.max(np.abs(theirs - first)) / np.max(np.abs(first)))
    print(f"first-layer kernel vs ewc_jax: minimal JAX {err:.1e}, minimal PyTorch {err_t:.1e}")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"N = {args.n}, torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for name, seconds in medians.items():
        print(f"{name:32s} {1e3 * seconds:9.1f} ms")
    ratio = medians["minimal PyTorch one pass"] / medians["minimal JAX one pass"]
    print(f"minimal PyTorch / minimal JAX: {ratio:.2f}")
    lib_ratio = medians["ewc_jax.fisher_diagonal argmax"] / medians["minimal JAX one pass"]
    print(f"ewc_jax / minimal JAX: {lib_ratio:.2f}")
    return medians


if __name__ == "__main__":
    main()
