"""The defaults of :func:`experiments.config.get_config` as a config file (fields documented there).

python -m experiments.main --config experiments/configs/default.py --workdir runs/default
"""

from experiments.config import get_config

__all__ = ["get_config"]
