r"""Kronecker-factored (K-FAC) EWC: a block ``A ⊗ G`` per Dense or Conv kernel, diagonal elsewhere.

Dense layers applied over extra axes (a sequence) are factored by K-FAC-expand or K-FAC-reduce
(Eschenhagen et al. 2023), selected by ``kfac_fisher(..., sequence=...)``.

.. math::
    F_{W} \approx A \otimes G,\quad A = \mathbb{E}[a a^\top],\quad
    G = \mathbb{E}[g g^\top]

A :class:`KFACState` is a :class:`ewc_jax.Precision`: :func:`ewc_jax.consolidate`,
:func:`ewc_jax.penalty`, :func:`ewc_jax.add_ewc_penalty` and :func:`ewc_jax.set_ewc_state` take
it wherever they take an :class:`ewc_jax.EWCState`.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
  ICML 2015; Ritter, Botev & Barber, "Online Structured Laplace Approximations for Overcoming
  Catastrophic Forgetting", NeurIPS 2018; Eschenhagen, Immer, Turner, Schneider & Hennig,
  "Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures", NeurIPS
  2023.
"""

from ewc_jax._kfac import KFAC_ESTIMATORS as KFAC_ESTIMATORS
from ewc_jax._kfac import KFACEstimator as KFACEstimator
from ewc_jax._kfac import kfac_fisher as kfac_fisher
from ewc_jax._kfac_merge import merge_kronecker_terms as merge_kronecker_terms
from ewc_jax._kfac_sequence import SEQUENCE_MODES as SEQUENCE_MODES
from ewc_jax._kfac_sequence import SequenceMode as SequenceMode
from ewc_jax._kfac_state import KFACFisher as KFACFisher
from ewc_jax._kfac_state import KFACState as KFACState
from ewc_jax._kfac_state import KroneckerFactors as KroneckerFactors
from ewc_jax._kfac_state import KroneckerTerms as KroneckerTerms

__all__ = [
    "KFAC_ESTIMATORS",
    "SEQUENCE_MODES",
    "KFACEstimator",
    "KFACFisher",
    "KFACState",
    "KroneckerFactors",
    "KroneckerTerms",
    "SequenceMode",
    "kfac_fisher",
    "merge_kronecker_terms",
]
