"""Kronecker quadratics laid out like their layer's kernel (tensor parallel, FSDP).

A layer's factors ``A`` (``[rows, rows]``), ``G`` (``[out, out]``) and its deviation ``X``
(``[rows, out]``) are split like the kernel: ``A``'s first axis and ``X``'s rows over the mesh
axes of the kernel's input axis, ``G``'s first axis and ``X``'s columns over those of its output
axis. Then ``tr(Xᵀ A X G)`` contracts ``Aᵀ X`` (``A`` symmetric) and ``(A X) G`` each over a
split axis paired with the same split axis: every device multiplies its own blocks and XLA
reduces the partial products into the result's shards (a reduce-scatter or an all-reduce of a
scalar), never gathering ``X`` or the kernel whole.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_P = jax.sharding.PartitionSpec


def kronecker_axes(
    sharding: jax.sharding.NamedSharding, ndim: int, kernel_axes: tuple[int, ...]
) -> tuple[Any, Any]:
    """The mesh axes (a ``PartitionSpec`` entry each) that split a layer's kernel rows ``W̄``
    (input, then spatial axes, input-major) and its ``out`` axis, read from the kernel's
    sharding. The rows count as whole where a spatial axis is split (then a device's rows are
    not one block)."""
    spec = (*sharding.spec, *([None] * (ndim - len(sharding.spec))))
    row = spec[kernel_axes[0]]
    if any(spec[axis] is not None for axis in kernel_axes[1:-1]):
        row = None
    return row, spec[kernel_axes[-1]]


def kronecker_specs(
    sharding: jax.sharding.NamedSharding, ndim: int, kernel_axes: tuple[int, ...], bias: bool
) -> tuple[jax.sharding.PartitionSpec, jax.sharding.PartitionSpec, jax.sharding.PartitionSpec]:
    """How a layer's ``A`` (``[rows, rows]``), ``G`` (``[out, out]``) and anchor ``W̄``
    (``[rows, out]``) are kept, from its kernel's sharding (:func:`kronecker_axes`).

    ``A``'s first axis and ``W̄``'s rows are split like the kernel's input axis, ``G``'s first
    axis and ``W̄``'s columns like its output axis, so that the penalty's ``Aᵀ X`` and ``X G``
    contract a split axis with the same split axis (partial sums and a reduction, never a
    gather of ``X``; ``A`` is symmetric). With a bias the rows stay whole: ``[W; b]`` has
    ``rows + 1`` rows, which the ``n > 1`` devices that split ``rows`` cannot split evenly.
    """
    row, out = kronecker_axes(sharding, ndim, kernel_axes)
    if bias:
        row = None
    return _P(row, None), _P(out, None), _P(row, out)


def layer_specs(
    kernel: jax.Array, kernel_axes: tuple[int, ...], bias: bool
) -> tuple[jax.sharding.NamedSharding | None, tuple[_P, _P, _P]]:
    """The kernel's sharding (:func:`sharding_of`; None: no layout) and the ``A``, ``G`` and
    anchor specs a state keeps for its layer (:func:`kronecker_specs`)."""
    like = sharding_of(kernel)
    if like is None:
        return None, (_P(), _P(), _P())
    return like, kronecker_specs(like, kernel.ndim, kernel_axes, bias)


def stacked(
    old: jax.Array, new: jax.Array, spec: _P, like: jax.sharding.NamedSharding | None
) -> jax.Array:
    """``[T + 1, ...]``: ``old`` terms and one ``new``, laid out as ``[None, *spec]``."""
    spec = _P(None, *spec)
    return pinned(
        jnp.concatenate([pinned(old, spec, like), pinned(new[None], spec, like)]), spec, like
    )


def sharding_of(leaf: Any) -> jax.sharding.NamedSharding | None:
    """A leaf's ``NamedSharding`` where it can be read: a placed array's own, or under ``jit`` its
    type's when the mesh has ``Explicit`` axes; None elsewhere (one device, or ``Auto`` axes
    under ``jit``, where XLA's propagation places what follows)."""
    if isinstance(leaf, jax.core.Tracer):
        sharding = jax.typeof(leaf).sharding
        explicit = jax.sharding.AxisType.Explicit in sharding.mesh.axis_types
        return sharding if isinstance(sharding, jax.sharding.NamedSharding) and explicit else None
    sharding = getattr(leaf, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def pinned(
    x: jax.Array, spec: jax.sharding.PartitionSpec, like: jax.sharding.NamedSharding | None
) -> jax.Array:
    """``x`` laid out as ``spec`` on the mesh of ``like`` (from :func:`sharding_of`): resharded
    under ``jit`` on ``Explicit`` axes, placed otherwise; unchanged for ``like=None``."""
    if like is None:
        return x
    target = jax.NamedSharding(like.mesh, spec)
    if isinstance(like.mesh, jax.sharding.AbstractMesh):
        return jax.sharding.reshard(x, target)
    return jax.device_put(x, target)


def product_sharding(
    spec: jax.sharding.PartitionSpec, like: jax.sharding.NamedSharding | None
) -> jax.sharding.NamedSharding | None:
    """The ``out_sharding`` a contraction over split axes needs on ``Explicit`` mesh axes (which
    refuse to guess it); None elsewhere, where the result is :func:`pinned` afterwards."""
    if like is None or jax.sharding.AxisType.Explicit not in like.mesh.axis_types:
        return None
    return jax.NamedSharding(like.mesh, spec)


def quadratic_products(
    w: jax.Array,
    b: jax.Array | None,
    a: jax.Array,
    g: jax.Array,
    anchor: jax.Array,
    like: jax.sharding.NamedSharding | None,
    axes: tuple[Any, Any],
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""``Σ_t tr(X_tᵀ A_t X_t G_t)`` and ``Σ_t A_t X_t G_t`` for ``X_t = [W; b] - W̄_t``.

    Computed by blocks, ``X = [X_w; x_b]`` (kernel rows; bias row), never forming ``[W; b]``,
    so ``X_w`` keeps the kernel's layout: rows split over ``axes[0]``, columns over
    ``axes[1]`` (:func:`kronecker_axes`), on the mesh of ``like`` (:func:`sharding_of`; None:
    no layout imposed).

    Args:
      w: ``[rows, out]`` kernel rows.
      b: ``[1, out]`` bias row, or None.
      a: ``[T, rows (+ 1), rows (+ 1)]`` symmetric input factors.
      g: ``[T, out, out]`` output factors.
      anchor: ``[T, rows (+ 1), out]`` anchors.
      like: the kernel's sharding, or None.
      axes: the mesh axes of the rows and of ``out``.

    Returns:
      The quadratic, ``Σ_t A_t X_t G_t`` on the kernel rows ``[rows, out]`` and on the bias
      row ``[1, out]`` (None without a bias).
    """
    row, out = axes

    def pin(x, *spec):
        return pinned(x, _P(None, *spec), like)

    def product(subscripts, x, y, *spec):
        result = jnp.einsum(subscripts, x, y, out_sharding=product_sharding(_P(None, *spec), like))
        return pin(result, *spec)

    dtype = a.dtype
    w = pinned(w, _P(row, out), like)
    rows = w.shape[0]
    g = pin(g, out, None)
    x_w = pin(w[None] - pin(anchor[:, :rows].astype(dtype), row, out), row, out)
    ax_w = product("tji,tjk->tik", pin(a[:, :rows, :rows], row, None), x_w, row, out)
    if b is not None:
        x_b = pin(b[None] - pin(anchor[:, rows:].astype(dtype), None, out), None, out)
        ax_w = ax_w + product("tji,tjk->tik", pin(a[:, rows:, :rows], None, None), x_b, row, out)
        ax_b = product("tji,tjk->tik", pin(a[:, :rows, rows:], row, None), x_w, None, out)
        ax_b = ax_b + pin(a[:, rows:, rows:], None, None) * x_b
    y_w = product("tik,tkl->til", ax_w, g, row, out)
    quad = jnp.sum(x_w * y_w)
    if b is None:
        return quad, jnp.sum(y_w, axis=0), None
    y_b = product("tik,tkl->til", ax_b, g, None, out)
    return quad + jnp.sum(x_b * y_b), jnp.sum(y_w, axis=0), jnp.sum(y_b, axis=0)
