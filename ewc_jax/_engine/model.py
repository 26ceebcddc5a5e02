"""The model as the estimators see it: ``apply_fn`` with the shapes of its params and one example.

Checks of ``params`` and of the logits' shape live here, once, for the Fisher, MAS and K-FAC.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._types import ApplyFn, Params, PyTree


class Static:
    """Wraps ``apply_fn`` so it can be a static jit argument, compared by identity."""

    def __init__(self, fn: ApplyFn):
        self.fn = fn

    def __hash__(self) -> int:
        try:
            return hash(self.fn)
        except TypeError:
            return id(getattr(self.fn, "__func__", self.fn))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Static) and self.fn == other.fn


def with_state(apply_fn: Callable[..., jax.Array], model_state: PyTree | None) -> ApplyFn:
    """``apply_fn`` itself, or ``(params, x) -> apply_fn(params, model_state, x)``."""
    if model_state is None:
        return apply_fn
    return lambda params, x: apply_fn(params, model_state, x)


def check_params(params: Params) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params has no array leaves.")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; the "
                "Fisher is defined for floating-point parameters only."
            )


@dataclasses.dataclass(frozen=True)
class Model:
    """``apply_fn`` with the shapes and dtypes of its params and of one example: hashable, so
    what is derived from it (output shape, path choice) is traced once, not on every call."""

    fn: Static
    params_def: Any
    params: tuple[jax.ShapeDtypeStruct, ...]
    inputs_def: Any
    example: tuple[jax.ShapeDtypeStruct, ...]
    state_def: Any = None
    state: tuple[jax.ShapeDtypeStruct, ...] | None = None  # None: no model_state

    @classmethod
    def of(
        cls, apply_fn: ApplyFn, params: Params, inputs: PyTree, model_state: PyTree = None
    ) -> Model:
        spec = lambda a, lead: jax.ShapeDtypeStruct(np.shape(a)[lead:], jnp.result_type(a))
        params_leaves, params_def = jax.tree.flatten(params)
        input_leaves, inputs_def = jax.tree.flatten(inputs)
        state_leaves, state_def = jax.tree.flatten(model_state)
        return cls(
            Static(apply_fn),
            params_def,
            tuple(spec(p, 0) for p in params_leaves),
            inputs_def,
            tuple(spec(x, 1) for x in input_leaves),
            state_def,
            None if model_state is None else tuple(spec(s, 0) for s in state_leaves),
        )

    def shape_fn(self) -> ApplyFn:
        """``(params, x) -> logits`` for tracing shapes; ``model_state`` becomes zeros."""
        if self.state is None:
            return self.fn.fn
        zeros = lambda: [jnp.zeros(s.shape, s.dtype) for s in self.state]
        return lambda p, x: self.fn.fn(p, jax.tree.unflatten(self.state_def, zeros()), x)

    def params_tree(self) -> PyTree:
        return jax.tree.unflatten(self.params_def, self.params)

    def example_tree(self, batch: int | None = None) -> PyTree:
        leaves = self.example
        if batch is not None:
            leaves = tuple(jax.ShapeDtypeStruct((batch, *x.shape), x.dtype) for x in leaves)
        return jax.tree.unflatten(self.inputs_def, leaves)


@functools.lru_cache(maxsize=256)
def output_shape(model: Model) -> tuple[tuple[int, ...], int]:
    """``(token shape S, classes C)`` of the logits ``[B, *S, C]`` ``apply_fn`` returns."""
    out = jax.eval_shape(model.shape_fn(), model.params_tree(), model.example_tree(batch=2))
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] != 2:
        raise ValueError(
            "apply_fn must return logits of shape [B, C] (or [B, T, C] for sequences); for a "
            f"batch of 2 it returned {shape}. For a multi-head model, pass an apply_fn that "
            "selects one head."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"apply_fn must return floating-point logits, got dtype {out.dtype}.")
    return tuple(int(d) for d in shape[1:-1]), int(shape[-1])


def check_classes(num_classes: int) -> None:
    """Refuses one logit per example: a softmax over one class is constant, its Fisher zero."""
    if num_classes == 1:
        raise ValueError(
            "apply_fn returns one logit per example ([B, 1]): a softmax over one class has zero "
            "gradient, so the Fisher would be zero. For a binary model return two logits, "
            "e.g. jnp.concatenate([jnp.zeros_like(z), z], axis=-1) (the same Bernoulli "
            "likelihood, sigmoid(z))."
        )


def per_example_logits(apply_fn: ApplyFn, params: Params, x: PyTree) -> jax.Array:
    """The logits of one example (no batch axis)."""
    return apply_fn(params, jax.tree.map(lambda a: a[None], x))[0]
