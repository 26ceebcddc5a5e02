"""Is ``method="auto"`` ever the slow choice? The Fisher's paths timed side by side per family.

Run::

    python -m benchmarks.paths --out PATHS.json     # all families: long (grouped convs' general
                                                    # path takes minutes per call at N = 512)
    python -m benchmarks.paths --quick              # width 8, N 64: a minute

For every family in ``benchmarks.families`` (transformer block, Dense over sequences, DenseGeneral
over two axes, scanned layers, conv, grouped conv, MLP, tiny causal LM), width, N and estimator, it
times ``ewc_jax.fisher_diagonal`` with ``method="auto"``, ``"one_pass"`` and ``"general"``, called
eagerly (as a user calls it) and inside an outer ``jax.jit``. The three methods of one
configuration are timed round-robin (one call of each per round, the order rotating, medians of
``--repeats``), so load from other processes falls on all of them alike. It prints, per row, ``auto
/ min(one_pass, general)``: at most 1.10 means the default is within 10% of the faster path, and
``chosen / best``, the same for the path auto chose (auto compiles to that path's executable, so
this is the choice without a third noisy sample). Every result is checked against the general path
first (max relative error < 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import ewc_jax
from benchmarks.families import FAMILIES, build
from ewc_jax._engine import cost
from ewc_jax._engine import model as model_lib

METHODS = ("auto", "one_pass", "general")


def _rel_err(a: Any, b: Any) -> float:
    """Worst leaf's max|a - b| / max|b|; leaves whose Fisher is zero in exact arithmetic (an
    attention key bias: softmax ignores it) are scaled by 1e-6 of the largest entry instead."""
    floor = 1e-6 * max(float(np.max(np.abs(v))) for v in jax.tree.leaves(b))
    errs = []
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(float(np.max(np.abs(v))), floor)
        errs.append(0.0 if scale == 0 else float(np.max(np.abs(np.asarray(u) - v))) / scale)
    return max(errs)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(
    family: str, width: int, n: int, estimator: str, repeats: int, slow: float = 10.0
) -> list[dict]:
    """Rows for one configuration: per calling mode, the median time of each method.

    A method whose warm-up call takes over ``slow`` seconds is not called again: its one call
    (after compilation) is its time.
    """
    apply_fn, params, inputs, labels = build(family, width, n)
    key = jax.random.key(0)

    def call(method: str, p: Any, x: Any, y: Any) -> Any:
        return ewc_jax.fisher_diagonal(
            apply_fn, p, x, y, estimator=estimator, key=key, method=method
        )

    eager = {m: (lambda m=m: call(m, params, inputs, labels)) for m in METHODS}
    jitted = {m: jax.jit(lambda p, x, y, m=m: call(m, p, x, y)) for m in METHODS}
    under_jit = {m: (lambda m=m: jitted[m](params, inputs, labels)) for m in METHODS}
    reference = jax.device_get(eager["general"]())
    rows = []
    for mode, fns in (("eager", eager), ("jit", under_jit)):
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        too_slow = set()
        for method, fn in fns.items():
            err = _rel_err(jax.device_get(fn()), reference)  # compiles
            if err > 1e-4:
                raise RuntimeError(f"{family} {mode} {method}: relative error {err:.2e}")
            warm = _timed(fn)
            if warm > slow:
                times[method].append(warm)
                too_slow.add(method)
        for round_ in range(repeats):
            # The order rotates every round: the call after the general path (which sweeps
            # the caches with per-example gradients) would otherwise always start cold.
            order = list(fns)[round_ % len(fns) :] + list(fns)[: round_ % len(fns)]
            for method in order:
                if method not in too_slow:
                    times[method].append(_timed(fns[method]))
        medians = {m: statistics.median(t) for m, t in times.items()}
        best = min(medians["one_pass"], medians["general"])
        chosen = auto_choice(apply_fn, params, inputs, estimator)
        rows.append(
            dict(
                family=family,
                width=width,
                n=n,
                estimator=estimator,
                mode=mode,
                **{f"{m}_s": medians[m] for m in METHODS},
                auto_over_best=medians["auto"] / best,
                auto_chose=chosen,
                chosen_over_best=medians[chosen] / best,
            )
        )
    return rows


def auto_choice(apply_fn: Callable, params: Any, inputs: Any, estimator: str) -> str:
    """Which path ``method="auto"`` runs for this model and estimator.

    Auto compiles to the same executable as the path it chooses (the jit cache entry is shared),
    so ``chosen_over_best`` (the chosen path's median over the faster one's) measures the choice
    without a third noisy sample; ``auto_over_best`` is the direct measurement.
    """
    return cost.auto_method(model_lib.Model.of(apply_fn, params, inputs), estimator)


def format_row(row: dict) -> str:
    ms = lambda s: f"{1e3 * s:9.1f}"
    flag = "" if row["chosen_over_best"] <= 1.10 else "  <-- auto chose the slower path"
    return (
        f"{row['family']:20s} {row['width']:4d} {row['n']:6d} {row['estimator']:7s} "
        f"{row['mode']:5s} {ms(row['auto_s'])} {ms(row['one_pass_s'])} {ms(row['general_s'])}"
        f" {row['auto_over_best']:6.2f} {row['auto_chose']:>8s} {row['chosen_over_best']:6.2f}"
        f"{flag}"
    )


HEADER = (
    f"{'family':20s} {'width':>4s} {'N':>6s} {'est':7s} {'mode':5s} {'auto ms':>9s} "
    f"{'1pass ms':>9s} {'general':>9s} {'a/best':>6s} {'chose':>8s} {'c/best':>6s}"
)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--widths", default="16,64")
    parser.add_argument("--sizes", default="512,4096")
    parser.add_argument("--estimators", default="argmax,exact")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--slow", type=float, default=10.0, help="seconds; timed once above")
    parser.add_argument("--quick", action="store_true", help="width 8, N 64, 2 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.sizes, args.repeats = "8", "64", 2
    rows = []
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax "
        f"{jax.__version__}, device {jax.devices()[0].device_kind}"
    )
    print(HEADER, flush=True)
    for family in args.families.split(","):
        for width in map(int, args.widths.split(",")):
            for n in map(int, args.sizes.split(",")):
                for estimator in args.estimators.split(","):
                    for row in measure(family, width, n, estimator, args.repeats, args.slow):
                        row["load"] = os.getloadavg()[0]
                        rows.append(row)
                        print(format_row(row), flush=True)
    worst = max(rows, key=lambda r: r["chosen_over_best"])
    print(f"worst chosen / best: {worst['chosen_over_best']:.2f} ({format_row(worst).strip()})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
