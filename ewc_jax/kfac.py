r"""Kronecker-factored (K-FAC) EWC: a block ``A ⊗ G`` per Dense or Conv kernel, diagonal elsewhere.

.. math::
    F_{W} \approx A \otimes G,\quad A = \mathbb{E}[a a^\top],\quad
    G = \mathbb{E}[g g^\top]

A :class:`KFACState` is a :class:`ewc_jax.Precision`: :func:`ewc_jax.consolidate`,
:func:`ewc_jax.penalty`, :func:`ewc_jax.add_ewc_penalty` and :func:`ewc_jax.set_ewc_state` take
it wherever they take an :class:`ewc_jax.EWCState`.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
  ICML 2015; Ritter, Botev & Barber, "Online Structured Laplace Approximations for Overcoming
  Catastrophic Forgetting", NeurIPS 2018.
"""

from ewc_jax._kfac import KFAC_ESTIMATORS as KFAC_ESTIMATORS
from ewc_jax._kfac import KFACEstimator as KFACEstimator
from ewc_jax._kfac import KFACFisher as KFACFisher
from ewc_jax._kfac import KFACState as KFACState
from ewc_jax._kfac import KroneckerFactors as KroneckerFactors
from ewc_jax._kfac import KroneckerTerms as KroneckerTerms
from ewc_jax._kfac import kfac_fisher as kfac_fisher
from ewc_jax._kfac import merge_kronecker_terms as merge_kronecker_terms

__all__ = [
    "KFAC_ESTIMATORS",
    "KFACEstimator",
    "KFACFisher",
    "KFACState",
    "KroneckerFactors",
    "KroneckerTerms",
    "kfac_fisher",
    "merge_kronecker_terms",
]
