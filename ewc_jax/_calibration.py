r"""Chunk sizes chosen by measuring the compiled chunk program on this machine.

The Fisher is summed over examples ``c`` at a time (``chunk_size``). The byte-budget default (as
many examples as fit in ``MEMORY_BUDGET_BYTES``) bounds memory but not time: on CPUs the fastest
chunk is set by the caches and the matrix-multiply kernels, and it differs between machines (the
argmax Fisher of the tutorial MLP at N = 10,000 ran in 100 ms at the default chunk and 71 ms at
2,500 on one machine). So at the first call for a given program (model, shapes, dtypes,
estimator, path, N) the chunk program is compiled and timed at a few candidate sizes, and the
one that minimises the predicted time of the whole call,

.. math:: T(c) = \left\lceil N / c \right\rceil \, t(c),

is used, where ``t(c)`` is the time per chunk: the best of a few timed runs of the chunked
program over the largest candidate's examples (``⌈d / c⌉`` chunks of ``c``, ``d`` below), divided by
that number of chunks. Timing the chunks in a row, each on its own examples, matters: one chunk
timed again and again runs from a warm cache, and on a 2-core Xeon it predicted 90 ms for the
call at its chosen chunk (625) where the call took 106 ms. The
candidates are the byte-budget default ``d = min(default, N)`` and balanced sizes below it,
``c_j = \lceil N / (\lceil N / d \rceil\, 2^j) \rceil`` (so the last chunk is rarely a sliver), down
to ``MIN_CHUNK``; they are timed from the largest down and the search stops once ``PATIENCE``
candidates in a row were no faster than the best so far. Every candidate fits the memory budget,
since none exceeds the default.

The choice is cached per process, and, when JAX's persistent compilation cache is configured
(``jax.config.jax_compilation_cache_dir``), written to ``ewc_jax_chunk_sizes.json`` in that
directory, keyed by a hash of the lowered program, N and the device, so a later process on the
same machine skips the measurement (a corrupt or foreign file is ignored and rewritten).

The environment variable ``EWC_JAX_CALIBRATE`` selects when this runs:

* ``auto`` (default): when one call is big enough to repay the measurement, at least
  ``AUTO_MIN_FLOPS`` by XLA's count (the tutorial MLP's argmax Fisher at N = 10,000 is 16 GFLOP,
  too small; at N = 10^6 it is calibrated), and N leaves at least two candidates. Measuring costs
  a compilation per candidate and a few chunk-sized runs;
* ``on``: whenever N leaves at least two candidates;
* ``off``: never; the byte-budget default.

An explicit ``chunk_size=`` is never overridden, and nothing is calibrated for data-parallel
(``mesh=``) or sharded-parameter calls. Under an outer ``jax.jit``/``jax.vmap`` the shapes are
static, so the chunk program is timed on concrete stand-ins of the same shapes and dtypes (traced
leaves replaced by fixed pseudo-random values, integer leaves by zeros, PRNG keys by split
keys); concrete arguments are timed as given. Either way the timing only picks ``c``.

Results depend on ``c`` only through the order of the float summation (chunk sums are added with
Kahan compensation), so a calibrated call agrees with an uncalibrated one to float rounding,
about 1e-7 relative in float32; ``"sampled"`` draws the same labels whatever ``c`` is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np

ENV_VAR = "EWC_JAX_CALIBRATE"
MODES = ("auto", "on", "off")
MIN_CHUNK = 256
"""No candidate is smaller: below it per-chunk overhead dominates and XLA's kernels starve."""
MAX_CANDIDATES = 5
PATIENCE = 2
REPEATS = 3
"""Timed runs per candidate (after one untimed warm-up); the fastest counts."""
AUTO_MIN_FLOPS = 1e12
"""``auto`` calibrates calls of at least this many FLOPs by XLA's count (about 5 s at 200 GFLOP/s):
calibrating costs one compilation per candidate (about 1 s each for the tutorial MLP on 2 cores),
which a 10-30% faster chunk repays within the first call or two. XLA counts a loop body once, so
the exact Fisher's scan over the classes counts as one class: it is calibrated later than its work
warrants."""
WEIGHT_REUSE = 64
"""``auto`` does not even lower the program (about 1 s) when ``2 · N · parameters``, the FLOPs of a
forward pass that uses each weight once per example, is below ``AUTO_MIN_FLOPS / WEIGHT_REUSE``:
convolutions and sequence models reuse a weight at many positions, but rarely 64 times more."""
CACHE_FILE = "ewc_jax_chunk_sizes.json"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """One calibration: what was timed and what was chosen.

    Attributes:
      n: examples in the call.
      default: the byte-budget chunk size.
      chosen: the chunk size used.
      seconds: seconds per chunk of each timed candidate (empty when read from the JSON file).
      source: ``"measured"`` or ``"file"``.
      flops: XLA's FLOP count of the whole call at the default chunk size.
    """

    n: int
    default: int
    chosen: int
    seconds: dict[int, float]
    source: str
    flops: float


