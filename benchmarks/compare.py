"""Side-by-side speed of ewc_jax and the strongest PyTorch tools, on identical weights and data.

Run (CPU or GPU, unchanged; PyTorch uses CUDA when it sees it, JAX its default device)::

    python -m benchmarks.compare --out BENCHMARKS.json
    python -m benchmarks.compare --quick               # tiny sizes, seconds: the smoke test

The one command that runs everything: the diagonal Fisher per estimator (:mod:`benchmarks.fisher`)
and one EWC training epoch (:mod:`benchmarks.epoch`) on the tutorial's MLP
(:mod:`benchmarks.workload`). Each result is checked against ewc_jax's before anything is timed;
then the methods of one table row group are timed round-robin (:mod:`benchmarks.harness`) and
each speed ratio is printed. The targets those ratios are held to live in BENCHMARKS.md.

PyTorch is timed with ``OMP_WAIT_POLICY=PASSIVE`` (set here before torch is imported, unless the
environment sets it): with OpenMP's default spinning wait, PyTorch's threads burn the cores other
processes need, and on a loaded machine an eager step was 30x slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

import ewc_jax
from benchmarks import epoch, fisher, harness, roofline, workload
from benchmarks.harness import ESTIMATORS, CheckFailed, Config

SCHEMA_VERSION = 3


def _configure_environment() -> None:
    """Environment the timings depend on; read by OpenMP and XLA when they start."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # On a GPU both frameworks share the device: keep JAX from reserving 75% of its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def run(config: Config, command: str = "python -m benchmarks.compare") -> dict[str, Any]:
    """Runs every check and timing of ``config`` and returns the report (also written to ``out``).

    Args:
      config: harness settings.
      command: the command line, recorded in the report.

    Returns:
      The JSON-serialisable report: ``schema_version``, ``command``, ``config``, ``machine``,
      ``versions``, ``fisher`` and ``epoch`` (entries), ``checks`` and ``ratios``.

    Raises:
      CheckFailed: a result disagrees with its reference (nothing more has been timed).
    """
    if config.quick:
        config = dataclasses.replace(config, **harness.QUICK_OVERRIDES)
    if config.use_torch and config.torch_threads and harness.installed("torch"):
        import torch

        torch.set_num_threads(config.torch_threads)
    weights = workload.tutorial_weights(config.seed)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "config": dataclasses.asdict(config),
        "machine": harness.machine_info(config.matmul_precision),
        "versions": harness.library_versions(),
        "fisher": [],
        "epoch": [],
        "checks": [],
        "ratios": [],
    }
    flags = roofline.cpu_flags()
    report["machine"].update(cpu_flags=flags, cpu_flags_summary=roofline.flags_summary(flags))
    print("float32 matmul peak ...", flush=True)
    shapes = roofline.QUICK_PEAK_SHAPES if config.quick else roofline.PEAK_SHAPES
    peak = roofline.matmul_peak(shapes, config.peak_repeats)
    report["roofline"] = {"peak_gflops": peak["peak_gflops"], "matmuls": peak["shapes"]}
    checks = harness.Checks()
    with jax.default_matmul_precision(config.matmul_precision):
        for n in config.sizes:
            for estimator in config.estimators:
                entries = fisher.run_fisher(config, weights, n, estimator, checks)
                report["fisher"] += [dataclasses.asdict(e) for e in entries]
                report["ratios"] += fisher.ratios(entries)
        if config.epoch_examples >= config.batch_size:
            entries = epoch.run_epoch(config, weights, checks)
            report["epoch"] = [dataclasses.asdict(e) for e in entries]
            report["ratios"] += epoch.ratios(entries)
    report["checks"] = checks.results
    _fill_roofline(report, config)
    return harness.finish_report(report, config.out)


