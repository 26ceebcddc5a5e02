r"""A consolidated precision as a file: computed once, used by another run or another process.

A state (:class:`ewc_jax.EWCState`, :class:`ewc_jax.kfac.KFACState`) is the Gaussian prior
:math:`\mathcal N(θ̄, (λ Λ)^{-1})` that EWC remembers. :func:`save_state` writes its arrays
(the anchor ``θ̄``, the diagonal ``Λ``, the Kronecker factors ``A_t``, ``G_t``) and
:func:`load_state` reads them back bit-identical, dtypes included, so the penalty
:math:`\frac{λ}{2} (θ - θ̄)^\top Λ (θ - θ̄)` of the loaded state is the same number.

The file is a directory::

    fisher-task-a/               the path given to save_state
      manifest.json              kind, format version, tree, shapes, dtypes, SHA-256 of each file
      arrays/                    an Orbax checkpoint of the arrays (TensorStore, OCDBT)

Writing is atomic: everything goes to a temporary directory beside ``path``, renamed into place
once complete, so a crash leaves the old file or none, never half of one. Reading checks the
manifest's own SHA-256 and every file's before an array is restored: a flipped byte, a truncated
or missing file, another format version, or a state of another kind than ``like`` is refused
with a one-line ``ValueError`` naming the file.

Sharded arrays restore sharded: each leaf takes the sharding of the matching leaf of ``like``
(arrays or ``jax.ShapeDtypeStruct``); without ``like`` every array lands on the process's first
device. A state sharded over several processes is saved by all of them calling
:func:`save_state` (each writes its own shards, process 0 the manifest); any number of processes
may read a file.

Needs Orbax (``pip install "ewc-jax[files]"``); ``import ewc_jax`` does not import this module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ewc_jax._consolidation import EWCState
from ewc_jax._kfac_state import KFACState, KroneckerTerms
from ewc_jax._validation import is_traced

__all__ = ["load_state", "save_state"]

FORMAT = "ewc_jax.state"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"

_KINDS: dict[str, type] = {"EWCState": EWCState, "KFACState": KFACState}
# KroneckerTerms, a registered dataclass: its array fields, then its static (metadata) fields.
_TERMS_DATA = ("a", "g", "anchor")
_TERMS_META = ("kernel", "bias", "kernel_axes")


class _Opaque(Exception):
    """A node the manifest cannot describe: such a file loads only with ``like``."""


def _describe(tree: Any, leaves: list[Any]) -> Any:
    """A JSON description of ``tree``, appending its leaves to ``leaves`` in ``jax.tree`` order.

    Describes dicts with string keys (sorted, as ``jax.tree`` flattens them), lists, tuples,
    ``None``, ``optax.MaskedNode`` (a ``where=`` selection), the states and their arrays.
    """
    if tree is None:
        return None
    if isinstance(tree, optax.MaskedNode):
        return {"masked": True}
    if type(tree) in (EWCState, KFACState):
        children = {k: _describe(getattr(tree, k), leaves) for k in tree._fields}
        return {"node": type(tree).__name__, "children": children}
    if type(tree) is KroneckerTerms:
        children = {k: _describe(getattr(tree, k), leaves) for k in _TERMS_DATA}
        meta = {k: _to_json(getattr(tree, k)) for k in _TERMS_META}
        return {"node": "KroneckerTerms", "children": children, "meta": meta}
    if type(tree) is dict and all(isinstance(k, str) for k in tree):
        return {"dict": {k: _describe(tree[k], leaves) for k in sorted(tree)}}
    if type(tree) in (list, tuple):
        return {type(tree).__name__: [_describe(v, leaves) for v in tree]}
    if isinstance(tree, jax.Array):
        leaves.append(tree)
        return {"leaf": len(leaves) - 1}
    raise _Opaque(type(tree).__name__)


def _build(desc: Any, leaves: list[Any]) -> Any:
    """The tree :func:`_describe` described, holding ``leaves``."""
    if desc is None:
        return None
    if "masked" in desc:
        return optax.MaskedNode()
    if "leaf" in desc:
        return leaves[desc["leaf"]]
    if "dict" in desc:
        return {k: _build(v, leaves) for k, v in desc["dict"].items()}
    if "list" in desc:
        return [_build(v, leaves) for v in desc["list"]]
    if "tuple" in desc:
        return tuple(_build(v, leaves) for v in desc["tuple"])
    children = {k: _build(v, leaves) for k, v in desc["children"].items()}
    if desc["node"] == "KroneckerTerms":
        meta = {k: _from_json(v) for k, v in desc["meta"].items()}
        return KroneckerTerms(**children, **meta)
    return _KINDS[desc["node"]](**children)


def _to_json(value: Any) -> Any:
    return {"tuple": [_to_json(v) for v in value]} if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(map(_from_json, value["tuple"])) if isinstance(value, dict) else value


def _checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` but the manifest, by relative path."""
    found = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        found[file.relative_to(directory).as_posix()] = digest.hexdigest()
    return found


