"""Where the examples and the sums live: one device, data parallel (``shard_map``), or GSPMD.

:func:`placed_sums` adds up per-chunk sums (one array per selected parameter leaf, in the
accumulation dtype) over all examples:

* one device: :func:`~ewc_jax._engine.chunking.chunked_sum`;
* a ``mesh`` with replicated params: each device sums its shard of the examples, one ``psum``;
* params with a sharded ``NamedSharding`` (tensor parallel, FSDP): the chunked computation on
  the sharded params, partitioned by XLA, each sum constrained to its parameter's sharding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ewc_jax._engine.chunking import chunked_sum, kahan_sum
from ewc_jax._engine.dtypes import accumulate_dtype
from ewc_jax._engine.kronecker import kronecker_specs
from ewc_jax._types import Params, PyTree

ChunkSums = Callable[[Params, PyTree, jax.Array], list[jax.Array]]
"""``chunk_sums(params, chunk, weight) -> [sum per selected leaf]``: a chunk's weighted sums."""

_P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parameter leaves live when params carry a sharded ``NamedSharding``.

    ``shardings``: each leaf's sharding (empty: params are not sharded, the older
    replicated/shard_map path runs); ``partitioned``: the same layouts on a mesh of
    ``AxisType.Auto`` axes, which the jitted program constrains its sums to and GSPMD
    propagates; ``data``: the mesh axis that splits each chunk's examples, or None.
    """

    shardings: tuple[jax.sharding.NamedSharding, ...] = ()
    partitioned: tuple[jax.sharding.NamedSharding, ...] = ()
    data: str | None = None

    @classmethod
    def of(cls, leaves: list[Any], mesh: jax.sharding.Mesh | None) -> Layout:
        # Traced params (fisher_diagonal called under an outer jit) have no placement here.
        found = [
            None if isinstance(leaf, jax.core.Tracer) else getattr(leaf, "sharding", None)
            for leaf in leaves
        ]
        named = [s for s in found if isinstance(s, jax.sharding.NamedSharding)]
        if not any(not s.is_fully_replicated for s in named):
            return cls()
        meshes = {(s.mesh.axis_names, s.mesh.devices.tobytes()) for s in named}
        if len(meshes) > 1:
            raise ValueError("params are sharded over different meshes; put them on one mesh.")
        param_mesh = named[0].mesh
        data = None if mesh is None else mesh.axis_names[0]
        if data is not None and data not in param_mesh.axis_names:
            raise ValueError(
                f"mesh's first axis {data!r} (the examples' axis) is not an axis of the mesh the "
                f"params are sharded over, {param_mesh.axis_names}."
            )
        auto = jax.sharding.Mesh(
            param_mesh.devices,
            param_mesh.axis_names,
            axis_types=(jax.sharding.AxisType.Auto,) * len(param_mesh.axis_names),
        )
        spec = lambda s: s.spec if isinstance(s, jax.sharding.NamedSharding) else _P()
        shardings = tuple(
            s if isinstance(s, jax.sharding.NamedSharding) else jax.NamedSharding(param_mesh, _P())
            for s in found
        )
        partitioned = tuple(jax.NamedSharding(auto, spec(s)) for s in found)
        return cls(shardings, partitioned, data)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.partitioned[0].mesh

    def enter(self, params: Params) -> Params:
        """Params on the Auto-axes mesh (same devices and layout: no data moves)."""
        if not self.shardings:
            return params

        def auto(leaf):
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, jax.sharding.NamedSharding):
                return jax.device_put(leaf, jax.NamedSharding(self.mesh, _P()))
            return jax.device_put(leaf, jax.NamedSharding(self.mesh, sharding.spec))

        return jax.tree.map(auto, params)

    def enter_examples(self, tree: PyTree) -> PyTree:
        """Example arrays already placed on a mesh, moved to the Auto-axes mesh (no data moves);
        others are left for the computation to place. One program sees one mesh."""
        if not self.shardings:
            return tree

        def auto(leaf):
            sharding = getattr(leaf, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh != self.mesh:
                return jax.device_put(leaf, jax.NamedSharding(self.mesh, sharding.spec))
            return leaf

        return jax.tree.map(auto, tree)

    def restore(self, selected: tuple[int, ...], results: list[jax.Array]) -> list[jax.Array]:
        """The selected leaves' results on their params' own shardings (no data moves)."""
        if not self.shardings:
            return results
        return [
            jax.device_put(r, self.shardings[i]) for r, i in zip(results, selected, strict=True)
        ]

    def kronecker(
        self, leaves: list[Any], layers: tuple[tuple[int, bool, tuple[int, ...], int], ...]
    ) -> tuple[tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding], ...] | None:
        """Each layer's ``(A, G)`` shardings on the Auto-axes mesh
        (:func:`~ewc_jax._engine.kronecker.kronecker_specs`), for layers given as ``(kernel
        leaf, has a bias, kernel axes, out features)``; None when the params are not sharded."""
        if not self.shardings:
            return None
        return tuple(
            tuple(
                jax.NamedSharding(self.mesh, spec)
                for spec in kronecker_specs(self.partitioned[k], leaves[k].shape, axes, out, bias)[
                    :2
                ]
            )
            for k, bias, axes, out in layers
        )

    def leave(self, arrays: list[tuple[jax.Array, ...]], shardings: Any) -> list[Any]:
        """Arrays placed by :meth:`kronecker`'s ``shardings``, on the params' own mesh (same
        devices and layout: no data moves); unchanged for ``shardings=None``."""
        if shardings is None:
            return arrays
        mesh = self.shardings[0].mesh
        return [
            tuple(
                jax.device_put(a, jax.NamedSharding(mesh, s.spec))
                for a, s in zip(*pair, strict=True)
            )
            for pair in zip(arrays, shardings, strict=True)
        ]

    def examples(self, ndim: int) -> jax.sharding.NamedSharding:
        """``[chunks, chunk, ...]``: each chunk's examples split over the data axis."""
        return jax.NamedSharding(self.mesh, _P(None, self.data, *([None] * (ndim - 2))))


