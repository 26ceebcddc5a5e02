"""What every benchmark shares: agreement checks, round-robin timing, ratios, machine and table.

Nothing here knows what is measured. A benchmark builds one :data:`Runner` per method (a call that
blocks until its work is done, already warmed up), checks the results agree with :class:`Checks`,
then hands the runners to :func:`time_round_robin`. :func:`speedups` turns the medians into
ratios; the targets those ratios are held to live in BENCHMARKS.md, not here.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks.torch_tutorial import LayerArrays

ESTIMATORS = ("argmax", "empirical", "exact", "sampled")
"""The Fisher estimators the harness compares, in the order it runs them."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Harness settings; every field is a command-line option of the same name.

    Attributes:
      sizes: numbers of examples N for the Fisher comparison.
      estimators: which Fisher estimators to compare (see :data:`ESTIMATORS`).
      epoch_examples: examples in the training epoch (a trailing partial batch is dropped); 0
        skips the epoch.
      batch_size: examples per SGD step.
      learning_rate: SGD learning rate.
      importance: the tutorial's EWC factor; ewc_jax's ``strength`` is ``2 * importance``.
      repeats: timed calls per entry.
      slow_repeats: timed calls for entries whose warm-up call exceeds ``slow_threshold``.
      slow_threshold: seconds.
      very_slow_threshold: seconds; an entry whose warm-up call exceeds it is timed once (the
        general path's exact Fisher, ~100 s on a loaded 2-core machine).
      chunk_size: examples per vectorised chunk for ``torch_func_vmap`` and ``jax_general``.
      torch_chunk_size: examples per pass of the one-pass PyTorch tools (hooks, BackPACK,
        nngeometry); ``None``: all N at once. 1024 was as fast as all N or faster for each of
        them at N = 10,000 (BackPACK's exact Fisher 1.4x faster).
      rtol: tolerance of the deterministic agreement checks (``max|a − b| / max|b|``).
      mc_rtol: tolerance of the Monte-Carlo checks (``‖a − b‖₂ / ‖b‖₂`` against the exact Fisher).
      mc_check_draws: label draws the Monte-Carlo checks use at least (inputs are tiled).
      data: ``"mnist"`` (the embedded 5,000 digits, tiled and perturbed) or ``"random"``.
      seed: seed for weights, data and label draws.
      matmul_precision: JAX's default float32 matmul precision; ``"highest"`` matches PyTorch's
        full-float32 default on GPUs (no TF32); it changes nothing on CPU.
      use_torch: run the PyTorch entries (they are skipped, with a reason, without torch).
      torch_threads: ``torch.set_num_threads`` for the PyTorch entries; ``None`` keeps PyTorch's
        default (one per core).
      skip: entries not to run (e.g. ``torch_tutorial_loop``, ``jax_general``: the slow ones);
        they are listed as skipped. ``jax_default`` always runs.
      tune_torch_chunk: time ``torch_hooks`` at each candidate chunk size first and keep its
        fastest (``False``: ``torch_chunk_size``).
      peak_repeats: timed calls per matmul shape of the peak measurement.
      families: also measure the sampled Fisher's fraction of peak on the small CNN and the
        language model's transformer.
      profile: also split the argmax Fisher's time into stages (forward, backward, contractions).
      quick: tiny sizes for the smoke test (overrides sizes, epoch_examples, chunk sizes, repeats,
        the peak's matmul shapes and the families' and profile's sizes).
      out: path of the JSON report, or ``None``.
    """

    sizes: tuple[int, ...] = (10_000,)
    estimators: tuple[str, ...] = ESTIMATORS
    epoch_examples: int = 60_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    importance: float = 1000.0
    repeats: int = 5
    slow_repeats: int = 3
    slow_threshold: float = 4.0
    very_slow_threshold: float = 30.0
    chunk_size: int = 512
    torch_chunk_size: int | None = 1024
    rtol: float = 1e-4
    mc_rtol: float = 0.15
    mc_check_draws: int = 10_000
    data: str = "mnist"
    seed: int = 0
    matmul_precision: str = "highest"
    use_torch: bool = True
    torch_threads: int | None = None
    skip: tuple[str, ...] = ()
    tune_torch_chunk: bool = True
    peak_repeats: int = 5
    families: bool = True
    profile: bool = True
    quick: bool = False
    out: str | None = None


QUICK_OVERRIDES: dict[str, Any] = {
    "sizes": (24,),
    "epoch_examples": 64,
    "chunk_size": 16,
    "torch_chunk_size": 16,
    "mc_check_draws": 4096,
    "repeats": 1,
    "slow_repeats": 1,
}
"""``--quick``: one tiny size whose last chunk is partial, a two-step epoch, one timed call."""


class CheckFailed(RuntimeError):
    """A result disagrees with its reference; nothing is timed."""


def max_relative_error(actual: Sequence[LayerArrays], reference: Sequence[LayerArrays]) -> float:
    """``max over parameters of max|a − b| / max|b|`` (each kernel and bias separately).

    Raises:
      CheckFailed: the two disagree in structure or shape.
    """
    errors = []
    for layer_a, layer_b in zip(actual, reference, strict=True):
        for a, b in zip(layer_a, layer_b, strict=True):
            if a.shape != b.shape:
                raise CheckFailed(f"shape mismatch {a.shape} vs {b.shape}")
            scale = float(np.max(np.abs(b)))
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            errors.append(diff / scale if scale > 0 else diff)
    return max(errors)


def relative_l2_error(actual: Sequence[LayerArrays], reference: Sequence[LayerArrays]) -> float:
    """``max over parameters of ‖a − b‖₂ / ‖b‖₂``: the check for Monte-Carlo estimates.

    A sampled Fisher is noisy entry by entry, so a max-norm test would test the noise of the
    smallest entries; the 2-norm of each parameter's error shrinks as 1/√(draws).

    Raises:
      CheckFailed: the two disagree in structure or shape.
    """
    errors = []
    for layer_a, layer_b in zip(actual, reference, strict=True):
        for a, b in zip(layer_a, layer_b, strict=True):
            if a.shape != b.shape:
                raise CheckFailed(f"shape mismatch {a.shape} vs {b.shape}")
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            scale = float(np.linalg.norm(b64))
            diff = float(np.linalg.norm(a64 - b64))
            errors.append(diff / scale if scale > 0 else diff)
    return max(errors)


METRICS: dict[str, Callable[[Sequence[LayerArrays], Sequence[LayerArrays]], float]] = {
    "max_rel_err": max_relative_error,
    "rel_l2_err": relative_l2_error,
}


class Checks:
    """Agreement checks run before any timing; the first failure stops the harness.

    Attributes:
      results: one dict per check: name, n, metric, error, tolerance, passed.
    """

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def __call__(
        self,
        name: str,
        n: int,
        actual: Sequence[LayerArrays],
        reference: Sequence[LayerArrays],
        tolerance: float,
        metric: str = "max_rel_err",
    ) -> None:
        """Records ``METRICS[metric](actual, reference)``; raises if it is not below tolerance.

        Raises:
          CheckFailed: the error is at least ``tolerance``.
        """
        error = METRICS[metric](actual, reference)
        passed = error < tolerance
        self.results.append(
            {
                "name": name,
                "n": n,
                "metric": metric,
                "error": error,
                "tolerance": tolerance,
                "passed": passed,
            }
        )
        print(f"  check {name:<56} N={n:<6} {metric} {error:.1e} {'ok' if passed else 'FAIL'}")
        if not passed:
            raise CheckFailed(f"{name} at N={n}: {metric} {error:.3e} >= {tolerance}")


@dataclasses.dataclass
class Entry:
    """One timed method at one size.

    Attributes:
      name: method name, e.g. ``"jax_default"`` or ``"backpack_diag_ggn_exact"``.
      group: what it computes: an estimator (``"argmax"``, ...) or ``"epoch"``.
      framework: ``"torch"`` or ``"jax"``.
      n: examples (Fisher: N; epoch: examples in the epoch).
      status: ``"ok"`` or ``"skipped"``.
      reason: why an entry was skipped, else ``None``.
      median_s: median of ``samples_s``.
      samples_s: every timed call, seconds.
      compile_s: ahead-of-time compilation (JAX lower + compile; ``torch.compile``'s first call),
        ``None`` for eager code.
      warmup_s: the untimed first call (after compilation).
      repeats: number of timed calls.
      note: how the entry was run, when that needs saying.
      flops: the work credited to the entry (the same for every entry of a row group; see
        :mod:`benchmarks.roofline`).
      gflops: ``flops / median_s / 1e9``.
      peak_fraction: ``gflops`` over the measured float32 matmul peak.
    """

    name: str
    group: str
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
    flops: float | None = None
    gflops: float | None = None
    peak_fraction: float | None = None


Runner = tuple[Entry, Callable[[], Any]]
"""An entry to time (``warmup_s`` already set) and the blocking call to time."""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compile_ahead(fn: Callable[..., Any], *args: Any) -> tuple[float, Callable[..., Any]]:
    """``jax.jit(fn).lower(*args).compile()``, and how long that took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start, compiled


def blocking(compiled: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A call of ``compiled(*args)`` that returns only once the result is computed."""
    return lambda: jax.block_until_ready(compiled(*args))


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (torch, backpack and nngeometry are optional)."""
    return importlib.util.find_spec(module) is not None


def time_round_robin(runners: Sequence[Runner], config: Config) -> None:
    """Times every runner round-robin and fills in its entry's samples and median.

    Each round calls every method once, so load from other processes, which comes and goes on a
    shared machine, falls on all methods alike instead of on whichever ran at a bad moment.
    A method whose warm-up call exceeded ``config.slow_threshold`` seconds drops out after
    ``config.slow_repeats`` calls, one that exceeded ``config.very_slow_threshold`` after one.

    Args:
      runners: entries with ``warmup_s`` set, and their blocking calls.
      config: the repeat counts and thresholds.
    """
    for entry, _ in runners:
        warmup_s = entry.warmup_s or 0.0
        entry.repeats = config.repeats
        if warmup_s > config.slow_threshold:
            entry.repeats = config.slow_repeats
        if warmup_s > config.very_slow_threshold:
            entry.repeats = 1
    names = ", ".join(entry.name for entry, _ in runners)
    print(f"  timing {names} round-robin ...", flush=True)
    for round_ in range(max((entry.repeats for entry, _ in runners), default=0)):
        for entry, call in runners:
            if round_ < entry.repeats:
                entry.samples_s.append(timed(call)[0])
    for entry, _ in runners:
        entry.median_s = statistics.median(entry.samples_s)


def speedups(entries: Sequence[Entry], reference: str) -> list[dict[str, Any]]:
    """How many times faster ``reference`` is than every other framework's entry, and the fastest.

    Args:
      entries: the entries of one group at one size.
      reference: the name of the entry the ratios are about (e.g. ``"jax_default"``).

    Returns:
      One dict per other-framework entry, ``value = median(other) / median(reference)`` (``None``
      where either was skipped), then one for the fastest of them (``denominator`` names it).
    """
    by_name = {e.name: e for e in entries}
    ref = by_name[reference]
    others = [e for e in entries if e.framework != ref.framework]

    def ratio(name: str, other: Entry | None, label: str) -> dict[str, Any]:
        value = None
        if other is not None and other.median_s and ref.median_s:
            value = other.median_s / ref.median_s
        return {
            "name": name,
            "group": ref.group,
            "n": ref.n,
            "reference": reference,
            "other": label,
            "value": value,
        }

    out = [ratio(f"{ref.group}: {reference} vs {e.name}", e, e.name) for e in others]
    timed_others = [e for e in others if e.status == "ok" and e.median_s]
    if len(others) > 1:
        fastest = min(timed_others, key=lambda e: e.median_s or 0.0, default=None)
        label = f"fastest {others[0].framework} ({fastest.name if fastest else '-'})"
        out.append(ratio(f"{ref.group}: {reference} vs {label}", fastest, label))
    return out


def within_framework(entries: Sequence[Entry], faster: str, slower: str) -> dict[str, Any]:
    """``median(slower) / median(faster)`` for two entries of one group, e.g. scan vs step loop."""
    by_name = {e.name: e for e in entries}
    a, b = by_name[faster], by_name[slower]
    value = b.median_s / a.median_s if a.median_s and b.median_s else None
    return {
        "name": f"{a.group}: {faster} vs {slower}",
        "group": a.group,
        "n": a.n,
        "reference": faster,
        "other": slower,
        "value": value,
    }


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or ``None`` where the OS has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(matmul_precision: str) -> dict[str, Any]:
    """Devices, CPU model, core count, load and threading settings for the JSON report."""
    info: dict[str, Any] = {
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        "jax_matmul_precision": matmul_precision,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_device": None,
        "loadavg_start": load_average(),
    }
    if installed("torch"):
        import torch

        from benchmarks import torch_tutorial

        device = torch_tutorial.default_device()
        info["torch_device"] = device
        info["torch_num_threads"] = torch.get_num_threads()
        if device == "cuda":
            info["torch_cuda_device_name"] = torch.cuda.get_device_name()
    return info


def library_versions() -> dict[str, str | None]:
    """Installed versions of everything the comparison depends on (``None``: not installed)."""
    names = (
        "ewc-jax",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "numpy",
        "torch",
        "backpack-for-pytorch",
        "nngeometry",
        "mlxtend",
    )
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "-" if load is None else "/".join(f"{v:.1f}" for v in load)


def _fmt_ratio(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary: the roofline, medians per entry with GFLOP/s and fraction of
    the matmul peak, every speed ratio, then the other families and the stage profile."""
    machine = report["machine"]
    roof = report.get("roofline") or {}
    lines = [
        f"device: jax {machine['jax_devices']}, torch {machine['torch_device']}"
        f" ({machine.get('torch_num_threads', '-')} threads,"
        f" OMP_WAIT_POLICY={machine['omp_wait_policy']}),"
        f" CPU {machine['cpu_model']} ({machine['cpus_usable']} usable cores),"
        f" flags {machine.get('cpu_flags_summary', '-')},"
        f" load average {_fmt_load(machine.get('loadavg_start'))} at start,"
        f" {_fmt_load(machine.get('loadavg_end'))} at end",
    ]
    if roof:
        shapes = ", ".join(f"{r['shape']} {r['gflops']:.0f}" for r in roof["matmuls"])
        lines.append(
            f"float32 matmul peak under jax.jit: {roof['peak_gflops']:.0f} GFLOP/s"
            f" (best of: {shapes} GFLOP/s)"
        )
        work = {e["group"]: e["flops"] for e in report["fisher"] if e.get("flops")}
        counted = roof.get("ewc_jax_program_flops", {})
        lines.append(
            "GFLOP credited to every entry of a group (one-pass matmuls; ewc_jax's program by"
            " XLA/jaxpr in brackets): "
            + ", ".join(
                f"{g} {f / 1e9:.2f}"
                + (f" ({counted[g]['flops'] / 1e9:.2f})" if g in counted else "")
                for g, f in work.items()
            )
        )
    lines += [
        "",
        f"{'group':<10} {'method':<26} {'N':>7} {'median':>10} {'GFLOP/s':>8} {'peak':>5}"
        f" {'compile':>10} {'reps':>5}  note",
    ]
    for e in report["fisher"] + report["epoch"]:
        head = f"{e['group']:<10} {e['name']:<26} {e['n']:>7}"
        if e["status"] != "ok":
            lines.append(f"{head} {'skipped':>10}  {e['reason']}")
            continue
        lines.append(
            f"{head} {_fmt_s(e['median_s']):>10} {_fmt_ratio(e.get('gflops'), '.0f'):>8}"
            f" {_fmt_ratio(e.get('peak_fraction'), '.0%'):>5}"
            f" {_fmt_s(e['compile_s']):>10} {e['repeats']:>5}  {e['note'] or ''}"
        )
    lines += ["", f"{'speed-up (other / reference)':<72} {'N':>7} {'value':>9}"]
    for r in report["ratios"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}x"
        lines.append(f"{r['name']:<72} {r['n']:>7} {value:>9}")
    if roof.get("families"):
        lines += [
            "",
            f"{'family (ewc_jax defaults)':<26} {'N':>7} {'median':>10} {'GFLOP/s':>8}"
            f" {'peak':>5}  FLOPs counted by",
        ]
        for r in roof["families"]:
            name = f"{r['family']} w={r['width']} {r['estimator']}"
            lines.append(
                f"{name:<26} {r['n']:>7} {_fmt_s(r['median_s']):>10} {r['gflops']:>8.1f}"
                f" {r['peak_fraction']:>5.0%}  {r['flops_source']}"
            )
    if roof.get("profile"):
        lines += ["", f"{'argmax stage (plain JAX)':<26} {'ms':>8} {'GFLOP':>7} {'GFLOP/s':>8}"]
        for r in roof["profile"]:
            lines.append(
                f"{r['stage']:<26} {r['ms']:>8.1f} {r['gflop']:>7.2f}"
                f" {_fmt_ratio(r['gflops'], '.0f'):>8}"
            )
    return "\n".join(lines)


def finish_report(report: dict[str, Any], out: str | None) -> dict[str, Any]:
    """``report`` with the load average at its end, written as JSON to ``out`` (when given)."""
    report["machine"]["loadavg_end"] = load_average()
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report
