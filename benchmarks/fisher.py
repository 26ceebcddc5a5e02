"""The diagonal Fisher, per estimator: ewc_jax against every PyTorch tool, checked, then timed.

For each estimator and size N, on the same float32 weights and inputs:

* ``jax_default``: ``ewc_jax.fisher_diagonal(apply_fn, params, x, labels, estimator=..., key=...)``
  with the library's defaults (the reference of every check and every ratio);
* ``jax_calibrated``: the same call with ``EWC_JAX_CALIBRATE=on``, so that its chunk size is
  measured at compilation (:mod:`ewc_jax._calibration`; its note says what was chosen, its
  compile time includes the measurement);
* ``jax_general``: the same with ``method="general"`` (``jax.vmap(jax.grad)``) in chunks of
  ``chunk_size``;
* argmax and empirical: ``torch_tutorial_loop`` (one example at a time), ``torch_func_vmap``
  (``torch.func.vmap(grad)`` in chunks), ``torch_hooks`` (plain PyTorch, one pass),
  ``backpack_sum_grad_squared`` and ``nngeometry_pmatdiag``;
* exact: ``torch_hooks``, ``backpack_diag_ggn_exact`` and ``nngeometry_pmatdiag`` (``FIM``);
* sampled: ``torch_hooks``, ``backpack_diag_ggn_mc`` (``mc_samples=1``) and
  ``nngeometry_pmatdiag_mc`` (``FIM_MonteCarlo``, one trial).

``torch_hooks`` first times its own chunk sizes (the candidates ``ewc_jax`` calibrates with, and
``torch_chunk_size``) and is then timed at its fastest, so the comparison is against the fastest
plain PyTorch one pass anyone could tune. Every entry carries ``flops``, the matrix-multiply FLOPs
of the one-pass Fisher (:func:`benchmarks.roofline.mlp_fisher_flops`), the same for every entry
of a row group.

Checks before timing: every deterministic result equals ``jax_default`` (``max|a − b| / max|b|``
per parameter < ``rtol``). A sampled Fisher cannot equal another one draw for draw (each tool has
its own RNG), so each sampled method is run on the inputs tiled until it has drawn at least
``mc_check_draws`` labels and compared with the exact Fisher (``‖a − b‖₂ / ‖b‖₂`` per parameter <
``mc_rtol``); the noise of that comparison shrinks as 1/√draws, a wrong normalisation does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

import ewc_jax
from benchmarks import harness, roofline, torch_fisher, torch_tutorial, workload
from benchmarks.harness import Checks, Config, Entry, Runner
from benchmarks.torch_tutorial import LayerArrays
from ewc_jax import _calibration

TORCH_METHODS: dict[str, tuple[str, ...]] = {
    "argmax": (
        "torch_tutorial_loop",
        "torch_func_vmap",
        "torch_hooks",
        "backpack_sum_grad_squared",
        "nngeometry_pmatdiag",
    ),
    "empirical": (
        "torch_tutorial_loop",
        "torch_func_vmap",
        "torch_hooks",
        "backpack_sum_grad_squared",
        "nngeometry_pmatdiag",
    ),
    "exact": ("torch_hooks", "backpack_diag_ggn_exact", "nngeometry_pmatdiag"),
    "sampled": ("torch_hooks", "backpack_diag_ggn_mc", "nngeometry_pmatdiag_mc"),
}
"""The PyTorch entries of each estimator, in the order they are run and printed."""

JAX_METHODS = ("jax_default", "jax_calibrated", "jax_general")
REFERENCE = "jax_default"


def methods(estimator: str) -> tuple[str, ...]:
    """Every entry of ``estimator``: the two JAX ones, then the PyTorch tools."""
    return JAX_METHODS + TORCH_METHODS[estimator]


def _module(method: str) -> str:
    """The optional package a PyTorch method needs."""
    return method.split("_", 1)[0] if method.startswith(("backpack", "nngeometry")) else "torch"


def skip_reason(method: str, config: Config) -> str | None:
    """Why ``method`` cannot or should not run here, or ``None`` when it runs."""
    if method in config.skip and method != REFERENCE:
        return "skipped with --skip"
    if method in JAX_METHODS:
        return None
    if not config.use_torch:
        return "disabled with --no-torch"
    if not harness.installed("torch"):
        return "torch is not installed (pip install 'ewc-jax[bench]')"
    module = _module(method)
    if not harness.installed(module):
        return f"{module} is not installed (see the Makefile's BENCH_NO_DEPS)"
    return None


def _jax_fisher_fn(estimator: str, method: str, chunk_size: int | None) -> Callable[..., Any]:
    """The Fisher call of a JAX entry; ``jax_calibrated`` calibrates while it is traced."""
    apply_fn = workload.apply_fn()
    options = {"method": "general", "chunk_size": chunk_size} if method == "jax_general" else {}
    calibrate = "on" if method == "jax_calibrated" else None

    def fisher(params: Any, inputs: jax.Array, labels: Any, key: Any) -> Any:
        with _calibration_mode(calibrate):
            return ewc_jax.fisher_diagonal(
                apply_fn, params, inputs, labels, estimator=estimator, key=key, **options
            )

    return fisher


@contextlib.contextmanager
def _calibration_mode(mode: str | None) -> Iterator[None]:
    """``EWC_JAX_CALIBRATE=mode`` inside (``None``: as the environment has it)."""
    if mode is None:
        yield
        return
    previous = os.environ.get(_calibration.ENV_VAR)
    os.environ[_calibration.ENV_VAR] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_calibration.ENV_VAR]
        else:
            os.environ[_calibration.ENV_VAR] = previous


@dataclasses.dataclass(frozen=True)
class _Problem:
    """One estimator at one size: the inputs in both frameworks and the checks' references."""

    estimator: str
    inputs: np.ndarray
    labels: np.ndarray
    exact: list[LayerArrays] | None


