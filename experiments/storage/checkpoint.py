"""Checkpoints of a continual-learning run, so that a pre-empted run resumes where it stopped.

Resume is the default: :func:`experiments.runs.experiment.train_and_evaluate` (and the CLI)
continue from
the latest complete checkpoint in the workdir when the workdir's ``config.json`` is the same
resolved config (``checkpoint_every_steps`` may differ). A workdir with checkpoints of a
different config is refused, and ``--overwrite`` deletes them and starts afresh; a workdir whose
run failed before its first checkpoint holds nothing to lose, and is simply reused.

A run killed at any moment, even with SIGKILL, and then resumed produces the same accuracy matrix
as an uninterrupted run, bit for bit on CPU, because everything random is restored rather than
re-drawn.

Layout: one directory per method and seed, ``<workdir>/checkpoints/<method>-seed<seed>/`` (a
sweep: one per method, ``sweep-<method>/``, holding all its runs along a leading axis), holding
numbered checkpoints ``<n>/`` (the last two are kept). Each is one
:class:`experiments.training.loop.RunState`:

* ``state/``: an Orbax checkpoint of its arrays: parameters, optimiser state, EWC state, the
  JAX PRNG key (as ``key_data``) and the strength. Orbax writes it to a temporary directory and
  renames it when finished, so a half-written ``state/`` never exists under its final name;
* ``checkpoint.json``: written atomically (temporary file + ``os.replace``) only after ``state/``
  is finalized. It is the completeness marker and holds the config fingerprint, the SHA-256 of
  every file of ``state/`` and the run's :class:`experiments.training.loop.Progress`: the
  position in the task stream, the NumPy generator state of the Fisher's example choice, and the
  results so far (accuracy-matrix rows, curves, timings); and last the SHA-256 of its own other
  fields (``marker_checksum``), so that an edited byte of the JSON is refused like one of
  ``state/``: a checkpoint either resumes bit-identically or is refused.

A numbered directory without ``checkpoint.json`` or ``state/`` is an interrupted save: it is
never taken for complete, and is deleted when the run resumes. A ``checkpoint.json`` that cannot
be read, a fingerprint of another config, a file of ``state/`` whose checksum differs from the
marker's (a flipped bit, a truncated or missing file), or arrays that do not fit the model raise
:class:`CheckpointError` naming the checkpoint and what to delete, and nothing is overwritten. A
save that fails for lack of disk space (or any other ``OSError``) removes its partial directory
and raises :class:`CheckpointError` in one line; the checkpoints before it stay.

When checkpoints are taken: after every task, and within a task every
``config.checkpoint_every_steps`` SGD steps (0: only after tasks). Training runs whole epochs in
one ``lax.scan``, so a mid-task checkpoint is taken at the end of the first epoch at or past each
multiple of that number: the interval is rounded up to whole epochs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

CHECKPOINT_FORMAT = 4
MARKER = "checkpoint.json"
STATE = "state"
KEEP = 2
NOT_IN_FINGERPRINT = ("checkpoint_every_steps",)
"""Config fields that may change between a run and its resumption."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: corrupt, or written by another config or model."""


