"""The checks of a config that read several fields together (:func:`experiments.config.validate`
runs them after each field's own type and range): a sweep, a reproduction's ``init``, what each
method refuses, ``strengths.<name>=evidence``, FSDP and low-rank adapters. Every problem is one
line of :class:`ConfigError`."""

from __future__ import annotations

import math

import ml_collections

from experiments import models
from experiments.models import LM_MODELS
from experiments.spec import CLASS_ORDERS, PARAM_SHARDINGS, ConfigError
from experiments.training.methods import METHODS


def choice(config: ml_collections.ConfigDict, field: str, valid: tuple[str, ...]) -> None:
    if config[field] not in valid:
        raise ConfigError(f"unknown {field} {config[field]!r}; valid choices: {', '.join(valid)}")


EVIDENCE = "evidence"
"""The value of ``strengths.<method>`` that chooses λ by the Laplace evidence."""


def check_evidence(config: ml_collections.ConfigDict, name: str) -> None:
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


def check_sweep(config: ml_collections.ConfigDict) -> None:
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


def check_reproduction(config: ml_collections.ConfigDict) -> None:
    """Checks ``init`` and ``class_order``; an ``.npz`` init is read and its layer count checked.

    The shapes of an ``.npz``'s layers are checked against the model when it is initialised
    (its input and output sizes are known once the data is loaded).
    """
    choice(config, "class_order", CLASS_ORDERS)
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


def check_param_sharding(config: ml_collections.ConfigDict) -> None:
    choice(config, "param_sharding", PARAM_SHARDINGS)
    if config.param_sharding == "fsdp" and not config.data_parallel:
        raise ConfigError(
            "param_sharding 'fsdp' splits params over the data mesh: set data_parallel"
        )
    if config.param_sharding == "fsdp" and (config.sweep.seeds or config.sweep.strengths):
        raise ConfigError(
            "param_sharding 'fsdp' is for single runs; a sweep splits its runs over the devices "
            "(use param_sharding 'replicated')"
        )


def check_lora(config: ml_collections.ConfigDict) -> None:
    """``lora_rank > 0``: a language model, and a strength given as a number (every method's
    precision, K-FAC's included, takes ``where=`` the adapters)."""
    if not config.lora_rank:
        return
    if config.model not in LM_MODELS:
        raise ConfigError(
            f"lora_rank {config.lora_rank} gives adapters to the language model's Dense layers; "
            f"model {config.model!r} has none (set lora_rank 0)"
        )
    for name in config.methods:
        if config.strengths.get(name) == EVIDENCE:
            raise ConfigError(
                f"strengths.{name}=evidence with lora_rank > 0: the evidence's choice of λ "
                "reads the full precision, not the adapters' alone; give a number"
            )


def check_refusals(config: ml_collections.ConfigDict) -> None:
    """What each method of the table refuses (K-FAC: some estimators)."""
    for name in config.methods:
        why = METHODS[name].refusal(estimator=config.estimator)
        if why:
            raise ConfigError(why)