def _torch_call(
    method: str,
    problem: _Problem,
    weights: Sequence[LayerArrays],
    config: Config,
    chunk_size: int | None = None,
) -> Callable[[np.ndarray], list[LayerArrays]]:
    """``method``'s Fisher of given numpy inputs (labels: the problem's, tiled to match), in
    chunks of ``chunk_size`` (default ``config.torch_chunk_size``) for the one-pass tools."""
    torch_chunk = config.torch_chunk_size if chunk_size is None else chunk_size
    import torch

    device = torch_tutorial.default_device()
    model = torch_tutorial.build_mlp(weights, device)
    estimator = problem.estimator
    tool: Callable[..., dict[str, torch.Tensor]]
    if method == "torch_tutorial_loop":
        tool = lambda m, x, est, y, chunk: torch_tutorial.tutorial_fisher(m, x, y)
    elif method == "torch_func_vmap":
        chunk_size = config.chunk_size
        tool = lambda m, x, est, y, chunk: torch_tutorial.functorch_fisher(m, x, chunk_size, y)
    elif method == "torch_hooks":
        tool = torch_fisher.hooks_fisher
    elif method.startswith("backpack"):
        model = torch_fisher.backpack_model(model)
        tool = torch_fisher.backpack_fisher
    else:
        tool = torch_fisher.nngeometry_fisher

    def call(inputs: np.ndarray) -> list[LayerArrays]:
        x = torch.from_numpy(inputs).to(device)
        y = None
        if estimator == "empirical":
            copies = len(inputs) // len(problem.labels)
            y = torch.from_numpy(np.tile(problem.labels, copies).astype(np.int64)).to(device)
        result = tool(model, x, estimator, y, torch_chunk)
        torch_tutorial.synchronize(device)
        return torch_tutorial.to_layer_arrays(result)

    return call