def run_identity(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (``config.to_dict()``) that a resumed run must share."""
    return {k: v for k, v in config_dict.items() if k not in NOT_IN_FINGERPRINT}


def fingerprint(config_dict: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of :func:`run_identity`.

    Example:
        >>> fingerprint({"seed": 0}) == fingerprint({"seed": 0, "checkpoint_every_steps": 9})
        True
    """
    text = json.dumps(run_identity(config_dict), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoints_root(workdir: str | os.PathLike[str]) -> Path:
    """``<workdir>/checkpoints``, as an absolute path (Orbax refuses relative ones)."""
    return Path(workdir).absolute() / "checkpoints"


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it: all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def state_checksums(state: Path) -> dict[str, str]:
    """SHA-256 of every file under ``state`` (an Orbax checkpoint), by relative path."""
    checksums = {}
    for file in sorted(p for p in state.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        checksums[file.relative_to(state).as_posix()] = digest.hexdigest()
    return checksums


def marker_checksum(marker: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a marker's fields other than ``marker_checksum``.

    Example:
        >>> marker_checksum({"a": 1}) == marker_checksum({"a": 1, "marker_checksum": "x"})
        True
    """
    fields = {k: v for k, v in marker.items() if k != "marker_checksum"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def state_damage(state: Path, checksums: Any) -> str | None:
    """What differs between the files of ``state`` and their ``checksums`` (as
    :func:`state_checksums` gave them when saved), or None when nothing does."""
    if not isinstance(checksums, dict):
        return f"{MARKER} holds no checksums"
    found = state_checksums(state)
    changed = sorted(
        name for name in found.keys() | checksums.keys() if found.get(name) != checksums.get(name)
    )
    if not changed:
        return None
    what = "missing" if changed[0] not in found else "changed"
    problem = f"{state.name}/{changed[0]} is {what} since it was saved (checksum mismatch)"
    if len(changed) > 1:
        problem += f", and {len(changed) - 1} more file(s)"
    return problem


def save_arrays(path: Path, arrays: Any) -> None:
    """Writes the pytree ``arrays`` as an Orbax checkpoint at ``path`` (Orbax writes a temporary
    directory and renames it when finished)."""
    import orbax.checkpoint as ocp

    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(path, arrays)


def restore_arrays(path: Path, target: Any) -> Any:
    """The arrays of the Orbax checkpoint at ``path``, restored as ``target``'s shapes, dtypes
    and shardings say (check the result with :func:`fits`).

    Raises:
        ValueError: the files cannot be restored (corrupt, or of another structure).
    """
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(path, abstract)
    except Exception as error:  # Orbax/TensorStore raise many types for bad files.
        raise ValueError(f"{type(error).__name__}: {str(error)[:300]}") from None


def fits(arrays: Any, target: Any) -> bool:
    """Whether ``arrays`` has ``target``'s tree structure, shapes and dtypes."""
    if jax.tree.structure(arrays) != jax.tree.structure(target):
        return False
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), arrays)
    return shapes == jax.tree.map(lambda a: (a.shape, a.dtype), target)


def _numbered(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def is_complete(path: Path) -> bool:
    """Whether a numbered checkpoint directory was completely written (marker and state)."""
    return (path / MARKER).is_file() and (path / STATE).is_dir()


class RunCheckpoints:
    """The checkpoints of one method and seed.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> ckpts = RunCheckpoints(Path(tempfile.mkdtemp()) / "ewc-seed0", "f" * 64)
        >>> _ = ckpts.save({"w": jnp.ones(2)}, {"task": 1})
        >>> arrays, progress = ckpts.restore({"w": jnp.zeros(2)})
        >>> progress["task"], arrays["w"].tolist()
        (1, [1.0, 1.0])
    """

    def __init__(
        self, directory: str | os.PathLike[str], config_fingerprint: str, keep: int = KEEP
    ):
        self.directory = Path(directory).absolute()
        self.fingerprint = config_fingerprint
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = [p for p in _numbered(self.directory) if is_complete(p)]
        return complete[-1] if complete else None

    def read_marker(self, path: Path) -> dict[str, Any]:
        """The validated ``checkpoint.json`` of ``path``.

        Raises:
            CheckpointError: unreadable, of another format, or of another config.
        """
        try:
            marker = json.loads((path / MARKER).read_text())
            fmt, found, progress = marker["format"], marker["fingerprint"], marker["progress"]
            checksums = marker.get("checksums")
            sealed = marker.get("marker_checksum") == marker_checksum(marker)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"checkpoint {path} is corrupt ({MARKER}: {error}); delete {path} to resume from "
                "the one before, or pass --overwrite to start the run afresh"
            ) from None
        if fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {path} has format {fmt!r}, this code reads {CHECKPOINT_FORMAT}; pass "
                "--overwrite to start afresh or resume with the version that wrote it"
            )
        if not sealed:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {MARKER} was changed since it was saved "
                f"(checksum mismatch); delete {path} to resume from the one before, or pass "
                "--overwrite to start the run afresh"
            )
        if found != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written by a different config (fingerprint "
                f"{found[:12]}, this config {self.fingerprint[:12]}); choose another --workdir "
                "or pass --overwrite to discard it"
            )
        self._verify(path, checksums)
        return progress

    @staticmethod
    def _verify(path: Path, checksums: Any) -> None:
        """Compares the files of ``path/state`` with the marker's checksums."""
        problem = state_damage(path / STATE, checksums)
        if problem is None:
            return
        raise CheckpointError(
            f"checkpoint {path} is damaged: {problem}; delete {path} to resume from the one "
            "before, or pass --overwrite to start the run afresh"
        )

    def restore(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """Arrays shaped like ``target`` and the progress of the latest complete checkpoint.

        Interrupted saves (numbered directories that are not complete) are deleted first.

        Args:
            target: a pytree of arrays with the structure, shapes, dtypes and shardings of the
                saved arrays.

        Returns:
            ``(arrays, progress)``, or None when there is no complete checkpoint.

        Raises:
            CheckpointError: the latest checkpoint is corrupt or does not fit ``target``.
        """
        for path in _numbered(self.directory):
            if not is_complete(path):
                shutil.rmtree(path)
        path = self.latest()
        if path is None:
            return None
        progress = self.read_marker(path)
        try:
            arrays = restore_arrays(path / STATE, target)
        except ValueError as error:
            raise CheckpointError(
                f"cannot restore {path / STATE}: it is corrupt or was written for another model "
                f"({error}); delete {path} to resume from the one before, or pass --overwrite to "
                "start the run afresh"
            ) from None
        if not fits(arrays, target):
            raise CheckpointError(
                f"checkpoint {path} holds arrays of another model; pass --overwrite to start afresh"
            )
        return arrays, progress

    def save(self, arrays: Any, progress: dict[str, Any]) -> Path:
        """Writes a new numbered checkpoint, marks it complete, then prunes the oldest.

        Args:
            arrays: pytree of arrays (parameters, optimiser and EWC state, PRNG key data).
            progress: JSON-serialisable position and results so far.

        Returns:
            The new checkpoint's directory.
        """
        existing = _numbered(self.directory)
        number = int(existing[-1].name) + 1 if existing else 0
        path = self.directory / f"{number:08d}"
        try:
            path.mkdir(parents=True)
            save_arrays(path / STATE, arrays)
            marker = {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": self.fingerprint,
                "checksums": state_checksums(path / STATE),
                "progress": progress,
            }
            marker["marker_checksum"] = marker_checksum(marker)
            write_atomic(path / MARKER, json.dumps(marker) + "\n")
        except Exception as error:  # Orbax wraps the OSError of a full disk in its own types.
            cause = os_error_in(error)
            if cause is None:
                raise
            shutil.rmtree(path, ignore_errors=True)
            reason = "no space left on device" if cause.errno == errno.ENOSPC else cause.strerror
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason or cause}; free some space (or move "
                "the --workdir) and rerun the same command to resume from the last complete "
                "checkpoint"
            ) from None
        complete = [p for p in _numbered(self.directory) if is_complete(p)]
        for old in complete[: -self.keep]:
            shutil.rmtree(old)
        return path