_CHOSEN: dict[Hashable, int] = {}
HISTORY: list[Calibration] = []
"""Every calibration of this process, oldest first (what the benchmark reports)."""


def mode() -> str:
    """The ``EWC_JAX_CALIBRATE`` setting: ``"auto"`` (default), ``"on"`` or ``"off"``.

    Raises:
      ValueError: any other value.
    """
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r}; valid values: {MODES}.")
    return value


def clear_cache() -> None:
    """Forgets this process's choices (not the JSON file)."""
    _CHOSEN.clear()
    HISTORY.clear()


def candidates(
    default: int, n: int, min_chunk: int | None = None, max_candidates: int | None = None
) -> tuple[int, ...]:
    r"""Chunk sizes to time, largest first: ``d = min(default, n)``, then
    :math:`\lceil n / (\lceil n/d \rceil 2^j) \rceil` for ``j = 1, 2, ...`` while at least
    ``min_chunk`` (default ``MIN_CHUNK``), at most ``max_candidates`` (``MAX_CANDIDATES``)."""
    min_chunk = MIN_CHUNK if min_chunk is None else min_chunk
    max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
    top = max(1, min(default, n))
    out = [top]
    chunks = -(-n // top)
    while len(out) < max_candidates:
        chunks *= 2
        size = -(-n // chunks)
        if size < min_chunk:
            break
        if size < out[-1]:
            out.append(size)
    return tuple(out)


def choose(
    sizes: Sequence[int], seconds: Callable[[int], float], n: int, patience: int = PATIENCE
) -> tuple[int, dict[int, float]]:
    r"""The size minimising :math:`\lceil n / c \rceil\, t(c)`, timing ``sizes`` in order.

    Args:
      sizes: candidates, largest first (see :func:`candidates`).
      seconds: ``t(c)``, seconds for one chunk of ``c`` examples.
      n: examples in the whole call.
      patience: stop after this many candidates in a row that were no faster than the best.

    Returns:
      ``(chosen, {c: t(c)})`` for every timed candidate.
    """
    timed: dict[int, float] = {}
    best, best_cost, misses = sizes[0], math.inf, 0
    for size in sizes:
        timed[size] = seconds(size)
        cost = -(-n // size) * timed[size]
        if cost < best_cost:
            best, best_cost, misses = size, cost, 0
        else:
            misses += 1
            if misses >= patience:
                break
    return best, timed


def chunk_size(
    default: int,
    n: int,
    program: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    static: dict[str, Any],
    examples: tuple[int, ...] = (1, 2, 3, 4),
) -> int:
    """The chunk size for a call: the byte-budget ``default``, or the measured best.

    Args:
      default: the byte-budget chunk size.
      n: examples in the call.
      program: the jitted chunked computation, called as
        ``program(*args, chunk_size=c, **static, **kwargs)``.
      args: its positional array arguments (``None`` allowed).
      kwargs: its keyword array arguments (e.g. ``model_state``).
      static: its static keyword arguments except ``chunk_size``.
      examples: which of ``args`` carry the example axis first (sliced to a chunk).

    Returns:
      A chunk size in ``[1, max(default, n)]``: ``default`` unless calibration is on for this
      call (see the module docstring).
    """
    setting = mode()
    if setting == "off" or static.get("mesh") is not None or _sharded(args[0]):
        return default
    sizes = candidates(default, n)
    if len(sizes) < 2:
        return default
    if setting == "auto":
        weights = sum(math.prod(np.shape(p)) for p in jax.tree.leaves(args[0]))
        if 2 * n * weights < AUTO_MIN_FLOPS / WEIGHT_REUSE:
            return default
    key = _process_key(n, default, setting, args, kwargs, static)
    if key not in _CHOSEN:
        with jax.ensure_compile_time_eval():
            _CHOSEN[key] = _calibrate(
                sizes, n, default, setting, program, args, kwargs, static, examples
            )
    return _CHOSEN[key]


def _sharded(params: Any) -> bool:
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding) and len(sharding.device_set) > 1:
            return True
    return False


def _aval(leaf: Any) -> tuple[Any, ...]:
    return (np.shape(leaf), str(getattr(leaf, "dtype", type(leaf).__name__)))


def _process_key(n, default, setting, args, kwargs, static) -> Hashable:
    leaves, tree = jax.tree.flatten((args, kwargs))
    return (
        n,
        default,
        setting,
        tree,
        tuple(_aval(a) for a in leaves),
        tuple(sorted(static.items())),
    )


def _stand_in(leaf: Any, index: int, rows: int | None) -> Any:
    """``leaf[:rows]`` if concrete, else a fixed value of that shape and ``leaf``'s dtype
    (``rows=None``: the whole leaf)."""
    if rows is not None and leaf is not None:
        shape = (min(rows, np.shape(leaf)[0]), *np.shape(leaf)[1:])
    else:
        shape = np.shape(leaf)
    if not isinstance(leaf, jax.core.Tracer):
        return leaf if rows is None or leaf is None else leaf[: shape[0]]
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(index), shape)
    if np.issubdtype(dtype, np.floating):
        values = np.random.default_rng(index).standard_normal(shape) * 0.1
        return jax.device_put(values.astype(dtype))
    if dtype == np.bool_:
        return jax.device_put(np.ones(shape, dtype))
    return jax.device_put(np.zeros(shape, dtype))


def _calibrate(sizes, n, default, setting, program, args, kwargs, static, examples) -> int:
    # Concrete values for the largest candidate chunk: the first examples, or stand-ins.
    rows = lambda i: sizes[0] if i in examples else None
    is_none = lambda a: a is None
    args = tuple(
        jax.tree.map(lambda a, i=i: _stand_in(a, i, rows(i)), arg, is_leaf=is_none)
        for i, arg in enumerate(args)
    )
    kwargs = jax.tree.map(lambda a: _stand_in(a, -1, None), kwargs, is_leaf=is_none)

    def lowered(size: int) -> Any:
        # Every candidate runs on the same sizes[0] examples, in ⌈sizes[0] / size⌉ chunks: the
        # chunks stream from memory as in the call (one chunk timed alone runs from a warm
        # cache and underestimates small chunks).
        return program.lower(*args, chunk_size=size, **static, **kwargs), list(args)

    top, top_chunk = lowered(sizes[0])
    cost = top.cost_analysis() or {}
    flops = float(cost.get("flops", 0.0)) * -(-n // sizes[0])
    if setting == "auto" and flops < AUTO_MIN_FLOPS:
        return default
    device = jax.devices()[0]
    fingerprint = hashlib.sha256(
        "\n".join(
            [top.as_text(), str(n), device.platform, device.device_kind, jax.__version__]
        ).encode()
    ).hexdigest()
    path = _cache_path()
    saved = _load(path).get(fingerprint, {}).get("chunk_size") if path else None
    if isinstance(saved, int) and 1 <= saved <= n:
        HISTORY.append(Calibration(n, default, saved, {}, "file", flops))
        return saved

    def seconds(size: int) -> float:
        compiled: list[Any] = []

        def run() -> Any:  # compiles at its first (untimed) call
            if not compiled:
                program_at, chunk = (top, top_chunk) if size == sizes[0] else lowered(size)
                compiled.append((program_at.compile(), chunk))
            executable, chunk = compiled[0]
            return jax.block_until_ready(executable(*chunk, **kwargs))

        return _time_chunk(size, run, chunks=-(-sizes[0] // size))

    chosen, timed = choose(sizes, seconds, n)
    HISTORY.append(Calibration(n, default, chosen, timed, "measured", flops))
    if path:
        _store(path, fingerprint, {"chunk_size": chosen, "n": n, "seconds": timed})
    return chosen


def _time_chunk(size: int, run: Callable[[], Any], chunks: int = 1) -> float:
    """Seconds per chunk of ``size`` examples: the fastest of ``REPEATS`` runs of ``run``, which
    sums ``chunks`` chunks, divided by ``chunks``."""
    del size  # what is timed; tests replace this function with a fake timer
    run()
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / chunks


def _cache_path() -> str | None:
    directory = jax.config.jax_compilation_cache_dir
    return os.path.join(directory, CACHE_FILE) if directory else None


def _load(path: str) -> dict[str, Any]:
    """The saved choices, or ``{}`` when the file is missing, unreadable or not ours."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path: str, fingerprint: str, record: dict[str, Any]) -> None:
    """Adds one choice to the file, written whole to a temporary file and renamed into place."""
    data = _load(path)
    data[fingerprint] = {**record, "seconds": {str(k): v for k, v in record["seconds"].items()}}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass
