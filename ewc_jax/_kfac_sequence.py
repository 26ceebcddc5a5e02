r"""K-FAC-expand and K-FAC-reduce: Kronecker factors of a Dense layer applied over extra axes.

A Dense layer applied at every position ``t`` of an example (``[B, T, D]`` inputs, Flax
``Dense``/``DenseGeneral``, or ``x @ W`` in plain JAX; a kernel with several input or output
axes, ``[H, Dh, D]`` or ``[D, H, Dh]``, read as ``[prod(in), prod(out)]``) computes
``z_{nt} = a_{nt} W`` with one kernel shared by the ``T`` positions, so its per-example
gradient ``Σ_t a_{nt} g_{nt}^\top`` is a sum of outer products, not one. Eschenhagen et al.
(2023) give two Kronecker approximations of its Fisher (= GGN for the softmax likelihood)
block, each exact for deep linear networks in its own setting:

* **expand** (positions as extra examples; exact when the loss is a sum of one term per
  position and positions do not interact, as for a per-token loss):

  .. math:: A = \frac{1}{\sum_{n,t} m_{nt}} \sum_{n,t} m_{nt}\, ā_{nt} ā_{nt}^\top,\qquad
            G = \frac1N \sum_n \sum_t m_{nt}\, \mathbb{E}_{y}\big[g_{nt} g_{nt}^\top\big]

* **reduce** (one term per example after the positions are averaged; exact when the loss
  is a function of the mean over positions, as for a sequence classifier):

  .. math:: â_n = \frac{\sum_t m_{nt} ā_{nt}}{\sum_t m_{nt}},\quad
            ĝ_n = \sum_t m_{nt} g_{nt},\qquad
            A = \frac{1}{N'} \sum_n â_n â_n^\top,\qquad
            G = \frac1N \sum_n \mathbb{E}_{y}\big[ĝ_n ĝ_n^\top\big]

where ``g_{nt} = ∂ \log p(y_n | x_n) / ∂ z_{nt}`` (the log-likelihood of the whole example:
for ``[B, T, C]`` logits the sum of the counted tokens' terms), ``ā = [a; 1]`` for a layer with
a bias, ``m`` the token mask (all ones without one) and ``N'`` the number of examples with at
least one counted position. The paper's sums over the data set are ``N`` times these: the
library's Fisher is a mean over examples, as :func:`ewc_jax.fisher_diagonal`'s is. ``A`` is
normalised by what it averages (counted positions for expand, counted examples for reduce) and
``G`` by ``N``, so that in the exact settings ``A ⊗ G`` equals the mean GGN block:
:math:`\frac1N \sum_{n,t} m_{nt} J_{nt}^\top Λ_{nt} J_{nt}`.

References:
  Eschenhagen, Immer, Turner, Schneider & Hennig, "Kronecker-Factored Approximate Curvature for
  Modern Neural Network Architectures", NeurIPS 2023 (K-FAC-expand, Eq. 7; K-FAC-reduce,
  Eq. 10; exactness for deep linear networks, Props. 1 and 2).
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeAlias, get_args

import jax
import jax.numpy as jnp

from ewc_jax._engine.plan import Node, Plan, Tap

SequenceMode: TypeAlias = Literal["expand", "reduce"]
"""How :func:`ewc_jax.kfac.kfac_fisher` factors a Dense layer applied over extra axes:
``"expand"`` (positions as extra examples) or ``"reduce"`` (positions averaged first)."""

SEQUENCE_MODES: tuple[SequenceMode, ...] = get_args(SequenceMode)
"""The values of :data:`SequenceMode`, as a tuple."""


def check_sequence(sequence: object) -> None:
    if sequence not in SEQUENCE_MODES:
        raise ValueError(
            f"Unknown sequence {sequence!r} for K-FAC; valid values: {SEQUENCE_MODES} "
            "(Eschenhagen et al. 2023's K-FAC-expand and K-FAC-reduce)."
        )


def dense_split(node: Node) -> tuple[tuple[int, ...], int] | None:
    """``(P, k)`` when the node is a Dense layer ``x [1, *P, *in] @ W [*in, *out]`` (the
    per-example program has a batch axis of 1): the kernel, the right operand, contracted over
    its ``k`` leading axes with the input's ``k`` trailing ones, with at least one output axis
    left (Flax ``Dense``; ``DenseGeneral(out, axis=(-2, -1))``, attention's output projection
    ``[H, Dh, D]``; ``DenseGeneral((H, Dh))``, its ``q``/``k``/``v`` projections ``[D, H, Dh]``);
    ``P`` is empty for a layer applied once per example. None for any other operation."""
    if node.eqn.primitive.name != "dot_general":
        return None
    (contract_l, contract_r), batch = node.eqn.params["dimension_numbers"]
    x_shape, w_shape = node.inputs[0].aval.shape, node.inputs[1].aval.shape
    k = len(contract_r)
    if (
        batch != ((), ())
        or not 1 <= k < len(w_shape)
        or len(x_shape) < k + 1
        or x_shape[0] != 1
        or tuple(contract_l) != tuple(range(len(x_shape) - k, len(x_shape)))
        or tuple(contract_r) != tuple(range(k))
    ):
        return None
    return tuple(int(d) for d in x_shape[1 : len(x_shape) - k]), k


def positions(node: Node) -> tuple[int, ...] | None:
    """The extra axes ``P`` of a Dense layer applied over ``x [1, *P, *in]`` (see
    :func:`dense_split`), or None for a layer applied once per example or any other
    operation."""
    split = dense_split(node)
    if split is None or not split[0]:
        return None
    return split[0]


def dense_kernel(plan: Plan, tap: Tap) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``((0, ..., ndim - 1), out shape)`` when the tapped leaf is, unchanged, the
    ``[*in, *out]`` kernel of a Dense layer (the right operand of ``x [1, *P, *in] @ W``, with
    or without extra axes ``P``); else None. Its rows ``W̄`` are the kernel reshaped to
    ``[prod(in), prod(out)]``."""
    node = plan.nodes[tap.node]
    split = dense_split(node)
    shape = plan.inputs[tap.leaf].aval.shape
    if tap.operand != 1 or split is None or shape != node.inputs[1].aval.shape:
        return None
    return tuple(range(len(shape))), tuple(int(d) for d in shape[split[1] :])


