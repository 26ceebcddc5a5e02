"""Checks that turn bad input into errors that say what was wrong and what to do.

A value known when the check runs (a Python float, an array outside ``jax.jit``) is checked at
once and a bad one raises ``ValueError``. A traced value (inside ``jax.jit``, ``jax.vmap``,
``jax.grad``) is checked when the compiled program runs, with ``equinox.error_if``: the program
then fails with the same message. Both messages start with the same text; the immediate one
adds the offending value.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax._types import PyTree

_RUNTIME_CHECKS = contextvars.ContextVar("ewc_jax_runtime_checks", default=True)


@contextlib.contextmanager
def checks_enabled(enabled: bool) -> Iterator[None]:
    """Turns the run-time value checks of traced code on or off inside a ``with`` block.

    Values that are concrete when a function is called (a Python float strength, arrays
    outside ``jax.jit``) are always checked: that costs nothing in compiled code. Traced values
    (``strength``, ``gamma``, labels, Fisher, params, inputs and logits inside ``jax.jit`` or
    ``jax.vmap``) are checked by the compiled program with ``equinox.error_if``; inside
    ``with ewc_jax.checks_enabled(False):`` no such check is traced in.

    The switch acts when code is *traced*: a function that ``jax.jit`` compiled before keeps
    what it was traced with, so enter the block before the first call of a jitted step::

        with ewc_jax.checks_enabled(False):
            state, loss = train_step(state, batch)  # traced and compiled without checks

    ``fisher_diagonal`` keys its own compiled program on the switch, so it follows it on every
    call. Setting ``EQX_ON_ERROR=off`` in the environment turns off every equinox check, these
    included.

    Args:
      enabled: whether traced values are checked.

    Yields:
      None.

    Example:
      >>> import jax, jax.numpy as jnp, ewc_jax
      >>> state = ewc_jax.consolidate(None, {"w": jnp.zeros(1)}, {"w": jnp.ones(1)})
      >>> with ewc_jax.checks_enabled(False):  # traced without the strength check
      ...     value = jax.jit(lambda s: ewc_jax.penalty({"w": jnp.ones(1)}, state, s))(-1.0)
      >>> float(value)  # a negative strength, unchecked: ½ · (-1) · 1 · 1²
      -0.5
    """
    token = _RUNTIME_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _RUNTIME_CHECKS.reset(token)


def runtime_checks() -> bool:
    """Whether traced values are checked here (see :func:`checks_enabled`)."""
    return _RUNTIME_CHECKS.get()


def is_traced(tree: PyTree) -> bool:
    """Whether any leaf of ``tree`` is a tracer (its value is unknown until run time)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


Failure = tuple[Any, str, Callable[[], str]]
"""``(predicate, message, detail)``: a bool (or traced bool scalar) that is True when the value
is bad, the message both ways, and what to add to it when the value is known (``", got -1."``)."""


def fail_if(x: PyTree, failures: Sequence[Failure], *, every_leaf: bool = False) -> PyTree:
    """Returns ``x``; raises for the first failure whose predicate holds.

    Concrete predicates raise ``ValueError(message + detail())`` now. Traced predicates are
    combined into one ``equinox.branched_error_if`` (a ``lax.cond`` whose failing branch is a
    host callback) threaded through the smallest array leaf of ``x``: the compiled program fails
    with ``message + "."`` of the first that holds. Thread it through a result (the penalty, the
    new precision, the Fisher), not an input: the check then waits for the computation rather
    than the computation for the check, and a result is not compiled away. Under ``jax.vmap`` a
    failure in any batch member fails the whole call. ``every_leaf=True`` threads it through
    every leaf instead: whatever uses any of them waits for the check.
    """
    traced = []
    for pred, message, detail in failures:
        if isinstance(pred, jax.core.Tracer):
            traced.append((pred, message))
        elif bool(pred):
            raise ValueError(message + detail())
    leaves, treedef = jax.tree.flatten(x)
    if not traced or not runtime_checks() or not leaves:
        return x
    preds = jnp.stack([jnp.asarray(p, jnp.bool_).reshape(()) for p, _ in traced])
    messages = [message + "." for _, message in traced]
    if every_leaf:
        return eqx.branched_error_if(x, jnp.any(preds), jnp.argmax(preds), messages)
    i = min(range(len(leaves)), key=lambda j: np.size(leaves[j]))
    leaves[i] = eqx.branched_error_if(leaves[i], jnp.any(preds), jnp.argmax(preds), messages)
    return jax.tree.unflatten(treedef, leaves)


def holds(predicate: Callable[..., Any], *values: Any) -> Any:
    """``predicate(*values)`` as a Python bool when the values are concrete (evaluated now, even
    inside a trace), else as a traced bool scalar."""
    if is_traced(values):
        return predicate(*values)
    with jax.ensure_compile_time_eval():
        return bool(predicate(*values))


