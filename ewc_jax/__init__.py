"""ewc_jax: Elastic Weight Consolidation in JAX.

The whole method in a few names::

    fisher = ewc_jax.fisher_diagonal(model.apply, params, x_a, estimator="exact")
    state = ewc_jax.consolidate(None, params, fisher)           # after task A
    loss = task_b_loss(params) + ewc_jax.penalty(params, state, strength=2000.0)

or, as an Optax transformation::

    tx = optax.chain(ewc_jax.add_ewc_penalty(2000.0), optax.sgd(1e-3))
    opt_state = ewc_jax.set_ewc_state(tx.init(params), state)

Kronecker-factored precisions live in :mod:`ewc_jax.kfac`, the other importances (MAS, SI) in
:mod:`ewc_jax.importance`, the strength from the Laplace evidence in :mod:`ewc_jax.evidence`.

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
"""

import warnings as _warnings

from ewc_jax import _consolidation, _fisher
from ewc_jax import evidence as evidence
from ewc_jax import importance as importance
from ewc_jax import kfac as kfac
from ewc_jax._consolidation import EWCState as EWCState
from ewc_jax._consolidation import consolidate as consolidate
from ewc_jax._consolidation import empty_state as empty_state
from ewc_jax._consolidation import penalty as penalty
from ewc_jax._fisher import Estimator as Estimator
from ewc_jax._fisher import fisher_diagonal as fisher_diagonal
from ewc_jax._precision import ConsolidationMode as ConsolidationMode
from ewc_jax._precision import Precision as Precision
from ewc_jax._transform import AddEWCPenaltyState as AddEWCPenaltyState
from ewc_jax._transform import add_ewc_penalty as add_ewc_penalty
from ewc_jax._transform import set_ewc_state as set_ewc_state
from ewc_jax._validation import checks_enabled as checks_enabled

__version__ = "0.2.0"

__all__ = [
    "AddEWCPenaltyState",
    "ConsolidationMode",
    "EWCState",
    "Estimator",
    "Precision",
    "add_ewc_penalty",
    "checks_enabled",
    "consolidate",
    "empty_state",
    "evidence",
    "fisher_diagonal",
    "importance",
    "kfac",
    "penalty",
    "set_ewc_state",
]

# The 0.1 root names, each with its new spelling; they resolve for one more release (0.2.x).
_MOVED = {
    "ESTIMATORS": ("typing.get_args(ewc_jax.Estimator)", lambda: _fisher.ESTIMATORS),
    "CONSOLIDATION_MODES": (
        "typing.get_args(ewc_jax.ConsolidationMode)",
        lambda: _consolidation.CONSOLIDATION_MODES,
    ),
    **{
        name: (f"ewc_jax.kfac.{name}", lambda name=name: getattr(kfac, name))
        for name in (
            "KFAC_ESTIMATORS",
            "KFACFisher",
            "KFACState",
            "KroneckerFactors",
            "KroneckerTerms",
            "kfac_fisher",
            "merge_kronecker_terms",
        )
    },
    **{
        name: (f"ewc_jax.importance.{name}", lambda name=name: getattr(importance, name))
        for name in ("mas_importance", "si_importance", "si_path_integral", "SIState")
    },
}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        new, value = _MOVED[name]
        _warnings.warn(
            f"ewc_jax.{name} is deprecated since 0.2.0 and goes in 0.3.0; use {new}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value()
    raise AttributeError(f"module 'ewc_jax' has no attribute {name!r}")
