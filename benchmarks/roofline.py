r"""The roofline: this machine's float32 matmul peak, the Fisher's FLOPs, and where the time goes.

:mod:`benchmarks.compare` uses these to print, for each Fisher entry, its GFLOP/s and its
fraction of the measured peak:

* :func:`matmul_peak` times float32 matrix multiplies under ``jax.jit`` at the shapes that
  dominate the tutorial MLP's Fisher (``x W``: 10000x784 times 784x256; the contraction over the
  examples ``aᵀ b``: 784x10000 times 10000x256; and 4096³) and takes the best as the peak;
* :func:`program_flops` counts a JAX program's FLOPs: XLA's cost analysis
  (``jax.jit(f).lower(...).cost_analysis()``), which counts the body of a loop once, so where the
  program has a ``scan`` (the exact Fisher's loop over labels) the FLOPs of its traced jaxpr with
  each loop body counted ``length`` times are used instead;
* :func:`stage_profile` splits the argmax Fisher's time into its stages, on the plain-JAX
  one-pass program of :mod:`benchmarks.minimal`: forward, backward of ``δ``, and the per-layer
  contractions ``(a²)ᵀ δ²``, each with its GFLOP/s;
* :func:`family_rows`: the sampled Fisher's fraction of peak on the small CNN and the language
  model's transformer (:mod:`benchmarks.families`), where per-example gradients dominate.

Every entry of one Fisher row group is credited with the same work, :func:`mlp_fisher_flops`, the
matrix-multiply FLOPs of the minimal one-pass computation: GFLOP/s are then proportional to
speed, and a tool that does more arithmetic for the same Fisher shows as a lower fraction of
peak. XLA's count of ewc_jax's own program is reported beside it (within about 1% for the
estimators without a loop).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

PEAK_SHAPES: tuple[tuple[int, int, int, bool], ...] = (
    (10_000, 784, 256, False),
    (784, 10_000, 256, True),
    (4096, 4096, 4096, False),
)
"""``(M, K, N, contract_first)``: an ``[M, K] @ [K, N]`` product; ``contract_first`` computes it as
``a.T @ b`` with ``a`` stored ``[K, M]``, as the Fisher contracts over the examples."""

QUICK_PEAK_SHAPES = ((256, 128, 64, False), (128, 256, 64, True))


def cpu_flags() -> dict[str, Any]:
    """The CPU's vector extensions that matter for matmul speed (x86 ``/proc/cpuinfo`` flags).

    Returns:
      ``{"avx2": bool, "fma": bool, "avx512": [avx512* flags], "amx": [amx* flags]}``; all
      empty where there is no ``/proc/cpuinfo`` (macOS, Windows).
    """
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "amx": sorted(f for f in flags if f.startswith("amx")),
    }


def flags_summary(flags: dict[str, Any]) -> str:
    """E.g. ``"avx2 fma avx512 (f, bw, vnni, bf16)"``."""
    parts = [name for name in ("avx2", "fma") if flags.get(name)]
    if flags.get("avx512"):
        subsets = ", ".join(f.removeprefix("avx512").strip("_") or "?" for f in flags["avx512"])
        parts.append(f"avx512 ({subsets})")
    if flags.get("amx"):
        parts.append("amx")
    return " ".join(parts) or "none found"


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(
    shapes: Sequence[tuple[int, int, int, bool]] = PEAK_SHAPES, repeats: int = 5
) -> dict[str, Any]:
    """The float32 matmul throughput of JAX's default device, best of ``repeats`` per shape.

    Returns:
      ``{"peak_gflops": best, "shapes": [{"shape": "MxKxN", "gflops": ...}, ...]}``.
    """
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n, contract_first in shapes:
        a_shape = (k, m) if contract_first else (m, k)
        a = jax.device_put(rng.standard_normal(a_shape, np.float32))
        b = jax.device_put(rng.standard_normal((k, n), np.float32))
        product = jax.jit(lambda a, b, t=contract_first: (a.T if t else a) @ b)
        seconds = _best_seconds(lambda p=product, a=a, b=b: jax.block_until_ready(p(a, b)), repeats)
        label = f"{m}x{k}x{n}" + (" (aᵀb)" if contract_first else "")
        rows.append({"shape": label, "gflops": 2 * m * k * n / seconds / 1e9})
    return {"peak_gflops": max(r["gflops"] for r in rows), "shapes": rows}


def _eqn_flops(eqn: Any) -> float:
    """FLOPs of one jaxpr equation: ``2·M·N·K`` for contractions, one per output element
    otherwise; sub-programs counted, a ``scan`` body ``length`` times."""
    name = eqn.primitive.name
    out_size = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        shape = eqn.invars[0].aval.shape
        return 2.0 * out_size * math.prod(shape[d] for d in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec
        return 2.0 * out_size * math.prod(rhs) / rhs[spec[0]]
    inner = []
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, jex.core.ClosedJaxpr | jex.core.Jaxpr):
                inner.append(v)
    if inner:
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        if name == "cond":  # one branch runs
            return repeat * max(jaxpr_flops(j) for j in inner)
        return repeat * sum(jaxpr_flops(j) for j in inner)
    return float(out_size)


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of a (closed) jaxpr, loops counted by their trip count (see :func:`_eqn_flops`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(_eqn_flops(e) for e in jaxpr.eqns)


def _has_loop(jaxpr: Any) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            return True
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, jex.core.ClosedJaxpr | jex.core.Jaxpr) and _has_loop(v):
                    return True
    return False


def program_flops(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """The FLOPs of ``jax.jit(fn)(*args)``.

    Returns:
      ``{"xla": XLA's count, "jaxpr": the jaxpr count, "flops": the one used, "source": ...}``:
      XLA's count unless the program loops (XLA counts a loop body once), then the jaxpr's.
    """
    xla = float((jax.jit(fn).lower(*args).cost_analysis() or {}).get("flops", 0.0))
    jaxpr = jax.make_jaxpr(fn)(*args)
    counted = jaxpr_flops(jaxpr)
    if _has_loop(jaxpr):
        return {"xla": xla, "jaxpr": counted, "flops": counted, "source": "jaxpr (loops)"}
    return {"xla": xla, "jaxpr": counted, "flops": xla, "source": "xla"}


def mlp_fisher_flops(layer_sizes: Sequence[int], n: int, estimator: str) -> float:
    r"""Matrix-multiply FLOPs of the one-pass diagonal Fisher of an MLP over ``n`` examples.

    .. math:: 2N\Big(2\sum_{l} d_{l-1} d_l + K \sum_{l \ge 2} d_{l-1} d_l\Big)

    one forward pass and the contractions :math:`(a^2)^\top δ^2` (``2 N d_{l-1} d_l`` each per
    layer), and ``K`` backward passes of the layer-output gradients ``δ`` (none into the first
    layer's input), ``K = C`` classes for ``"exact"`` (whose ``Σ_c p_c δ_c²`` is combined before
    the contraction), else 1. Elementwise work is left out.
    """
    products = [a * b for a, b in itertools.pairwise(layer_sizes)]
    backward = layer_sizes[-1] if estimator == "exact" else 1
    return 2.0 * n * (2 * sum(products) + backward * sum(products[1:]))


def stage_profile(n: int, repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Where the argmax Fisher's time goes, stage by stage, on the plain-JAX one-pass program.

    Three programs, each a prefix of :func:`benchmarks.minimal.minimal_jax`: the forward pass;
    forward and the backward pass of the layer-output gradients ``δ``; and everything (plus the
    contractions ``(a²)ᵀ δ²`` and bias sums). A stage's time is the difference of consecutive
    programs' times, its FLOPs the difference of their jaxpr counts.

    Returns:
      One dict per stage: ``stage``, ``ms``, ``gflop``, ``gflops``; then ``"total"``, and
      ``"ewc_jax"``, the library call with its default chunk size, for comparison.
    """
    from benchmarks import workload

    weights = workload.tutorial_weights(seed)
    x_np, _ = workload.make_data(n, weights, seed=seed + 1)
    x = jax.device_put(x_np)
    layers = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]

    def forward(x):
        acts, pre, h = [x], [], x
        for w, b in layers:
            z = h @ w + b[None]
            pre.append(z)
            h = jax.nn.relu(z)
            acts.append(h)
        return acts, pre, h

    def deltas(x):
        acts, pre, h = forward(x)
        probs = jax.nn.softmax(h)
        onehot = jax.nn.one_hot(jnp.argmax(h, -1), h.shape[-1], dtype=h.dtype)
        d = jnp.where(pre[-1] > 0, onehot - probs, 0)
        out = [d]
        for i in reversed(range(1, len(layers))):
            d = jnp.where(pre[i - 1] > 0, d @ layers[i][0].T, 0)
            out.append(d)
        return acts, out[::-1]

    def everything(x):
        acts, ds = deltas(x)
        return [
            (jnp.square(a).T @ jnp.square(d), jnp.sum(jnp.square(d), 0))
            for a, d in zip(acts[:-1], ds, strict=True)
        ]

    programs = {
        "forward": lambda x: forward(x)[2],
        "backward δ": lambda x: deltas(x)[1],
        "(a²)ᵀδ² contractions": everything,
    }
    import ewc_jax

    params = workload.flax_params(weights)
    library = jax.jit(
        lambda p, x: ewc_jax.fisher_diagonal(workload.apply_fn(), p, x, estimator="argmax")
    )
    seconds, flops = {}, {}
    for name, fn in programs.items():
        compiled = jax.jit(fn).lower(x).compile()
        flops[name] = jaxpr_flops(jax.make_jaxpr(fn)(x))
        seconds[name] = _median(lambda c=compiled: jax.block_until_ready(c(x)), repeats)
    lib_compiled = library.lower(params, x).compile()
    lib_s = _median(lambda: jax.block_until_ready(lib_compiled(params, x)), repeats)
    rows, prev_s, prev_f = [], 0.0, 0.0
    for name in programs:
        ds, df = seconds[name] - prev_s, flops[name] - prev_f
        rows.append(_stage_row(name, ds, df))
        prev_s, prev_f = seconds[name], flops[name]
    rows.append(_stage_row("total (minimal JAX)", prev_s, prev_f))
    rows.append(_stage_row("ewc_jax.fisher_diagonal", lib_s, prev_f))
    return rows


