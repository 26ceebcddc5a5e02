"""The workdir of an experiment: what may be written to it, when, and when it is refused.

:func:`prepare` runs before any data is loaded: it refuses finished results (unless
``overwrite``) and checkpoints of another config, then writes ``config.json``. :func:`finish`
writes the result files, ``results.json`` last and atomically, so its presence means the run
finished, then deletes the checkpoints. Single runs and sweeps go through the same two calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from experiments import checkpoint


class WorkdirExistsError(FileExistsError):
    """The workdir already holds finished results and ``overwrite`` was not given."""


def prepare(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *, overwrite: bool
) -> str:
    """Checks ``workdir`` for this config and writes ``config.json``; returns the fingerprint.

    Resume is the default: a workdir whose ``config.json`` is this resolved config keeps its
    checkpoints; one with checkpoints of another config is refused unless ``overwrite``, which
    deletes them (and any finished results).

    Raises:
        WorkdirExistsError: finished results, or another config's checkpoints, without
            ``overwrite``.
        checkpoint.CheckpointError: a checkpoint marker that is corrupt or of another config.
    """
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.exists() and not overwrite:
        raise WorkdirExistsError(
            f"{results_path} already holds finished results; pass --overwrite to replace them "
            "or choose another --workdir"
        )
    resolved = json.loads(config.to_json_best_effort())
    fingerprint = checkpoint.fingerprint(resolved)
    if overwrite:
        checkpoint.remove_all(workdir)
    else:
        _check_same_run(workdir / "config.json", resolved)
        checkpoint.verify_workdir(workdir, fingerprint)
    workdir.mkdir(parents=True, exist_ok=True)
    results_path.unlink(missing_ok=True)
    checkpoint.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    return fingerprint


def _check_same_run(config_path: Path, resolved: dict[str, Any]) -> None:
    """Refuses a workdir with checkpoints whose ``config.json`` is another run's config.

    Without checkpoints there is no progress to lose (the run failed before its first one), so
    the workdir is reused.
    """
    if not config_path.exists() or not checkpoint.has_checkpoints(config_path.parent):
        return
    try:
        previous = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirExistsError(
            f"{config_path} cannot be read ({error}), so the workdir may hold another run; "
            "pass --overwrite to start afresh or choose another --workdir"
        ) from None
    old, new = checkpoint.run_identity(previous), checkpoint.run_identity(resolved)
    if old != new:
        fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields[:5])
        raise WorkdirExistsError(
            f"{config_path.parent} holds another run (config differs in {changes}); resuming "
            "needs the same config: choose another --workdir or pass --overwrite to discard it"
        )


def finish(workdir: str | os.PathLike[str], files: dict[str, str], results: dict[str, Any]) -> Path:
    """Writes ``files`` (name -> text), then ``results.json``, then deletes the checkpoints.

    Returns:
        The path of ``results.json``.
    """
    workdir = Path(workdir)
    for name, text in files.items():
        checkpoint.write_atomic(workdir / name, text)
    results_path = workdir / "results.json"
    checkpoint.write_atomic(results_path, json.dumps(results, indent=2) + "\n")
    checkpoint.remove_all(workdir)
    return results_path
