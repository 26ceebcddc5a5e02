"""A run whose training loss became NaN or infinite: the error and its message."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.training import steps
from experiments.training.methods import MethodSpec


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def divergence_message(
    method: MethodSpec, learning_rate: float, optimizer: str, arrays: steps.TrainState, task: int
) -> str:
    """Why a single run's loss became non-finite on ``task`` (0-based), and what to change."""
    message = f"{method.name}: the training loss became non-finite on task {task + 1}"
    if method.regularized and int(arrays.ewc_state.num_tasks) > 0:
        ewc = arrays.ewc_state
        # K-FAC: the diagonal of each layer's A ⊗ G besides the uncovered parameters' precision.
        diagonals = [
            jnp.diagonal(t.a[-1])[:, None] * jnp.diagonal(t.g[-1])[None]
            for t in getattr(ewc, "layers", ())
        ]
        ewc = getattr(ewc, "diagonal", ewc)
        top = max(float(jnp.max(p)) for p in jax.tree.leaves(ewc.precision) + diagonals)
        # Plain gradient descent on λ/2·Λ·θ² is stable only while lr·λ·Λ < 2.
        product = learning_rate * method.strength * top
        message += (
            f"; learning_rate * strength * max precision = {learning_rate:g} * "
            f"{method.strength:g} * {top:.3g} = {product:.3g}"
        )
        if optimizer == "sgd" and product >= 2:
            message += " >= 2, so SGD on the penalty diverges"
        message += ": lower the strength or the learning rate"
    return message + "."
