"""Peak resident memory of ``ewc_jax.fisher_diagonal`` as the number of examples N grows.

Run::

    python -m benchmarks.memory                          # N = 10k, 50k, 100k; fast and general
    python -m benchmarks.memory --sizes 10000,50000 --paths fast --out MEMORY.json

Each (N, path) runs in a fresh subprocess on the tutorial's MLP (784-256-256-256-10) with random
inputs, library defaults (``chunk_size=None``: as many examples per chunk as fit in
``ewc_jax._fisher.MEMORY_BUDGET_BYTES``) unless ``--chunk-size`` is given, and the argmax
estimator. The child builds the inputs, then resets the kernel's peak-RSS mark (Linux
``/proc/self/clear_refs``) so that generating the data (two copies for a moment) is not counted,
then compiles and runs the Fisher. Reported:

* ``peak_rss_mib``: the process's peak RSS from the reset on, from ``/usr/bin/time -v`` when
  present, else from ``os.wait4``'s rusage of the child;
* ``rss_before_mib``: its RSS just before the call (interpreter, JAX, parameters and the inputs,
  which alone are N × 784 × 4 bytes);
* ``fisher_mib = peak − before``: the Fisher's own working memory, compilation included. This is
  the number that must not grow with N once N exceeds one chunk.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

PATHS = ("fast", "general")
_MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets this process's peak-RSS mark (``VmHWM``, ``ru_maxrss``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def child(n: int, path: str, chunk_size: int | None, seed: int = 0) -> dict[str, Any]:
    """Runs one Fisher computation and reports its memory; called in the subprocess.

    Args:
      n: number of examples.
      path: ``"fast"`` (``method="one_pass"``) or ``"general"`` (``method="general"``).
      chunk_size: passed to ``fisher_diagonal``; ``None`` for the library default.
      seed: seed for weights and inputs.

    Returns:
      Sizes and RSS readings in MiB, the wall time, and whether the peak mark was reset.
    """
    import jax
    import numpy as np

    import ewc_jax
    from benchmarks.workload import apply_fn as tutorial_apply_fn
    from benchmarks.workload import flax_params, tutorial_weights

    params = flax_params(tutorial_weights(seed))
    inputs_np = np.random.default_rng(seed).random((n, 784), dtype=np.float32)
    inputs = jax.block_until_ready(jax.device_put(inputs_np))
    data_bytes = inputs_np.nbytes
    del inputs_np
    gc.collect()

    apply_fn = tutorial_apply_fn()

    def fisher(p: Any, x: jax.Array) -> Any:
        return ewc_jax.fisher_diagonal(
            apply_fn,
            p,
            x,
            estimator="argmax",
            chunk_size=chunk_size,
            method="one_pass" if path == "fast" else "general",
        )

    rss_before_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    jax.block_until_ready(jax.jit(fisher)(params, inputs))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n": n,
        "path": path,
        "chunk_size": chunk_size,
        "data_mib": data_bytes / _MIB,
        "rss_before_mib": None if rss_before_kib is None else rss_before_kib / 1024,
        "child_peak_rss_mib": peak_kib / 1024,
        "peak_reset": reset,
        "seconds": seconds,
    }


def measure(n: int, path: str, chunk_size: int | None) -> dict[str, Any]:
    """Runs :func:`child` in a fresh Python process and adds its peak RSS seen from outside.

    Args:
      n: number of examples.
      path: ``"fast"`` or ``"general"``.
      chunk_size: ``None`` for the library default.

    Returns:
      The child's report plus ``peak_rss_mib``, ``peak_source`` and ``fisher_mib``.

    Raises:
      RuntimeError: the child failed.
    """
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--sizes", str(n), "--paths", path]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        cmd = [gnu_time, "-v", *cmd]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=root)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {n=} {path=} failed:\n{stderr[-4000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        report["peak_rss_mib"], report["peak_source"] = int(match.group(1)) / 1024, "time -v"
    else:
        report["peak_rss_mib"], report["peak_source"] = usage.ru_maxrss / 1024, "wait4 rusage"
    before = report["rss_before_mib"]
    report["fisher_mib"] = None if before is None else report["peak_rss_mib"] - before
    return report


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`measure` as a text table, with growth against the smallest N per path."""
    lines = [
        f"{'path':<8} {'N':>7} {'chunk':>8} {'inputs':>9} {'RSS before':>11} {'peak RSS':>10}"
        f" {'Fisher':>9} {'vs min N':>9} {'time':>8}"
    ]
    smallest: dict[str, float] = {}
    for r in rows:
        fisher = r["fisher_mib"]
        smallest.setdefault(r["path"], fisher)
        growth = (
            "-" if not fisher or not smallest[r["path"]] else f"{fisher / smallest[r['path']]:.2f}x"
        )
        lines.append(
            f"{r['path']:<8} {r['n']:>7} {r['chunk_size'] or 'default':>8}"
            f" {r['data_mib']:>5.0f} MiB {r['rss_before_mib']:>7.0f} MiB"
            f" {r['peak_rss_mib']:>6.0f} MiB {fisher:>5.0f} MiB {growth:>9} {r['seconds']:>7.1f}s"
        )
    lines.append(
        "inputs: N x 784 float32; Fisher = peak RSS − RSS before (the call's own memory, compile "
        f"included); peak from {rows[0]['peak_source'] if rows else '-'}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measures every (path, N) of the command line, prints the table, returns the rows."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--sizes", default="10000,50000,100000", help="comma-separated N")
    parser.add_argument("--paths", default=",".join(PATHS), help="fast,general")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            parser.error(f"unknown path {p!r}; choose from {PATHS}")
    if args.child:
        print(json.dumps(child(sizes[0], paths[0], args.chunk_size)))
        return []
    rows = []
    for path in paths:
        for n in sizes:
            print(f"measuring {path} N={n} ...", flush=True)
            rows.append(measure(n, path, args.chunk_size))
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
