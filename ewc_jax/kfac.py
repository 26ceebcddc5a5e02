"""Kronecker-factored (K-FAC) EWC: a block ``A ⊗ G`` per Dense or Conv kernel, diagonal elsewhere.

.. math::
    F_{W} \\approx A \\otimes G,\\quad A = \\mathbb{E}[a a^\\top],\\quad
    G = \\mathbb{E}[g g^\\top]

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
  ICML 2015; Ritter, Botev & Barber, "Online Structured Laplace Approximations for Overcoming
  Catastrophic Forgetting", NeurIPS 2018.
"""

from ewc_jax._kfac import KFAC_ESTIMATORS as KFAC_ESTIMATORS
from ewc_jax._kfac import KFACFisher as KFACFisher
from ewc_jax._kfac import KFACState as KFACState
from ewc_jax._kfac import KroneckerFactors as KroneckerFactors
from ewc_jax._kfac import KroneckerTerms as KroneckerTerms
from ewc_jax._kfac import kfac_fisher as kfac_fisher
from ewc_jax._kfac import merge_kronecker_terms as merge_kronecker_terms
