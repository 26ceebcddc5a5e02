"""The workdir of an experiment: who may use it, what may be written to it, when, and how.

A run holds an exclusive lock on its workdir for its whole duration (:func:`locked`): a second
run on the same workdir is refused at once with the holder's PID. :func:`prepare` runs before
any data is loaded: it refuses finished results (unless ``overwrite``) and checkpoints of another
config, then writes ``config.json``. :func:`finish` writes the result files, ``results.json``
last and atomically, so its presence means the run finished, then deletes the checkpoints.
Single runs and sweeps go through the same calls.

``--overwrite`` never deletes finished results before their replacement exists: a run that
replaces finished results trains in the staging directory ``<workdir>/.overwrite/`` (its
``config.json``, checkpoints, figures and CSVs), and only when it has written its own
``results.json`` there are the old result files replaced by the new ones (:func:`promote`). If
it fails or is interrupted, the old ``results.json`` still sits beside its own ``config.json``,
figures and ``metrics.csv``; rerunning without ``--overwrite`` resumes the staged run, rerunning
with it starts it afresh. A promotion cut short (by SIGKILL, say) is completed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from experiments.storage import checkpoint

LOCK = ".lock"
STAGING = ".overwrite"
MANIFEST = ".promoting"
"""In the staging directory: the names of the new result files, written when promotion starts."""
RESULTS = "results.json"
RESULT_FILES = (
    "config.json",
    "metrics.csv",
    "sweep_summary.csv",
    "sweep_runs.csv",
    "accuracy_curves.png",
    "accuracy_matrix.png",
    "method_comparison.png",
    "strength_sensitivity.png",
    "forgetting_forecast.png",
)
"""The files a finished run leaves beside ``results.json`` (all replaced by an overwrite)."""


class WorkdirExistsError(FileExistsError):
    """The workdir already holds finished results and ``overwrite`` was not given."""


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


class WorkdirUnusableError(RuntimeError):
    """The workdir cannot be created or written: a file, read-only, or on a full disk."""


def unusable_message(path: str | os.PathLike[str], error: OSError) -> str:
    """One line on why ``path`` (in the workdir) cannot be written, and what to do."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return (
            f"cannot write {path}: no space left on device; free some space (or choose a "
            "--workdir on another disk) and rerun the same command"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path} ({reason}); choose a writable --workdir"
    return f"cannot use {path} as --workdir ({reason}); choose another --workdir"


@contextlib.contextmanager
def locked(workdir: str | os.PathLike[str]) -> Iterator[Path]:
    """Creates ``workdir`` and holds an exclusive lock on it until the block ends.

    The lock is ``fcntl.flock`` on ``<workdir>/.lock``, which holds the PID of its holder; the
    operating system releases it when the process ends, however it ends, so a killed run never
    leaves a stale lock.

    Yields:
        The workdir.

    Raises:
        WorkdirBusyError: another process holds the lock.
        WorkdirUnusableError: the workdir is a file, or cannot be created or written.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirUnusableError(
            f"--workdir {workdir} is a file, not a directory; choose another --workdir"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / LOCK, "a+")  # noqa: SIM115 (held open for the whole block)
    except OSError as error:
        raise WorkdirUnusableError(unusable_message(workdir, error)) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WorkdirBusyError(
                f"{workdir} is in use by another run (PID {holder}); wait for it to finish, "
                "stop it, or choose another --workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield workdir


def prepare(
    resolved: dict[str, Any], workdir: str | os.PathLike[str], *, overwrite: bool
) -> tuple[str, Path]:
    """Checks ``workdir`` for this config (``resolved``: its JSON as a dict) and writes
    ``config.json``.

    Resume is the default: a workdir whose ``config.json`` is this resolved config keeps its
    checkpoints; one with checkpoints of another config is refused unless ``overwrite``, which
    deletes them. Finished results are refused unless ``overwrite``; then the new run goes to
    the staging directory and the old results stay until it finishes (module docstring). Call
    it with the workdir :func:`locked`.

    Returns:
        ``(fingerprint, run_dir)``: the config's fingerprint and the directory the run writes
        its ``config.json``, checkpoints and results to (``workdir`` or its staging directory).

    Raises:
        WorkdirExistsError: finished results, or another config's checkpoints, without
            ``overwrite``.
        checkpoint.CheckpointError: a checkpoint marker that is corrupt or of another config.
    """
    workdir = Path(workdir)
    staging = workdir / STAGING
    if (staging / RESULTS).exists():  # a promotion that was cut short
        promote(workdir)
    fingerprint = checkpoint.fingerprint(resolved)
    finished = (workdir / RESULTS).exists()
    if not finished or overwrite:
        shutil.rmtree(staging, ignore_errors=True)
    run_dir = staging if finished else workdir
    if overwrite:
        checkpoint.remove_all(run_dir)
    elif finished and not checkpoint.has_checkpoints(staging):
        raise WorkdirExistsError(
            f"{workdir / RESULTS} already holds finished results; pass --overwrite to replace "
            "them or choose another --workdir"
        )
    else:
        _check_same_run(run_dir / "config.json", resolved)
        checkpoint.verify_workdir(run_dir, fingerprint)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")
    except OSError as error:
        raise WorkdirUnusableError(unusable_message(run_dir / "config.json", error)) from None
    return fingerprint, run_dir


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


def finish(run_dir: str | os.PathLike[str], files: dict[str, str], results: dict[str, Any]) -> Path:
    """Writes ``files`` (name -> text), then ``results.json``, then deletes the checkpoints.

    In the staging directory of an overwrite, the new results then replace the old ones
    (:func:`promote`).

    Returns:
        The path of the final ``results.json``.
    """
    run_dir = Path(run_dir)
    try:
        for name, text in files.items():
            checkpoint.write_atomic(run_dir / name, text)
        checkpoint.write_atomic(run_dir / RESULTS, json.dumps(results, indent=2) + "\n")
    except OSError as error:
        raise WorkdirUnusableError(unusable_message(run_dir, error)) from None
    checkpoint.remove_all(run_dir)
    if run_dir.name == STAGING:
        return promote(run_dir.parent)
    return run_dir / RESULTS


def promote(workdir: str | os.PathLike[str]) -> Path:
    """Replaces the finished results in ``workdir`` with the staged ones of an overwrite.

    The names of the new files are written to the staging directory first; then the old
    ``results.json`` goes, the old files the new run does not replace go, the new files are
    renamed into place and the new ``results.json`` comes last, so at every moment either no
    ``results.json`` exists or it sits beside its own files. A promotion cut short is completed
    by running this again (as :func:`prepare` does).

    Returns:
        The path of the new ``results.json``.
    """
    workdir = Path(workdir)
    staging = workdir / STAGING
    manifest = staging / MANIFEST
    if manifest.exists():  # a promotion cut short: some new files may already be in place
        names = json.loads(manifest.read_text())
    else:
        names = sorted(
            p.name for p in staging.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        checkpoint.write_atomic(manifest, json.dumps(names))
    (workdir / RESULTS).unlink(missing_ok=True)
    for name in RESULT_FILES:
        if name not in names:
            (workdir / name).unlink(missing_ok=True)
    for name in names:
        if name != RESULTS and (staging / name).exists():
            os.replace(staging / name, workdir / name)
    os.replace(staging / RESULTS, workdir / RESULTS)
    shutil.rmtree(staging)
    return workdir / RESULTS