def position_weights(
    node: Node, mask: jax.Array | None, token_shape: tuple[int, ...], batch: int, dtype: Any
) -> jax.Array:
    """``[B, S]``: which of the layer's ``S`` positions count (the token mask where the layer's
    positions are the logits' tokens; all of them without a mask)."""
    size = math.prod(positions(node))
    if mask is None:
        return jnp.ones((batch, size), dtype)
    check_mask_fits(node, token_shape)
    return mask.reshape(batch, size).astype(dtype)


def check_mask_fits(node: Node, token_shape: tuple[int, ...]) -> None:
    """Raises ValueError unless the layer's positions are the logits' tokens (which a mask
    selects)."""
    shape = positions(node)
    if shape != token_shape:
        raise ValueError(
            f"mask has the logits' token shape {token_shape}, but a Dense layer is applied over "
            f"positions of shape {shape}; K-FAC cannot tell which of its positions to leave out."
        )


def gram(x: jax.Array, w: jax.Array, flat: bool = True) -> jax.Array:
    """``Σ_r w_r x_r x_rᵀ`` (``[d, d]``) of ``x [..., d]`` weighted by ``w [...]``.

    ``flat``: one matrix product over the rows flattened, ``(w ⊙ x)ᵀ x``. The same sum as one
    contraction over ``[B, S, d]``'s two leading axes ran about 1.5x slower on XLA's CPU backend
    for the language model's factors (``BENCHMARKS.md``, "K-FAC cost"), but it is what keeps
    factors split over devices on their layouts (the flattening merges the data-split axis with
    the positions): ``flat=False`` there.
    """
    w = w.astype(x.dtype)
    if flat:
        x = x.reshape(-1, x.shape[-1])
        return (x * w.reshape(-1, 1)).T @ x
    lead = "ns"[: x.ndim - 1]
    return jnp.einsum(f"{lead},{lead}i,{lead}j->ij", w, x, x)


def input_sum(
    a: jax.Array, m: jax.Array, weight: jax.Array, sequence: SequenceMode, flat: bool = True
) -> tuple[jax.Array, jax.Array]:
    """``(Σ ā āᵀ, count)`` of one chunk: ``a [B, S, in]``, ``m [B, S]``, ``weight [B]``."""
    w = weight.astype(a.dtype)
    if sequence == "expand":
        mw = m * w[:, None]
        return gram(a, mw, flat), jnp.sum(mw)
    counted = jnp.sum(m, axis=1)
    mean = jnp.einsum("ns,nsi->ni", m, a) / jnp.maximum(counted, 1)[:, None]
    w = w * (counted > 0).astype(w.dtype)
    return gram(mean, w, flat), jnp.sum(w)


def output_sum(
    d: jax.Array, m: jax.Array, weight: jax.Array, sequence: SequenceMode, flat: bool = True
) -> jax.Array:
    """``Σ w g gᵀ`` of one chunk and label: ``d [B, S, out]``, ``m [B, S]``, ``weight [B]``."""
    w = weight.astype(d.dtype)
    if sequence == "expand":
        return gram(d, m * w[:, None], flat)
    total = jnp.einsum("ns,nsi->ni", m, d)
    return gram(total, w, flat)
