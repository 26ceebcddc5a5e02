"""The checks of a ``ConfigDict``: :func:`validate`, which :func:`experiments.config.read_spec`
runs before it reads a value. Every problem is one line of :class:`ConfigError`."""

from __future__ import annotations

import difflib
import math
from typing import Any

import jax
import ml_collections

import ewc_jax.kfac
from experiments import models
from experiments.config.defaults import ESTIMATORS, REGULARIZED, RENAMED, get_config
from experiments.models import LM_MODELS, MODELS
from experiments.spec import (
    CLASS_ORDERS,
    OPTIMIZERS,
    PARAM_SHARDINGS,
    SCENARIOS,
    SPLIT_MODES,
    ConfigError,
)
from experiments.training.methods import METHODS


def _choice(config: ml_collections.ConfigDict, field: str, valid: tuple[str, ...]) -> None:
    if config[field] not in valid:
        raise ConfigError(f"unknown {field} {config[field]!r}; valid choices: {', '.join(valid)}")


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


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every numeric and boolean field: its type and its range."""
    for field, minimum in _INT_MINIMUMS.items():
        _check_int(field, config[field], minimum)
    for field in _BOOL_FIELDS:
        if not isinstance(config[field], bool):
            raise ConfigError(f"{field} must be True or False, got {config[field]!r}")
    _check_float("strength", config.strength, 0.0, math.inf)
    for name in REGULARIZED:
        value = config.strengths.get(name)
        if value == EVIDENCE:
            _check_evidence(config, name)
        elif value is not None:
            try:
                _check_float(f"strengths.{name}", value, 0.0, math.inf)
            except ConfigError:
                if not METHODS[name].laplace:
                    raise
                raise ConfigError(
                    f"strengths.{name} must be a finite number >= 0 or {EVIDENCE!r}, got {value!r}"
                ) from None
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


EVIDENCE = "evidence"
"""The value of ``strengths.<method>`` that chooses λ by the Laplace evidence."""


def _check_evidence(config: ml_collections.ConfigDict, name: str) -> None:
    """``strengths.<name>=evidence``: a method whose entry allows it, in a single run."""
    if not METHODS[name].laplace:
        allowed = ", ".join(m for m, entry in METHODS.items() if entry.laplace)
        raise ConfigError(
            f"strengths.{name}=evidence: method {name!r} has no Fisher precision for the Laplace "
            f"evidence to choose its strength; evidence works for {allowed}"
        )
    if config.sweep.seeds or config.sweep.strengths:
        raise ConfigError(
            f"strengths.{name}=evidence chooses the strength in single runs, not in a sweep; "
            "give the seeds as --config.seeds=0,1,2 instead of sweep.seeds"
        )


def _check_sweep(config: ml_collections.ConfigDict) -> None:
    seeds = config.sweep.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 0:
        raise ConfigError(f"sweep.seeds must be an int >= 0, got {seeds!r}")
    values = config.sweep.strengths
    if not isinstance(values, tuple | list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(
            f"sweep.strengths must be a tuple of numbers (on the command line: comma-separated "
            f"numbers), got {values!r}"
        )
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"sweep.strengths must be finite and >= 0, got {value!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"sweep.strengths listed twice: {list(values)}")


def _check_reproduction(config: ml_collections.ConfigDict) -> None:
    """Checks ``init`` and ``class_order``; an ``.npz`` init is read and its layer count checked.

    The shapes of an ``.npz``'s layers are checked against the model when it is initialised
    (its input and output sizes are known once the data is loaded).
    """
    _choice(config, "class_order", CLASS_ORDERS)
    if config.class_order != "fixed" and config.scenario != "split":
        raise ConfigError(
            f"class_order {config.class_order!r} applies to the split scenario only, not to "
            f"{config.scenario!r}"
        )
    init = config.init
    if not isinstance(init, str) or not init:
        raise ConfigError(f"init must be 'flax', 'torch' or the path of an .npz, got {init!r}")
    if config.model in LM_MODELS and init != "flax":
        raise ConfigError(
            f"init {init!r} is for the image models; model {config.model!r} takes init 'flax'"
        )
    if init in models.INITS:
        return
    layers = models.read_state_dict(init)
    expected = models.num_layers(config.model, tuple(config.hidden_sizes))
    if len(layers) != expected:
        raise ConfigError(
            f"init file {init} has {len(layers)} weight/bias layers "
            f"({', '.join(prefix for prefix, _, _ in layers)}), model {config.model!r} has "
            f"{expected}"
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
    _choice(config, "estimator", ESTIMATORS)
    _choice(config, "kfac_sequence", ewc_jax.kfac.SEQUENCE_MODES)
    _choice(config, "scenario", SCENARIOS)
    if config.scenario == "split":
        _choice(config, "split_mode", SPLIT_MODES)
    _choice(config, "model", (*MODELS, *LM_MODELS))
    _choice(config, "optimizer", OPTIMIZERS)
    _check_numbers(config)
    _check_sweep(config)
    _check_reproduction(config)
    _check_lora(config)
    _check_refusals(config)
    _check_param_sharding(config)


def _check_param_sharding(config: ml_collections.ConfigDict) -> None:
    _choice(config, "param_sharding", PARAM_SHARDINGS)
    if config.param_sharding == "fsdp" and not config.data_parallel:
        raise ConfigError(
            "param_sharding 'fsdp' splits params over the data mesh: set data_parallel"
        )
    if config.param_sharding == "fsdp" and (config.sweep.seeds or config.sweep.strengths):
        raise ConfigError(
            "param_sharding 'fsdp' is for single runs; a sweep splits its runs over the devices "
            "(use param_sharding 'replicated')"
        )


def _check_lora(config: ml_collections.ConfigDict) -> None:
    """``lora_rank > 0``: a language model, and methods whose precision takes ``where=``."""
    if not config.lora_rank:
        return
    if config.model not in LM_MODELS:
        raise ConfigError(
            f"lora_rank {config.lora_rank} gives adapters to the language model's Dense layers; "
            f"model {config.model!r} has none (set lora_rank 0)"
        )
    for name in config.methods:
        if METHODS[name].kronecker:
            raise ConfigError(
                f"method {name!r} with lora_rank > 0: a Kronecker-factored state covers every "
                "layer and takes no where= restriction to the adapters; use ewc, online_ewc "
                "or l2, or set lora_rank 0"
            )
        if config.strengths.get(name) == EVIDENCE:
            raise ConfigError(
                f"strengths.{name}=evidence with lora_rank > 0: the evidence's choice of λ "
                "reads the full precision, not the adapters' alone; give a number"
            )


def _check_refusals(config: ml_collections.ConfigDict) -> None:
    """What each method of the table refuses (K-FAC: some estimators)."""
    for name in config.methods:
        why = METHODS[name].refusal(estimator=config.estimator)
        if why:
            raise ConfigError(why)