def _sealed(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the manifest's fields but ``manifest_sha256``."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _layout(state: Any) -> list[Any]:
    """The static metadata a key path does not show: each K-FAC layer's leaf indices."""
    layers = getattr(state, "layers", ())
    return [[_to_json(getattr(t, k)) for k in _TERMS_META] for t in layers]


def _manifest(state: EWCState | KFACState) -> tuple[dict[str, Any], list[Any]]:
    """The manifest of ``state`` (without checksums) and its leaves, as arrays."""
    # NumPy and Python leaves as JAX would hold them (float64 only where x64 is on).
    state = jax.tree.map(jnp.asarray, state)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves = [x for _, x in flat]
    described: list[Any] = []
    try:
        tree = _describe(state, described)
        opaque = None
        if list(map(id, described)) != list(map(id, leaves)):
            raise _Opaque("a tree flattened in another order")
    except _Opaque as node:
        tree, opaque = None, str(node)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": type(state).__name__,
        "tree": tree,
        "opaque": opaque,
        "layout": _layout(state),
        "leaves": [
            {"path": jax.tree_util.keystr(p), "shape": list(x.shape), "dtype": x.dtype.name}
            for (p, _), x in zip(flat, leaves, strict=True)
        ],
    }
    return manifest, leaves


def _is_state_file(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_state(path: str | os.PathLike[str], state: EWCState | KFACState) -> Path:
    r"""Writes ``state`` to ``path`` (a directory), atomically: the old file or the new, whole.

    The arrays go to an Orbax checkpoint; ``manifest.json`` records the state's kind, the format
    version, its tree, every leaf's key path, shape and dtype, the SHA-256 of every file, and
    last its own SHA-256. Zero-size arrays (a K-FAC state with no task yet) are recorded by
    shape and dtype only. An existing state file at ``path`` is replaced; anything else there
    is refused.

    Args:
      path: where to write; its parent directory must exist.
      state: an :class:`ewc_jax.EWCState` or :class:`ewc_jax.kfac.KFACState` (concrete
        arrays, sharded or not; not under ``jit``).

    Returns:
      The absolute path written.

    Raises:
      ValueError: ``state`` is not a state, or ``path`` holds something that is not a state
        file.

    Example:
      >>> import pathlib, tempfile, jax.numpy as jnp, ewc_jax, ewc_jax.io
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = ewc_jax.consolidate(None, params, {"w": jnp.array([4.0, 0.0])})
      >>> path = ewc_jax.io.save_state(pathlib.Path(tempfile.mkdtemp()) / "task-a", state)
      >>> sorted(p.name for p in path.iterdir())
      ['arrays', 'manifest.json']
    """
    if type(state) not in _KINDS.values():
        raise ValueError(
            f"save_state writes an EWCState or a KFACState, got {type(state).__name__}."
        )
    if is_traced(state):
        raise ValueError("save_state writes concrete arrays; call it outside jax.jit.")
    path = Path(path).absolute()
    if path.exists() and not _is_state_file(path):
        raise ValueError(f"{path} exists and is not an ewc_jax state file; refusing to replace it.")
    manifest, leaves = _manifest(state)
    stored = {f"leaf{i:05d}": _global(x) for i, x in enumerate(leaves) if x.size}
    primary = jax.process_index() == 0
    tmp = path.with_name(f".{path.name}.tmp-{_token()}")
    try:
        if primary:
            tmp.mkdir()
        _sync("ewc_jax.io.save_state: temporary directory made")
        if stored:  # every process writes its own shards; Orbax waits for all of them
            ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(tmp / ARRAYS, stored)
        if primary:
            manifest["checksums"] = _checksums(tmp)
            manifest["manifest_sha256"] = _sealed(manifest)
            with open(tmp / MANIFEST, "w") as handle:
                handle.write(json.dumps(manifest, indent=1) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            _move_into_place(tmp, path)
        _sync("ewc_jax.io.save_state: file in place")
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _global(x: jax.Array) -> jax.Array:
    """``x``, or with several processes a process-local ``x`` as a global replicated array
    (Orbax writes global arrays only; the processes' copies must be equal, as ``num_tasks``)."""
    if jax.process_count() == 1 or not x.is_fully_addressable:
        return x
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec()
    )
    host = np.asarray(x)
    return jax.make_array_from_callback(x.shape, everywhere, lambda index: host[index])


def _token() -> str:
    """A fresh name for the temporary directory, the same in every process."""
    token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return bytes(token.astype(np.uint8)).hex()


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames ``tmp`` to ``path``; an old state there is moved aside first, then deleted."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the state file ``path``; ValueError when it is not intact."""
    if not path.exists():
        raise ValueError(f"{path}: no such ewc_jax state file.")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        fmt, version, kind = manifest["format"], manifest["version"], manifest["kind"]
        sealed = manifest["manifest_sha256"] == _sealed(manifest)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not an ewc_jax state file ({MANIFEST}: {type(error).__name__}: {error})."
        ) from None
    if fmt != FORMAT or version != VERSION:
        raise ValueError(
            f"{path} has format {fmt!r} version {version!r}; this ewc_jax reads {FORMAT!r} "
            f"version {VERSION}."
        )
    if not sealed:
        raise ValueError(f"{path} is damaged: {MANIFEST} was changed since it was saved.")
    found, recorded = _checksums(path), manifest["checksums"]
    changed = sorted(name for name in recorded if found.get(name) != recorded[name])
    if changed:
        what = "missing" if changed[0] not in found else "changed"
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ValueError(
            f"{path} is damaged: {changed[0]} is {what} since it was saved{more} "
            "(SHA-256 mismatch)."
        )
    if kind not in _KINDS:
        raise ValueError(f"{path} holds a {kind!r}, not a state this ewc_jax reads.")
    return manifest