def concrete_or_none(x: Any) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array, or None when it is a tracer (value unknown under jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_same_structure(reference: PyTree, other: PyTree, ref_name: str, other_name: str) -> None:
    """Raises ValueError naming the first path where two trees differ in structure or shape."""
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
    if ref_def != oth_def:
        ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
        oth_paths = [jax.tree_util.keystr(p) for p, _ in oth_leaves]
        for i in range(max(len(ref_paths), len(oth_paths))):
            a = ref_paths[i] if i < len(ref_paths) else "<missing>"
            b = oth_paths[i] if i < len(oth_paths) else "<missing>"
            if a != b:
                raise ValueError(
                    f"{other_name} does not have the tree structure of {ref_name}: first "
                    f"difference at leaf {i}: {ref_name} has {a}, {other_name} has {b}. Build "
                    f"{other_name} from the same parameters (e.g. jax.tree.map over {ref_name})."
                )
        raise ValueError(
            f"{other_name} does not have the tree structure of {ref_name} (same leaf paths, "
            f"different node types: {ref_def} vs {oth_def})."
        )
    for (path, a), (_, b) in zip(ref_leaves, oth_leaves, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{other_name} and {ref_name} differ in shape at {jax.tree_util.keystr(path)}: "
                f"{np.shape(b)} vs {np.shape(a)}."
            )


def non_finite(tree: PyTree, name: str, why: str) -> list[Failure]:
    """Failures for NaN/Inf, one per floating-point leaf of ``tree``, in leaf order.

    Each reads ``"{name}{path} has non-finite values (NaN or Inf); {why}"``, e.g.
    ``inputs['image'] has non-finite values``; known values add how many are bad.
    """
    failures = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        bad = holds(lambda a: jnp.logical_not(jnp.all(jnp.isfinite(a))), leaf)
        message = f"{name}{jax.tree_util.keystr(path)} has non-finite values (NaN or Inf); {why}"
        failures.append((bad, message, lambda leaf=leaf: f" ({_count_non_finite(leaf)})."))
    return failures


def _count_non_finite(leaf: Any) -> str:
    finite = np.isfinite(np.asarray(leaf))
    return f"{finite.size - np.count_nonzero(finite)} of {finite.size} values"


def _outside_unit_interval(v: Any) -> Any:
    v = jnp.asarray(v)
    return jnp.logical_not((v >= 0) & (v <= 1))


def _negative_or_non_finite(v: Any) -> Any:
    v = jnp.asarray(v)
    return jnp.logical_not(jnp.isfinite(v) & (v >= 0))


def outside_unit_interval(value: Any, name: str) -> list[Failure]:
    """A failure unless ``value`` is a scalar in [0, 1]."""
    message = f"{name} must be a scalar in [0, 1]"
    if np.shape(value) != ():
        raise ValueError(f"{message}, got an array of shape {np.shape(value)}.")
    bad = holds(_outside_unit_interval, value)
    return [(bad, message, lambda: f", got {value!r}.")]


def negative_or_non_finite(value: Any, name: str) -> list[Failure]:
    """A failure unless ``value`` is a finite scalar >= 0."""
    message = f"{name} must be a finite scalar >= 0"
    if np.shape(value) != ():
        raise ValueError(f"{message}, got an array of shape {np.shape(value)}.")
    bad = holds(_negative_or_non_finite, value)
    return [(bad, message, lambda: f", got {value!r}.")]


def check_trainable_only(params: PyTree) -> None:
    """Refuses a params tree that holds non-trainable model state (batch statistics, RNG state).

    Such leaves would get a Fisher, and then a precision that the penalty holds although no
    optimiser trains them. Two ways this happens: a whole Linen ``variables`` dict (``"params"``
    next to ``"batch_stats"`` etc.), and ``nnx.split(model)`` of a model with ``BatchNorm`` or
    ``Dropout(rngs=...)`` (``BatchStat``, ``RngKey``, ``RngCount`` variables).
    """
    if isinstance(params, Mapping) and "params" in params and len(params) > 1:
        others = ", ".join(repr(k) for k in params if k != "params")
        raise ValueError(
            f"params looks like a whole Linen variables dict ('params' next to {others}): only "
            "trainable parameters get a Fisher. Pass params=variables['params'], "
            "model_state={k: v for k, v in variables.items() if k != 'params'} and "
            "apply_fn=lambda p, s, x: model.apply({'params': p, **s}, x)."
        )
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return
    is_variable = lambda x: isinstance(x, nnx.Variable)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]:
        if is_variable(leaf) and not isinstance(leaf, nnx.Param):
            raise ValueError(
                f"params holds an NNX {type(leaf).__name__} at {jax.tree_util.keystr(path)}, "
                "not an nnx.Param: only trainable parameters get a Fisher. Split them off with "
                "graphdef, params, rest = nnx.split(model, nnx.Param, ...) and pass params, "
                "model_state=rest and apply_fn=lambda p, s, x: nnx.merge(graphdef, p, s)(x)."
            )