def _check(
    checks: Checks,
    name: str,
    problem: _Problem,
    result: list[LayerArrays],
    reference: list[LayerArrays],
    call: Callable[[np.ndarray], list[LayerArrays]],
    config: Config,
) -> None:
    """The deterministic check against ``jax_default``, or the Monte-Carlo one against exact."""
    n = len(problem.inputs)
    if problem.estimator != "sampled":
        checks(f"{problem.estimator}: {name} vs {REFERENCE}", n, result, reference, config.rtol)
        return
    assert problem.exact is not None
    copies = math.ceil(config.mc_check_draws / n)
    if copies > 1:
        result = call(np.tile(problem.inputs, (copies, 1)))
    checks(
        f"sampled: {name}, {copies * n} draws, vs exact",
        n,
        result,
        problem.exact,
        config.mc_rtol,
        metric="rel_l2_err",
    )


def run_fisher(
    config: Config, weights: Sequence[LayerArrays], n: int, estimator: str, checks: Checks
) -> list[Entry]:
    """Checks, then times, every method of ``estimator`` at size ``n``.

    Args:
      config: harness settings.
      weights: the model, as numpy arrays.
      n: number of examples.
      estimator: one of ``harness.ESTIMATORS``.
      checks: where the agreement checks are recorded.

    Returns:
      The entries, in :func:`methods` order; PyTorch tools that cannot run are skipped, with the
      reason.

    Raises:
      CheckFailed: a method's Fisher disagrees with the reference (nothing has been timed).
    """
    print(f"Fisher, {estimator}, N={n}", flush=True)
    inputs, labels = workload.make_data(n, weights, data=config.data, seed=config.seed + 1)
    params = workload.flax_params(weights)
    key = jax.random.key(config.seed) if estimator == "sampled" else None
    jax_labels = jax.device_put(labels) if estimator == "empirical" else None
    exact = None
    if estimator == "sampled":
        exact_fn = jax.jit(_jax_fisher_fn("exact", True, None))
        exact = workload.layer_arrays(exact_fn(params, jax.device_put(inputs), None, None))
    problem = _Problem(estimator, inputs, labels, exact)

    runners: list[Runner] = []
    entries: list[Entry] = []
    reference: list[LayerArrays] = []
    flops = roofline.mlp_fisher_flops(workload.LAYER_SIZES, n, estimator)
    for name in JAX_METHODS:
        reason = skip_reason(name, config)
        if reason is not None:
            entries.append(Entry(name, estimator, "jax", n, status="skipped", reason=reason))
            continue

        def mc_call(x: np.ndarray, name: str = name) -> list[LayerArrays]:
            """The sampled Fisher of tiled inputs, for the Monte-Carlo check."""
            fn = jax.jit(_jax_fisher_fn(estimator, name, config.chunk_size))
            return workload.layer_arrays(fn(params, jax.device_put(x), None, key))

        calibrations = len(_calibration.HISTORY)
        compile_s, compiled = harness.compile_ahead(
            _jax_fisher_fn(estimator, name, config.chunk_size),
            params,
            jax.device_put(inputs),
            jax_labels,
            key,
        )
        call = harness.blocking(compiled, params, jax.device_put(inputs), jax_labels, key)
        warmup_s, result = harness.timed(call)
        result = workload.layer_arrays(result)
        if name == REFERENCE:
            reference = result
        if name != REFERENCE or estimator == "sampled":
            _check(checks, name, problem, result, reference, mc_call, config)
        note = {
            REFERENCE: "library defaults",
            "jax_calibrated": _calibration_note(_calibration.HISTORY[calibrations:]),
            "jax_general": f"method='general', chunk_size={config.chunk_size}",
        }[name]
        entry = Entry(name, estimator, "jax", n, compile_s=compile_s, warmup_s=warmup_s, note=note)
        runners.append((entry, call))
        entries.append(entry)

    for name in TORCH_METHODS[estimator]:
        reason = skip_reason(name, config)
        if reason is not None:
            entries.append(Entry(name, estimator, "torch", n, status="skipped", reason=reason))
            continue
        note = _note(name, config)
        chunk = None
        if name == "torch_hooks" and config.tune_torch_chunk:
            chunk, note = _fastest_hooks_chunk(problem, weights, config)
        torch_call = _torch_call(name, problem, weights, config, chunk)
        warmup_s, result = harness.timed(lambda c=torch_call: c(inputs))
        _check(checks, name, problem, result, reference, torch_call, config)
        entry = Entry(name, estimator, "torch", n, warmup_s=warmup_s, note=note)
        runners.append((entry, lambda c=torch_call: c(inputs)))
        entries.append(entry)

    for entry in entries:
        entry.flops = flops
    harness.time_round_robin(runners, config)
    return entries


