"""The experiment config: its fields and defaults (:mod:`.defaults`, :func:`get_config`), their
checks (:mod:`.checks`) and the one reader that turns it into typed pieces (:mod:`.reader`,
:func:`read_spec`)."""

from experiments.config.checks import (
    check_override,
    renamed_message,
    unknown_strength_message,
    validate,
)
from experiments.config.defaults import ESTIMATORS, REGULARIZED, RENAMED, get_config
from experiments.config.reader import RunSpec, read_spec
from experiments.spec import ConfigError

__all__ = [
    "ESTIMATORS",
    "REGULARIZED",
    "RENAMED",
    "ConfigError",
    "RunSpec",
    "check_override",
    "get_config",
    "read_spec",
    "renamed_message",
    "unknown_strength_message",
    "validate",
]
