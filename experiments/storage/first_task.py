"""Shared first-task params: the state a run reaches by training task 1, saved once per seed and
loaded by every later run that would train task 1 the same way.

A language model's English "pretraining" is most of the cost of each run, and it is the same
for finetune, L2, EWC, online EWC and K-FAC: no penalty acts before the first consolidation.
With ``config.first_task_params`` set to a directory, the first run of a seed that finishes
task 1 saves its arrays there, and every later run with the same *identity* (the fields that
determine task 1's training: :func:`experiments.runs.first_task.identity`) loads them instead
of training task 1 again.

Layout: ``<directory>/seed<seed>/``, holding

* ``state/``: an Orbax checkpoint of the parameters, the optimiser state and the PRNG key (as
  ``key_data``) at the end of task 1's training, before its evaluation and importance;
* ``checkpoint.json``: the identity, its SHA-256 (the fingerprint), the SHA-256 of every file of
  ``state/``, the task's progress (steps, epochs, learning curve, training seconds) and last the
  SHA-256 of its own other fields, as :mod:`experiments.storage.checkpoint` writes its markers.

A save writes a temporary directory beside ``seed<seed>/`` and renames it into place, so the
directory exists whole or not at all, and when two runs finish task 1 at once the first rename
wins and the second run's copy is dropped. A directory of another identity, an edited marker or
a changed file of ``state/`` raises :class:`FirstTaskError` in one line, and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from experiments.storage import checkpoint

FORMAT = 1


class FirstTaskError(checkpoint.CheckpointError):
    """Shared first-task params that cannot be used: corrupt, or of another task 1."""


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``identity``.

    Example:
        >>> fingerprint({"seed": 0, "steps": 5}) == fingerprint({"steps": 5, "seed": 0})
        True
    """
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class FirstTaskParams:
    """The shared first-task state of one seed, at ``<directory>/seed<seed>``.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> store = FirstTaskParams(tempfile.mkdtemp(), 0, {"seed": 0, "steps": 5})
        >>> store.save({"w": jnp.ones(2)}, {"steps_done": 5}) is not None
        True
        >>> arrays, progress = store.load({"w": jnp.zeros(2)})
        >>> progress["steps_done"], arrays["w"].tolist()
        (5, [1.0, 1.0])
    """

    def __init__(self, directory: str | os.PathLike[str], seed: int, identity: dict[str, Any]):
        self.path = Path(directory).absolute() / f"seed{seed}"
        self.identity = json.loads(json.dumps(identity))  # as the marker holds it (lists)
        self.fingerprint = fingerprint(identity)

    def _refuse(self, problem: str) -> FirstTaskError:
        return FirstTaskError(
            f"shared first-task params {self.path} {problem}; delete {self.path} to train task 1 "
            "afresh, or set --config.first_task_params to another directory ('' for none)"
        )

    def load(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """The saved arrays, shaped like ``target``, and task 1's progress; None if none saved.

        Raises:
            FirstTaskError: the marker is unreadable or edited, a file of ``state/`` changed,
                the arrays do not fit ``target``, or they were saved for another identity.
        """
        if not self.path.exists():
            return None
        try:
            marker = json.loads((self.path / checkpoint.MARKER).read_text())
            fmt, found, identity = marker["format"], marker["fingerprint"], marker["identity"]
            progress, checksums = marker["progress"], marker["checksums"]
            sealed = marker.get("marker_checksum") == checkpoint.marker_checksum(marker)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._refuse(f"are corrupt ({checkpoint.MARKER}: {error})") from None
        if fmt != FORMAT:
            raise self._refuse(f"have format {fmt!r}, this code reads {FORMAT}")
        if not sealed:
            raise self._refuse(f"are damaged: {checkpoint.MARKER} was changed since it was saved")
        if found != self.fingerprint:
            raise self._refuse(f"were trained for another task 1 ({_differences(identity, self)})")
        problem = checkpoint.state_damage(self.path / checkpoint.STATE, checksums)
        if problem is not None:
            raise self._refuse(f"are damaged: {problem}")
        try:
            arrays = checkpoint.restore_arrays(self.path / checkpoint.STATE, target)
        except ValueError as error:
            raise self._refuse(f"cannot be restored ({error})") from None
        if not checkpoint.fits(arrays, target):
            raise self._refuse("hold arrays of another model")
        return arrays, progress

    def save(self, arrays: Any, progress: dict[str, Any]) -> Path | None:
        """Writes the arrays and progress, unless a run saved them first.

        Returns:
            The directory written, or None when it existed already (nothing is written).
        """
        if self.path.exists():
            return None
        staging = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            staging.mkdir(parents=True)
            checkpoint.save_arrays(staging / checkpoint.STATE, arrays)
            marker = {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "identity": self.identity,
                "checksums": checkpoint.state_checksums(staging / checkpoint.STATE),
                "progress": progress,
            }
            marker["marker_checksum"] = checkpoint.marker_checksum(marker)
            checkpoint.write_atomic(staging / checkpoint.MARKER, json.dumps(marker) + "\n")
            try:
                staging.rename(self.path)
            except OSError:
                if not self.path.exists():
                    raise
                return None  # another run renamed its copy into place first
        except Exception as error:
            if checkpoint.os_error_in(error) is None:
                raise
            raise self._refuse(f"cannot be written ({checkpoint.os_error_in(error)})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.path


def _differences(saved: Any, store: FirstTaskParams) -> str:
    """The identity's fields that differ, ``name: saved -> this run``, at most five."""
    if not isinstance(saved, dict):
        return "its identity is unreadable"
    mine = store.identity
    fields = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in fields[:5])
    return f"differs in {shown}" if fields else "its fingerprint differs"
