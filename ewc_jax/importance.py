"""Importances other than the Fisher: Memory Aware Synapses (MAS) and Synaptic Intelligence (SI).

Each gives a per-parameter weight ``Ω_i`` that :func:`ewc_jax.consolidate` takes in place of the
Fisher, so the penalty stays ``λ/2 Σ_i Ω_i (θ_i − θ*_i)²``.

References:
  Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018;
  Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
"""

from ewc_jax._mas import mas_importance as mas_importance
from ewc_jax._si import SIState as SIState
from ewc_jax._si import si_importance as si_importance
from ewc_jax._si import si_path_integral as si_path_integral

__all__ = ["SIState", "mas_importance", "si_importance", "si_path_integral"]