def _check_kind(path: Path, kind: str, expected: type) -> None:
    if expected is not _KINDS[kind]:
        raise ValueError(f"{path} holds {kind}, not the {expected.__name__} that like= expects.")


def _check_tree(path: Path, manifest: dict[str, Any], like: EWCState | KFACState) -> list[Any]:
    """Refuses a ``like`` of another tree than the file's; returns its leaves' shardings."""
    flat = jax.tree_util.tree_flatten_with_path(like)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    recorded = [leaf["path"] for leaf in manifest["leaves"]]
    if paths != recorded:
        ours, theirs = next(
            (a, b) for a, b in itertools.zip_longest(paths, recorded, fillvalue="nothing") if a != b
        )
        raise ValueError(
            f"{path} holds another tree than like= (like has {ours} where the file has {theirs})."
        )
    if _layout(like) != manifest["layout"]:
        raise ValueError(f"{path} holds K-FAC layers of other leaves than like=.")
    shardings = [getattr(x, "sharding", None) for _, x in flat]
    for s, (p, _) in zip(shardings, flat, strict=True):
        if isinstance(getattr(s, "mesh", None), jax.sharding.AbstractMesh):
            raise ValueError(
                f"like= has a sharding over an abstract mesh at {jax.tree_util.keystr(p)} (from "
                f"jax.eval_shape?); give shardings over devices to load {path}."
            )
    return shardings


