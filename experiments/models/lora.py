r"""Low-rank adapters (Hu et al. 2021) for the language model's Dense layers.

A layer ``y = W x`` with an adapter computes

.. math:: y = W x + \frac{α}{r} B A x,

``A`` (``r × in``) drawn small at random, ``B`` (``out × r``) zero, so the adapted model starts
equal to the base. :class:`LoRADotGeneral` is the contraction a Flax ``Dense`` or
``DenseGeneral`` takes as ``dot_general_cls`` (attention's ``qkv_dot_general_cls`` and
``out_dot_general_cls``): the layer keeps its own ``kernel`` and ``bias`` exactly where and as
they were, and the adapter's two factors live in a sub-module ``lora`` of it
(``.../query/lora/a``, ``.../query/lora/b``). :func:`adapter_mask` selects them, as
``optax.masked`` and the library's ``where=`` take it.

In the continual runs (``config.lora_rank > 0``) the first task trains the base with the
adapters frozen at ``B = 0`` and every later task trains only the adapters, the base frozen
(:func:`keep_frozen`); the EWC state covers the adapters only (``where=adapter_mask``).

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, functools
    >>> layer = nn.Dense(3, dot_general_cls=functools.partial(LoRADotGeneral, 2, 2.0, name="lora"))
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> jax.tree.map(jnp.shape, params)
    {'bias': (3,), 'kernel': (4, 3), 'lora': {'a': (4, 2), 'b': (2, 3)}}

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
    (arXiv:2106.09685).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTER = "lora"
"""The name of every adapter's sub-module; :func:`adapter_mask` selects the leaves under it."""


class LoRADotGeneral(nn.Module):
    r"""``lax.dot_general(x, W) + (α / r) (x A) B``: a Dense layer's contraction with an adapter.

    ``A`` has the kernel's contracted (input) axes then ``r``, initialised
    :math:`\mathcal N(0, 1/\mathrm{fan\_in})`; ``B`` has ``r`` then the kernel's output axes,
    initialised to zero.

    Attributes:
        rank: ``r``.
        alpha: ``α``; the update is scaled by ``α / r``.
    """

    rank: int
    alpha: float

    @nn.compact
    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
        if lhs_batch or rhs_batch:
            raise ValueError("a low-rank adapter takes a kernel without batch axes")
        base = jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
        )
        in_shape = tuple(rhs.shape[axis] for axis in rhs_contract)
        out_shape = tuple(n for axis, n in enumerate(rhs.shape) if axis not in rhs_contract)
        scale = 1.0 / math.sqrt(math.prod(in_shape))
        a = self.param("a", nn.initializers.normal(scale), (*in_shape, self.rank), rhs.dtype)
        b = self.param("b", nn.initializers.zeros, (self.rank, *out_shape), rhs.dtype)
        down = jax.lax.dot_general(
            lhs, a, ((lhs_contract, tuple(range(len(in_shape)))), ((), ())), precision
        )
        up = jax.lax.dot_general(down, b, (((down.ndim - 1,), (0,)), ((), ())), precision)
        return base + (self.alpha / self.rank) * up


def adapter(rank: int, alpha: float) -> Any:
    """The ``dot_general_cls`` of a Dense layer with a rank-``rank`` adapter, or None for 0."""
    if rank == 0:
        return None
    return functools.partial(LoRADotGeneral, rank, alpha, name=ADAPTER)


def adapter_mask(params: Any) -> Any:
    """True on the adapters' leaves (under a ``lora`` sub-module), False on the base's: the
    ``where=`` of the EWC state and the trainable part of every task after the first.

    Example:
        >>> adapter_mask({"kernel": 0.0, "lora": {"a": 0.0, "b": 0.0}})
        {'kernel': False, 'lora': {'a': True, 'b': True}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(key, "key", None) == ADAPTER for key in path), params
    )


def keep_frozen(old: Any, new: Any, adapters_train: jax.Array) -> Any:
    """``new`` on the trainable part, ``old`` (bit for bit) on the frozen one.

    Args:
        old: the parameters before the step.
        new: the parameters after the optimiser's step.
        adapters_train: a boolean scalar (traced): True trains the adapters with the base
            frozen (every task after the first), False the base with the adapters frozen.
    """
    return jax.tree.map(
        lambda is_adapter, o, n: jnp.where(adapters_train == is_adapter, n, o),
        adapter_mask(old),
        old,
        new,
    )