def _fill_roofline(report: dict[str, Any], config: Config) -> None:
    """Each Fisher entry's GFLOP/s and fraction of peak; the families; the stage profile."""
    roof = report["roofline"]
    peak = roof["peak_gflops"]
    for entry in report["fisher"]:
        if entry["status"] == "ok" and entry["flops"] and entry["median_s"]:
            entry["gflops"] = entry["flops"] / entry["median_s"] / 1e9
            entry["peak_fraction"] = entry["gflops"] / peak
    n = config.sizes[-1]
    roof["flops_note"] = (
        "each row group is credited with the one-pass Fisher's matrix-multiply FLOPs "
        "(benchmarks.roofline.mlp_fisher_flops)"
    )
    for estimator in config.estimators:
        counted = roofline.program_flops(
            lambda p, x, e=estimator: ewc_jax.fisher_diagonal(
                workload.apply_fn(),
                p,
                x,
                _labels(e, n),
                estimator=e,
                key=jax.random.key(0),
                chunk_size=n,
            ),
            workload.flax_params(workload.tutorial_weights(config.seed)),
            jax.ShapeDtypeStruct((n, workload.LAYER_SIZES[0]), "float32"),
        )
        roof.setdefault("ewc_jax_program_flops", {})[estimator] = counted
    if config.families:
        print("families ...", flush=True)
        sizes = {f: (8, 64) for f in roofline.FAMILY_SIZES} if config.quick else None
        roof["families"] = roofline.family_rows(peak, sizes, min(config.repeats, 3))
    if config.profile:
        print("stage profile ...", flush=True)
        roof["profile"] = roofline.stage_profile(n, config.repeats, config.seed)


def _labels(estimator: str, n: int) -> jax.Array | None:
    return jax.numpy.zeros(n, "int32") if estimator in ("empirical", "batched") else None


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command-line options, one per :class:`benchmarks.harness.Config` field."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.split("\n")[0]
    )
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)
    names = lambda s: tuple(v for v in s.split(",") if v)
    parser.add_argument("--sizes", type=ints, default=defaults.sizes, help="e.g. 512,10000")
    parser.add_argument(
        "--estimators", type=names, default=defaults.estimators, help=",".join(ESTIMATORS)
    )
    parser.add_argument(
        "--epoch-examples", type=int, default=defaults.epoch_examples, help="0: no epoch"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--importance", type=float, default=defaults.importance)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--slow-repeats", type=int, default=defaults.slow_repeats)
    parser.add_argument("--slow-threshold", type=float, default=defaults.slow_threshold)
    parser.add_argument("--very-slow-threshold", type=float, default=defaults.very_slow_threshold)
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument(
        "--torch-chunk-size", type=int, default=defaults.torch_chunk_size, help="0: all N"
    )
    parser.add_argument("--rtol", type=float, default=defaults.rtol)
    parser.add_argument("--mc-rtol", type=float, default=defaults.mc_rtol)
    parser.add_argument("--mc-check-draws", type=int, default=defaults.mc_check_draws)
    parser.add_argument("--data", choices=("mnist", "random"), default=defaults.data)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--matmul-precision",
        choices=("default", "high", "highest"),
        default=defaults.matmul_precision,
    )
    parser.add_argument("--no-torch", dest="use_torch", action="store_false")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: PyTorch's")
    parser.add_argument(
        "--skip", type=names, default=defaults.skip, help="entries not to run, comma-separated"
    )
    parser.add_argument(
        "--no-torch-chunk-search",
        dest="tune_torch_chunk",
        action="store_false",
        help="torch_hooks at --torch-chunk-size instead of its fastest chunk",
    )
    parser.add_argument("--peak-repeats", type=int, default=defaults.peak_repeats)
    parser.add_argument("--no-families", dest="families", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    options = vars(parser.parse_args(argv))
    options["torch_chunk_size"] = options["torch_chunk_size"] or None
    config = Config(**options)
    unknown = set(config.estimators) - set(ESTIMATORS)
    if unknown:
        parser.error(f"unknown estimators {sorted(unknown)}; choose from {ESTIMATORS}")
    entries = {name for estimator in ESTIMATORS for name in fisher.methods(estimator)}
    unknown = set(config.skip) - entries
    if unknown:
        parser.error(f"unknown entries to skip {sorted(unknown)}; choose from {sorted(entries)}")
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the comparison, prints the table.

    Returns:
      The report of :func:`run`.
    """
    _configure_environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.compare", *argv])
    try:
        report = run(parse_args(argv), command)
    except CheckFailed as error:
        raise SystemExit(f"agreement check failed, nothing more was timed: {error}") from error
    print()
    print(harness.format_table(report))
    return report


if __name__ == "__main__":
    main()