def _stage_row(name: str, seconds: float, flops: float) -> dict[str, Any]:
    gflops = flops / seconds / 1e9 if seconds > 0 else None
    return {"stage": name, "ms": 1e3 * seconds, "gflop": flops / 1e9, "gflops": gflops}


def _median(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


FAMILY_SIZES: dict[str, tuple[int, int]] = {"conv": (16, 1024), "tiny_lm": (64, 2048)}
"""``family: (width, N)`` for :func:`family_rows`: the small CNN (two 3x3 convolutions on 8x8x3
inputs) and the language model's transformer (tokens ``[N, 8]``, logits ``[N, 8, 16]``)."""


def family_rows(
    peak_gflops: float,
    sizes: dict[str, tuple[int, int]] | None = None,
    repeats: int = 5,
    estimator: str = "sampled",
) -> list[dict[str, Any]]:
    """The Fisher's GFLOP/s and fraction of ``peak_gflops`` on other model families.

    Each family's ``fisher_diagonal`` (library defaults) is compiled under ``jax.jit`` and timed
    (median of ``repeats``); its FLOPs are counted with :func:`program_flops` on the same call
    with one chunk of all N examples.

    Returns:
      One dict per family: ``family``, ``width``, ``n``, ``estimator``, ``median_s``, ``flops``,
      ``flops_source``, ``gflops``, ``peak_fraction``.
    """
    import ewc_jax
    from benchmarks.families import build

    rows = []
    for family, (width, n) in (FAMILY_SIZES if sizes is None else sizes).items():
        apply_fn, params, inputs, _ = build(family, width, n)
        key = jax.random.key(0)

        def fisher(p, x, chunk_size=None, apply_fn=apply_fn, key=key):
            return ewc_jax.fisher_diagonal(
                apply_fn, p, x, estimator=estimator, key=key, chunk_size=chunk_size
            )

        counted = program_flops(lambda p, x, f=fisher, n=n: f(p, x, chunk_size=n), params, inputs)
        compiled = jax.jit(fisher).lower(params, inputs).compile()
        run = lambda c=compiled, p=params, x=inputs: jax.block_until_ready(c(p, x))
        seconds = _median(run, repeats)
        gflops = counted["flops"] / seconds / 1e9
        rows.append(
            {
                "family": family,
                "width": width,
                "n": n,
                "estimator": estimator,
                "median_s": seconds,
                "flops": counted["flops"],
                "flops_source": counted["source"],
                "gflops": gflops,
                "peak_fraction": gflops / peak_gflops,
            }
        )
    return rows
