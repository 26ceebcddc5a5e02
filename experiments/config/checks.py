"""The checks of a ``ConfigDict``: :func:`validate`, which :func:`experiments.config.read_spec`
runs before it reads a value. Every problem is one line of :class:`ConfigError`."""

from __future__ import annotations

import difflib
import math
from typing import Any

import jax
import ml_collections

import ewc_jax.kfac
from experiments.config.combinations import (
    EVIDENCE,
    check_evidence,
    check_lora,
    check_param_sharding,
    check_refusals,
    check_reproduction,
    check_sweep,
    choice,
)
from experiments.config.defaults import ESTIMATORS, REGULARIZED, RENAMED, get_config
from experiments.models import LM_MODELS, MODELS
from experiments.spec import (
    OPTIMIZERS,
    SCENARIOS,
    SPLIT_MODES,
    ConfigError,
)
from experiments.training.methods import METHODS


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses fields :func:`get_config` does not define (a typo would be ignored)."""
    known = get_config()
    for field in config:
        if field in RENAMED:
            raise ConfigError(renamed_message(field))
        if field not in known:
            close = difflib.get_close_matches(field, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config field {field!r}{hint}; the valid fields are those of "
                "experiments/config/defaults.py"
            )
    for name in config.transformer:
        if name not in known.transformer:
            raise ConfigError(
                f"unknown config field 'transformer.{name}'; valid: {', '.join(known.transformer)}"
            )
    for name in config.strengths:
        if name not in REGULARIZED:
            raise ConfigError(unknown_strength_message(name))


def check_override(path: str) -> None:
    """Refuses a ``--config.<path>`` override of a field :func:`get_config` does not define.

    Example:
        >>> check_override("strengths.finetune")
        Traceback (most recent call last):
        ...
        experiments.spec.ConfigError: unknown config field 'strengths.finetune': method \
