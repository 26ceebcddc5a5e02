"""The defaults of :func:`experiments.config.get_config` as a config file (fields documented in
``experiments/config/defaults.py``).

python -m experiments.main --config experiments/configs/default.py --workdir runs/default
"""

import ml_collections

from experiments import config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The defaults; they have no variants (the configs built on them set their own)."""
    if variant:
        raise ValueError(f"unknown variant {variant!r}; the defaults have no variants")
    return config.get_config()