def _restore(path: Path, records: list[dict[str, Any]], shardings: list[Any]) -> list[Any]:
    """The arrays of the file, each with its sharding (None: the process's first device)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = [
        jax.ShapeDtypeStruct(tuple(r["shape"]), jnp.dtype(r["dtype"]), sharding=s or default)
        for r, s in zip(records, shardings, strict=True)
    ]
    stored = {f"leaf{i:05d}": a for i, a in enumerate(abstract) if a.size}
    try:
        arrays = (
            ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(path / ARRAYS, stored)
            if stored
            else {}
        )
    except Exception as error:  # Orbax and TensorStore raise many types for a bad file.
        first = (str(error).splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: Orbax cannot restore its arrays ({type(error).__name__}: {first})."
        ) from None
    leaves = []
    for i, (a, r) in enumerate(zip(abstract, records, strict=True)):
        leaf = (
            arrays.get(f"leaf{i:05d}") if a.size else jnp.zeros(a.shape, a.dtype, device=a.sharding)
        )
        if leaf is None or leaf.shape != a.shape or leaf.dtype != a.dtype:
            raise ValueError(f"{path}: the array at {r['path']} does not match its manifest.")
        leaves.append(leaf)
    return leaves


def load_state(
    path: str | os.PathLike[str], like: EWCState | KFACState | type | None = None
) -> EWCState | KFACState:
    r"""Reads the state :func:`save_state` wrote: the same arrays, bit for bit, and dtypes.

    Before any array is read, the manifest's SHA-256 and the SHA-256 of every file are checked.

    Args:
      path: the directory :func:`save_state` wrote.
      like: the state expected, for its kind, its tree and its shardings: an
        :class:`ewc_jax.EWCState` or :class:`ewc_jax.kfac.KFACState` whose leaves are arrays
        or ``jax.ShapeDtypeStruct`` (e.g. ``ewc_jax.empty_state(params)`` for a diagonal
        file); each array is restored with the sharding of its ``like`` leaf (over devices,
        not an abstract mesh), and with the file's shape and dtype. A class
        (``ewc_jax.EWCState``) checks the kind only. ``None``: any kind, arrays on the
        process's first device; a tree the file cannot describe (a node other than a dict
        with string keys, a list, a tuple or ``None``, such as a Flax ``FrozenDict``) then
        needs ``like``.

    Returns:
      The state, of the kind the file records.

    Raises:
      ValueError: in one line naming the file, when it is missing, not a state file, of another
        format version, damaged (a changed, truncated or missing file), of another kind or tree
        than ``like``, or unreadable by Orbax.

    Example:
      >>> import pathlib, tempfile, jax.numpy as jnp, ewc_jax, ewc_jax.io
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = ewc_jax.consolidate(None, params, {"w": jnp.array([4.0, 0.0])})
      >>> path = ewc_jax.io.save_state(pathlib.Path(tempfile.mkdtemp()) / "task-a", state)
      >>> loaded = ewc_jax.io.load_state(path, like=ewc_jax.EWCState)
      >>> loaded.precision["w"].tolist(), int(loaded.num_tasks)
      ([4.0, 0.0], 1)
      >>> float(ewc_jax.penalty({"w": jnp.array([1.5, 3.0])}, loaded, strength=2.0))  # 4 · 0.5²
      1.0
      >>> ewc_jax.io.load_state(path, like=ewc_jax.kfac.KFACState)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ValueError: .../task-a holds EWCState, not the KFACState that like= expects.
    """
    path = Path(path).absolute()
    manifest = _read_manifest(path)
    if like is not None:
        _check_kind(path, manifest["kind"], like if isinstance(like, type) else type(like))
    template = None if like is None or isinstance(like, type) else like
    if template is None and manifest["tree"] is None:
        raise ValueError(
            f"{path} holds a tree with a {manifest['opaque']} node, which it does not describe; "
            "pass like= (a state of the same tree) to load it."
        )
    records = manifest["leaves"]
    shardings = [None] * len(records) if template is None else _check_tree(path, manifest, template)
    leaves = _restore(path, records, shardings)
    if template is not None:
        return jax.tree.unflatten(jax.tree.structure(template), leaves)
    return _build(manifest["tree"], leaves)