def os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is, or was caused by (through ``__cause__``/``__context__``).

    Orbax and TensorStore re-raise a failed write as their own exception types; some of them only
    name the errno in their message (``No space left on device``), which is matched too.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            if os.strerror(code) in str(current):
                return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def has_checkpoints(workdir: str | os.PathLike[str]) -> bool:
    """Whether any run in ``workdir`` has a complete checkpoint (progress a fresh start loses)."""
    root = checkpoints_root(workdir)
    if not root.is_dir():
        return False
    return any(is_complete(p) for run in root.iterdir() for p in _numbered(run))


def verify_workdir(workdir: str | os.PathLike[str], config_fingerprint: str) -> None:
    """Reads the marker of every run's latest checkpoint, so a bad one fails before training.

    Raises:
        CheckpointError: a corrupt marker or one of another config.
    """
    root = checkpoints_root(workdir)
    if not root.is_dir():
        return
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        run = RunCheckpoints(directory, config_fingerprint)
        latest = run.latest()
        if latest is not None:
            run.read_marker(latest)


def remove_all(workdir: str | os.PathLike[str]) -> None:
    """Deletes ``<workdir>/checkpoints`` (after a finished run, or for ``--overwrite``)."""
    shutil.rmtree(checkpoints_root(workdir), ignore_errors=True)