'finetune' has no penalty, hence no strength; per-method strengths exist for l2, ewc, \
online_ewc, si, mas, kfac
    """
    known = get_config()
    field, _, rest = path.partition(".")
    if field in RENAMED:
        raise ConfigError(renamed_message(field))
    if field not in known:
        close = difflib.get_close_matches(field, list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config field {field!r}{hint}; the valid fields are those of "
            "experiments/config/defaults.py"
        )
    group = known[field]
    if not rest:
        return
    if not isinstance(group, ml_collections.ConfigDict):
        raise ConfigError(f"config field {field!r} has no field {rest!r}; set --config.{field}")
    if field == "strengths" and rest not in group:
        raise ConfigError(unknown_strength_message(rest))
    if rest not in group:
        raise ConfigError(
            f"unknown config field '{field}.{rest}'; valid: "
            + ", ".join(f"{field}.{k}" for k in group)
        )


def unknown_strength_message(name: str) -> str:
    """Why ``strengths.<name>`` is not a field: a method without a penalty, or no method."""
    if name in METHODS:
        why = f"method {name!r} has no penalty, hence no strength"
    else:
        why = f"{name!r} is not a method"
    return (
        f"unknown config field 'strengths.{name}': {why}; per-method strengths exist for "
        f"{', '.join(REGULARIZED)}"
    )


def renamed_message(field: str) -> str:
    """What to write instead of a field of an earlier version."""
    new = RENAMED[field]
    return (
        f"config field {field!r} was replaced by {new!r}, a tuple: write "
        f"--config.{new}=<value> (once per element) or config.{new} = (<value>, ...)"
    )


_ELEMENT_TYPES = {str: (str,), int: (int,), float: (int, float)}


def _check_tuple(config: ml_collections.ConfigDict, field: str, kind: type) -> list[Any]:
    """The elements of a tuple field, checked to be ``kind`` (a float field takes ints too)."""
    value = config[field]
    types = _ELEMENT_TYPES[kind]
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, types) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"cannot parse {field}: {value!r} must be a tuple of {kind.__name__}")
    if kind is str and any("," in v for v in value):
        raise ConfigError(
            f"{field} {value!r} holds a comma-separated string; give one element per flag "
            f"(--config.{field}=a --config.{field}=b) or a tuple (--config.{field}=\"('a', 'b')\")"
        )
    return list(value)


def _check_lists(config: ml_collections.ConfigDict) -> None:
    methods = _check_tuple(config, "methods", str)
    seeds = _check_tuple(config, "seeds", int)
    if not methods:
        raise ConfigError("no method given: set --config.methods")
    for name in methods:
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods listed twice: {methods}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    datasets = _check_tuple(config, "datasets", str)
    if config.scenario == "sequence" and not datasets:
        raise ConfigError("scenario 'sequence' needs datasets, e.g. ('embedded:mnist', 'idx:<d>')")
    if config.scenario != "sequence" and len(datasets) != 1:
        raise ConfigError(f"scenario {config.scenario!r} needs one dataset, got {datasets}")
    _check_tuple(config, "hidden_sizes", int)
    if config.scenario == "rotated" and not _check_tuple(config, "angles", float):
        raise ConfigError("scenario 'rotated' needs angles, e.g. (0, 45, 90)")
    if config.scenario == "split":
        for group in config.class_groups:
            if not isinstance(group, tuple | list) or not all(isinstance(c, int) for c in group):
                raise ConfigError(
                    f"class_groups must be a tuple of tuples of ints, e.g. ((0, 1), (2, 3)); "
                    f"got {config.class_groups!r}"
                )


_INT_MINIMUMS = {
    "train_limit": 0,
    "test_limit": 0,
    "num_tasks": 1,
    "batch_size": 1,
    "epochs": 0,
    "steps_per_task": 0,
    "first_task_steps": 0,
    "eval_every_steps": 0,
    "eval_batch_size": 1,
    "checkpoint_every_steps": 0,
    "fisher_samples": 1,
    "fisher_batch_size": 0,
    "mesh_devices": 0,
    "evidence_every": 0,
    "lora_rank": 0,
}
"""Every int field of :func:`get_config` and its smallest valid value."""
_BOOL_FIELDS = ("first_task_unpermuted", "relu_on_logits", "reset_optimizer", "data_parallel")
_MAX_SEED = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(field: str, value: Any, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{field} must be >= {minimum} (an int), got {value!r}")
    return value


def _check_float(field: str, value: Any, low: float, high: float, *, open_low=False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        if high == math.inf:
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            raise ConfigError(f"{field} must be a finite number {bound}, got {value!r}")
        raise ConfigError(f"{field} must lie in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_strengths(config: ml_collections.ConfigDict) -> None:
    """``strength`` and every ``strengths.<method>``: a number >= 0, or ``evidence`` for the
    methods with a Laplace precision."""
    _check_float("strength", config.strength, 0.0, math.inf)
    for name in REGULARIZED:
        value = config.strengths.get(name)
        if value == EVIDENCE:
            check_evidence(config, name)
        elif value is not None:
            try:
                _check_float(f"strengths.{name}", value, 0.0, math.inf)
            except ConfigError:
                if not METHODS[name].laplace:
                    raise
                raise ConfigError(
                    f"strengths.{name} must be a finite number >= 0 or {EVIDENCE!r}, got {value!r}"
                ) from None


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every numeric and boolean field: its type and its range."""
    for field, minimum in _INT_MINIMUMS.items():
        _check_int(field, config[field], minimum)
    for field in _BOOL_FIELDS:
        if not isinstance(config[field], bool):
            raise ConfigError(f"{field} must be True or False, got {config[field]!r}")
    if not isinstance(config.first_task_params, str):
        raise ConfigError(
            f"first_task_params must be a directory path (a string; '' for none), got "
            f"{config.first_task_params!r}"
        )
    _check_strengths(config)
    _check_float("gamma", config.gamma, 0.0, 1.0)
    _check_float("lora_alpha", config.lora_alpha, 0.0, math.inf, open_low=True)
    _check_float("learning_rate", config.learning_rate, 0.0, math.inf, open_low=True)
    momentum = config.momentum
    if not (_is_number(momentum) and 0.0 <= momentum < 1.0):
        raise ConfigError(f"momentum must lie in [0, 1) (0: plain SGD), got {momentum!r}")
    for width in config.hidden_sizes:
        if width < 1:
            raise ConfigError(
                f"hidden_sizes must all be >= 1 (the width of each hidden layer), got "
                f"{tuple(config.hidden_sizes)!r}"
            )
    sizes = config.transformer
    for field in sizes:
        _check_int(f"transformer.{field}", sizes[field], 1)
    if int(sizes.width) % int(sizes.num_heads):
        raise ConfigError(
            "transformer sizes must be >= 1 with width divisible by num_heads, got "
            f"{sizes.to_dict()}"
        )
    for angle in config.angles:
        if not _is_number(angle) or not math.isfinite(angle):
            raise ConfigError(f"angles must be finite numbers (degrees), got {config.angles!r}")
    for seed in config.seeds:
        if not 0 <= seed <= _MAX_SEED:
            raise ConfigError(f"seeds must lie in [0, {_MAX_SEED}], got {seed!r}")
    if int(config.steps_per_task) == 0 and int(config.epochs) < 1:
        raise ConfigError("epochs must be >= 1 (or set steps_per_task)")
    if config.estimator == "batched" and int(config.fisher_batch_size) < 1:
        raise ConfigError("estimator 'batched' needs fisher_batch_size >= 1")
    if not 0 <= int(config.mesh_devices) <= jax.device_count():
        raise ConfigError(
            f"mesh_devices must lie in [0, {jax.device_count()}] (0: all devices), "
            f"got {config.mesh_devices}"
        )
    if config.scenario == "permuted" and int(config.num_tasks) < 2:
        raise ConfigError(
            f"num_tasks must be >= 2 (continual learning needs a second task to forget the "
            f"first on), got {config.num_tasks!r}"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` with a clear message for a config that cannot run.

    Checked: no unknown or renamed fields; method, estimator, K-FAC sequence mode, scenario,
    split mode, model and optimiser names; tuples of the right element type; every numeric
    field's type (ints are ints, not floats) and range (``learning_rate`` finite > 0, strengths
    finite >= 0, gamma in [0, 1], momentum in [0, 1), sizes and counts >= 1, cadences >= 0,
    ``hidden_sizes`` >= 1, finite angles, seeds in [0, 2^31)); the booleans; at least one method
    and seed; at least 2 permuted tasks (the task count of the other scenarios is checked once
    their data is loaded, by :func:`experiments.scenarios.check_scenario`, and ``batch_size``
    against the smallest task by :func:`experiments.runs.experiment.check_task_sizes`); the
    sweep; ``param_sharding`` (``fsdp`` needs ``data_parallel`` and a single run, not a sweep);
    what each method of the table refuses; ``lora_rank`` (>= 0; adapters need the language
    model, and refuse K-FAC and ``strengths.<name>=evidence``) and ``lora_alpha`` (> 0).

    Args:
        config: the experiment config.

    Raises:
        ConfigError: the first problem found.
    """
    _check_known_fields(config)
    _check_lists(config)
    choice(config, "estimator", ESTIMATORS)
    choice(config, "kfac_sequence", ewc_jax.kfac.SEQUENCE_MODES)
    choice(config, "scenario", SCENARIOS)
    if config.scenario == "split":
        choice(config, "split_mode", SPLIT_MODES)
    choice(config, "model", (*MODELS, *LM_MODELS))
    choice(config, "optimizer", OPTIMIZERS)
    _check_numbers(config)
    check_sweep(config)
    check_reproduction(config)
    check_lora(config)
    check_refusals(config)
    check_param_sharding(config)