def _calibration_note(found: Sequence[_calibration.Calibration]) -> str:
    """What ``jax_calibrated``'s compilation measured and chose."""
    if not found:
        return "EWC_JAX_CALIBRATE=on: nothing to choose (one candidate, or cached)"
    last = found[-1]
    if last.source == "file":
        return f"EWC_JAX_CALIBRATE=on: chunk_size={last.chosen} (from the JSON cache)"
    timed = ", ".join(f"{c}: {1e3 * t:.1f}" for c, t in last.seconds.items())
    return f"EWC_JAX_CALIBRATE=on: chunk_size={last.chosen} (ms per chunk {timed})"


def hooks_chunk_candidates(n: int, config: Config) -> tuple[int, ...]:
    """The chunk sizes ``torch_hooks`` tries: ewc_jax's calibration candidates for N examples
    (whose memory budget holds all N for this MLP) and ``torch_chunk_size``."""
    sizes = set(_calibration.candidates(n, n))
    if config.torch_chunk_size:
        sizes.add(min(config.torch_chunk_size, n))
    return tuple(sorted(sizes, reverse=True))


def _fastest_hooks_chunk(
    problem: _Problem, weights: Sequence[LayerArrays], config: Config
) -> tuple[int, str]:
    """``torch_hooks``' fastest chunk size (median of two calls each) and its note."""
    n = len(problem.inputs)
    seconds = {}
    for size in hooks_chunk_candidates(n, config):
        call = _torch_call("torch_hooks", problem, weights, config, size)
        call(problem.inputs)
        seconds[size] = statistics.median(
            harness.timed(lambda c=call: c(problem.inputs))[0] for _ in range(2)
        )
    best = min(seconds, key=seconds.__getitem__)
    tried = ", ".join(f"{c}: {1e3 * t:.0f}" for c, t in seconds.items())
    return best, f"forward hooks, (δ²)ᵀ(a²) per Linear, chunk_size={best}, fastest of ms {tried}"


def _note(method: str, config: Config) -> str:
    """How a PyTorch entry was run."""
    if method == "torch_tutorial_loop":
        return "one example at a time (the tutorial)"
    if method == "torch_func_vmap":
        return f"chunk_size={config.chunk_size}"
    chunk = f"chunk_size={config.torch_chunk_size or 'N'}"
    details = {
        "torch_hooks": "forward hooks, (δ²)ᵀ(a²) per Linear",
        "backpack_sum_grad_squared": "SumGradSquared, reduction=sum, /N",
        "backpack_diag_ggn_exact": "DiagGGNExact, reduction=sum, /N",
        "backpack_diag_ggn_mc": "DiagGGNMC(mc_samples=1), reduction=sum, /N",
        "nngeometry_pmatdiag": "PMatDiag",
        "nngeometry_pmatdiag_mc": "PMatDiag, FIM_MonteCarlo(trials=1)",
    }
    return f"{details[method]}, {chunk}"


def ratios(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """``jax_default`` and ``jax_calibrated`` against each PyTorch tool and the fastest of them,
    and ``jax_default`` against ``jax_general``."""
    calibrated = [e for e in entries if e.name == "jax_calibrated"]
    return [
        *harness.speedups(entries, REFERENCE),
        *(harness.speedups(entries, "jax_calibrated") if calibrated else []),
        harness.within_framework(entries, REFERENCE, "jax_general"),
    ]
