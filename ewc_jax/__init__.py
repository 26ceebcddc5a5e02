"""ewc_jax: Elastic Weight Consolidation in JAX.

The whole method in a few names::

    fisher = ewc_jax.fisher_diagonal(model.apply, params, x_a, estimator="exact")
    state = ewc_jax.consolidate(None, params, fisher)           # after task A
    loss = task_b_loss(params) + ewc_jax.penalty(params, state, strength=2000.0)

or, as an Optax transformation::

    tx = optax.chain(ewc_jax.add_ewc_penalty(2000.0), optax.sgd(1e-3))
    opt_state = ewc_jax.set_ewc_state(tx.init(params), state)

References:
  Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
"""

from ewc_jax import importance as importance
from ewc_jax import kfac as kfac
from ewc_jax._consolidation import CONSOLIDATION_MODES as CONSOLIDATION_MODES
from ewc_jax._consolidation import EWCState as EWCState
from ewc_jax._consolidation import consolidate as consolidate
from ewc_jax._consolidation import empty_state as empty_state
from ewc_jax._consolidation import penalty as penalty
from ewc_jax._fisher import ESTIMATORS as ESTIMATORS
from ewc_jax._fisher import fisher_diagonal as fisher_diagonal
from ewc_jax._kfac import KFAC_ESTIMATORS as KFAC_ESTIMATORS
from ewc_jax._kfac import KFACFisher as KFACFisher
from ewc_jax._kfac import KFACState as KFACState
from ewc_jax._kfac import KroneckerFactors as KroneckerFactors
from ewc_jax._kfac import KroneckerTerms as KroneckerTerms
from ewc_jax._kfac import kfac_fisher as kfac_fisher
from ewc_jax._kfac import merge_kronecker_terms as merge_kronecker_terms
from ewc_jax._mas import mas_importance as mas_importance
from ewc_jax._si import SIState as SIState
from ewc_jax._si import si_importance as si_importance
from ewc_jax._si import si_path_integral as si_path_integral
from ewc_jax._transform import AddEWCPenaltyState as AddEWCPenaltyState
from ewc_jax._transform import add_ewc_penalty as add_ewc_penalty
from ewc_jax._transform import set_ewc_state as set_ewc_state
from ewc_jax._validation import checks_enabled as checks_enabled

__version__ = "0.1.0"
