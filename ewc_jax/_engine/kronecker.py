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
    sharding: jax.sharding.NamedSharding,
    shape: tuple[int, ...],
    kernel_axes: tuple[int, ...],
    out: int,
) -> tuple[Any, Any]:
    """The mesh axes (a ``PartitionSpec`` entry each) that split a layer's kernel rows ``W̄``
    (input, then spatial axes, input-major) and its ``out`` columns, read from the kernel's
    sharding. The kernel, transposed to ``kernel_axes``, flattens into ``[rows, out]``: its
    trailing axes whose sizes multiply to ``out`` are the columns (one for a Dense or conv
    kernel, ``(H, Dh)`` for attention's ``[D, H, Dh]``), the others the rows. A group flattened
    row-major stays in contiguous blocks only when its leading axis alone is split, so a group
    with another axis split counts as whole."""
    spec = (*sharding.spec, *([None] * (len(shape) - len(sharding.spec))))
    n_out, size = 0, 1
    while size != out and n_out < len(kernel_axes):
        n_out += 1
        size *= shape[kernel_axes[-n_out]]
    groups = (kernel_axes[: len(kernel_axes) - n_out], kernel_axes[len(kernel_axes) - n_out :])
    return tuple(
        None if not group or any(spec[a] is not None for a in group[1:]) else spec[group[0]]
        for group in groups
    )


def kronecker_specs(
    sharding: jax.sharding.NamedSharding,
    shape: tuple[int, ...],
    kernel_axes: tuple[int, ...],
    out: int,
    bias: bool,
) -> tuple[jax.sharding.PartitionSpec, jax.sharding.PartitionSpec, jax.sharding.PartitionSpec]:
    """How a layer's ``A`` (``[rows, rows]``), ``G`` (``[out, out]``) and anchor ``W̄``
    (``[rows, out]``) are kept, from its kernel's sharding (:func:`kronecker_axes`).

    ``A``'s first axis and ``W̄``'s rows are split like the kernel's input axis, ``G``'s first
    axis and ``W̄``'s columns like its output axis, so that the penalty's ``Aᵀ X`` and ``X G``
    contract a split axis with the same split axis (partial sums and a reduction, never a
    gather of ``X``; ``A`` is symmetric). With a bias the rows stay whole: ``[W; b]`` has
    ``rows + 1`` rows, which the ``n > 1`` devices that split ``rows`` cannot split evenly.
    """
    row, column = kronecker_axes(sharding, shape, kernel_axes, out)
    if bias:
        row = None
    return _P(row, None), _P(column, None), _P(row, column)


def layer_specs(
    kernel: jax.Array, kernel_axes: tuple[int, ...], out: int, bias: bool
) -> tuple[jax.sharding.NamedSharding | None, tuple[_P, _P, _P]]:
    """The kernel's sharding (:func:`sharding_of`; None: no layout) and the ``A``, ``G`` and
    anchor specs a state keeps for its layer (:func:`kronecker_specs`)."""
    like = sharding_of(kernel)
    if like is None:
        return None, (_P(None, None),) * 3
    return like, kronecker_specs(like, kernel.shape, kernel_axes, out, bias)


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


def reshaped(
    x: jax.Array, shape: tuple[int, ...], spec: Any, like: jax.sharding.NamedSharding | None
) -> jax.Array:
    """``x`` reshaped to ``shape`` and laid out as ``spec`` (:func:`pinned`). On ``Explicit``
    axes a reshape that merges or splits a split axis (a ``[D, H, Dh]`` kernel split along
    ``H`` into ``[D, H·Dh]`` rows, and back) must be told the layout of its result."""
    spec = spec if isinstance(spec, jax.sharding.PartitionSpec) else _P(*spec)
    x = jnp.reshape(x, shape, out_sharding=product_sharding(spec, like))
    return pinned(x, spec, like)


def leaf_spec(leaf: Any) -> tuple[Any, ...]:
    """A leaf's ``PartitionSpec`` entries, one per axis (None: not split, or no layout)."""
    sharding = sharding_of(leaf)
    spec = () if sharding is None else tuple(sharding.spec)
    return (*spec, *([None] * (jnp.ndim(leaf) - len(spec))))


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


def kernel_rows(leaves: list[Any], layer: Any, dtype: Any, spec: Any, like: Any) -> jax.Array:
    """A layer's kernel (of ``KroneckerFactors`` or ``KroneckerTerms``) as rows ``W̄``,
    ``[rows, out]``:
    transposed to its ``kernel_axes`` and flattened, laid out as ``spec``."""
    w = jnp.transpose(leaves[layer.kernel].astype(dtype), layer.kernel_axes)
    return reshaped(w, (-1, layer.g.shape[-1]), spec, like)


def augmented(leaves: list[Any], layer: Any, dtype: Any) -> jax.Array:
    """``[W; b]`` (``[in + 1, out]``), or ``W`` for a layer without bias, in ``dtype``, laid out
    as the state keeps its anchor: the kernel transposed to ``kernel_axes`` and reshaped to
    ``out = g.shape[-1]`` columns (a kernel with several output axes, ``[D, H, Dh]``, gives
    ``[D, H·Dh]``). With a bias the rows are whole (``in + 1`` rows split over no mesh axis): a
    kernel split along its input axis is gathered here, once per consolidation."""
    kernel, bias, axes, out = layer.kernel, layer.bias, layer.kernel_axes, layer.g.shape[-1]
    like, (_, _, spec) = layer_specs(leaves[kernel], axes, out, bias is not None)
    w = kernel_rows(leaves, layer, dtype, spec, like)
    if bias is None:
        return w
    row = reshaped(leaves[bias].astype(dtype), (1, out), (None, spec[1]), like)
    return pinned(jnp.concatenate([w, row], axis=0), spec, like)