def placed_sums(
    chunk_sums: ChunkSums,
    params: Params,
    data: tuple[PyTree, ...],
    *,
    chunk_size: int,
    selected: tuple[int, ...],
    layout: Layout,
    mesh: jax.sharding.Mesh | None,
) -> list[jax.Array]:
    """``Σ_chunks chunk_sums(params, chunk, weight)`` over every example of ``data``.

    Args:
      chunk_sums: a chunk's sums, one per selected leaf (:data:`ChunkSums`).
      params: the parameters (on ``layout``'s mesh when it holds shardings).
      data: arrays (or pytrees, or None) with a leading example axis N.
      chunk_size: examples per chunk.
      selected: the parameter leaves summed over (their indices in ``params``' leaves).
      layout: where sharded params live (:meth:`Layout.of`); empty: not sharded.
      mesh: data parallelism for replicated params; None: one device.
    """
    if layout.shardings:
        return _partitioned_sums(chunk_sums, params, data, layout, chunk_size, selected)
    if mesh is None:
        n = jax.tree.leaves(data)[0].shape[0]
        return _local_sums(chunk_sums, params, data, n, chunk_size, selected)
    return _sharded_sums(chunk_sums, params, data, mesh, chunk_size, selected)


def _zeros(params: Params, selected: tuple[int, ...]) -> list[jax.Array]:
    leaves = jax.tree.leaves(params)
    return [jnp.zeros(leaves[i].shape, accumulate_dtype(leaves[i].dtype)) for i in selected]


def _local_sums(
    chunk_sums: ChunkSums,
    params: Params,
    data: tuple[PyTree, ...],
    num_valid: jax.Array | int,
    chunk_size: int,
    selected: tuple[int, ...],
) -> list[jax.Array]:
    """Sums over the first ``num_valid`` examples, chunk by chunk."""
    return chunked_sum(
        lambda part, weight: chunk_sums(params, part, weight),
        data,
        chunk_size,
        num_valid=num_valid,
        zero=_zeros(params, selected),
    )


def _sharded_sums(
    chunk_sums: ChunkSums,
    params: Params,
    data: tuple[PyTree, ...],
    mesh: jax.sharding.Mesh,
    chunk_size: int,
    selected: tuple[int, ...],
) -> list[jax.Array]:
    """Data parallel: each device sums over its shard of the examples; one psum at the end.

    N not divisible by the device count is padded by repeating the last example, and the
    padding is masked out, so no example is dropped or counted twice.
    """
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]
    n = jax.tree.leaves(data)[0].shape[0]
    local = -(-n // devices)

    def pad(a):
        if a is None or local * devices == n:
            return a
        return jnp.concatenate([a, jnp.repeat(a[-1:], local * devices - n, axis=0)])

    spec = _P(axis)
    sharded = jax.sharding.NamedSharding(mesh, spec)
    data = jax.tree.map(lambda a: jax.device_put(pad(a), sharded), data)
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, _P()))

    def per_device(params, *data):
        num_valid = jnp.clip(n - jax.lax.axis_index(axis) * local, 0, local)
        sums = _local_sums(chunk_sums, params, data, num_valid, chunk_size, selected)
        return jax.lax.psum(sums, axis)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(_P(), *(spec for _ in data)),
        out_specs=_P(),
        # The fast path re-binds primitives traced outside shard_map (e.g. relu's `x > 0.0`
        # against an unvarying literal), which the varying-axes check would reject.
        check_vma=False,
    )(params, *data)


def _partitioned_sums(
    chunk_sums: ChunkSums,
    params: Params,
    data: tuple[PyTree, ...],
    layout: Layout,
    chunk_size: int,
    selected: tuple[int, ...],
) -> list[jax.Array]:
    """Sharding-preserving sums: the chunked computation on sharded params, partitioned by GSPMD.

    The examples are padded (weight 0) to whole chunks, each a multiple of the data axis' size,
    and laid out ``[chunks, chunk, ...]`` with the chunk axis split over the data axis; every
    chunk's sums and the running totals are constrained to their parameter's sharding, so XLA
    reduces each chunk's per-device partial sums straight into the parameter's shards
    (all-reduce for tensor-parallel leaves, reduce-scatter for FSDP leaves) and never forms a
    whole copy of a sharded leaf.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    devices = 1 if layout.data is None else layout.mesh.shape[layout.data]
    chunk = -(-min(chunk_size, n) // devices) * devices
    num_chunks = -(-n // chunk)

    def split(a):
        if num_chunks * chunk > n:
            a = jnp.concatenate([a, jnp.repeat(a[-1:], num_chunks * chunk - n, axis=0)])
        a = a.reshape(num_chunks, chunk, *a.shape[1:])
        return jax.lax.with_sharding_constraint(a, layout.examples(a.ndim))

    data = jax.tree.map(split, data)
    shardings = [layout.partitioned[i] for i in selected]

    def constrained(arrays):
        return [
            jax.lax.with_sharding_constraint(a, s) for a, s in zip(arrays, shardings, strict=True)
        ]

    def sums(i):
        weight = i * chunk + jnp.arange(chunk) < n
        return constrained(chunk_sums(params, jax.tree.map(lambda a: a[i], data), weight))

    return kahan_sum(sums, constrained(_zeros(params, selected)), num_chunks)
