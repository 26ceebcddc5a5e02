"""The one reader of the ``ConfigDict``: :func:`read_spec` checks it (:func:`validate`) and
returns a frozen :class:`RunSpec` of typed pieces; nothing below reads the ``ConfigDict``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from experiments.config.checks import validate
from experiments.config.combinations import EVIDENCE
from experiments.spec import (
    DataSpec,
    MeshSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    SweepSpec,
)
from experiments.training.methods import METHODS, MethodSpec


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A validated config as typed pieces: what :func:`read_spec` returns.

    Attributes:
        data: datasets and task stream.
        model: the model.
        optimizer: the optimiser.
        schedule: steps per task and the loop's cadences.
        methods: every method of the run, with its hyperparameters.
        seeds: the seeds of the runs (a sweep's ``s0 .. s0+S-1``).
        mesh: the devices.
        sweep: the sweep, if any.
        first_task_params: the directory of task 1's shared params (:mod:`experiments.runs.
            first_task`), or "" for none.
        resolved: the config as JSON (``config.json``, ``results.json``, the fingerprint).
    """

    data: DataSpec
    model: ModelSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    mesh: MeshSpec
    sweep: SweepSpec
    first_task_params: str
    resolved: dict[str, Any]

    def sweep_strengths(self, method: MethodSpec) -> tuple[float, ...]:
        """The sweep's strengths (or the method's own) for a regularised method, else (0,)."""
        if not method.regularized:
            return (0.0,)
        return self.sweep.strengths or (method.strength,)


def read_spec(config: ml_collections.ConfigDict) -> RunSpec:
    """The one reader of the ``ConfigDict``: validates it and returns its typed pieces.

    Raises:
        ConfigError: the first problem found (see :func:`validate`), in one line.
    """
    c = _methods_split(config)
    validate(c)
    seeds = tuple(int(seed) for seed in c.seeds)
    if c.sweep.seeds:
        seeds = tuple(range(seeds[0], seeds[0] + int(c.sweep.seeds)))
    return RunSpec(
        data=DataSpec(
            scenario=c.scenario,
            datasets=tuple(c.datasets),
            data_dir=c.data_dir,
            train_limit=c.train_limit,
            test_limit=c.test_limit,
            num_tasks=c.num_tasks,
            first_task_unpermuted=c.first_task_unpermuted,
            split_mode=c.split_mode,
            class_groups=tuple(tuple(group) for group in c.class_groups),
            angles=tuple(float(angle) for angle in c.angles),
            class_order=c.class_order,
        ),
        model=ModelSpec(
            name=c.model,
            hidden_sizes=tuple(c.hidden_sizes),
            relu_on_logits=c.relu_on_logits,
            init=c.init,
            num_layers=c.transformer.num_layers,
            width=c.transformer.width,
            num_heads=c.transformer.num_heads,
            lora_rank=c.lora_rank,
            lora_alpha=float(c.lora_alpha),
        ),
        optimizer=OptimizerSpec(
            name=c.optimizer,
            learning_rate=float(c.learning_rate),
            momentum=float(c.momentum),
            reset_per_task=c.reset_optimizer,
        ),
        schedule=ScheduleSpec(
            **{field.name: c[field.name] for field in dataclasses.fields(ScheduleSpec)}
        ),
        methods=tuple(_method_spec(c, name) for name in c.methods),
        seeds=seeds,
        mesh=MeshSpec(c.data_parallel, c.mesh_devices, c.param_sharding),
        sweep=SweepSpec(c.sweep.seeds, tuple(float(v) for v in c.sweep.strengths)),
        first_task_params=c.first_task_params,
        resolved=json.loads(c.to_json_best_effort()),
    )


def _methods_split(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with comma-separated method names split: method names hold no commas, so
    ``--config.methods=finetune,ewc`` can only mean a list (a copy; ``config`` is unchanged)."""
    if not isinstance(config.methods, tuple | list) or not any(
        isinstance(value, str) and "," in value for value in config.methods
    ):
        return config
    split = config.copy_and_resolve_references()
    split.methods = tuple(
        name.strip()
        for value in config.methods
        for name in (value.split(",") if isinstance(value, str) else [value])
        if not isinstance(name, str) or name.strip()
    )
    return split


def _method_spec(config: ml_collections.ConfigDict, name: str) -> MethodSpec:
    """``name``'s :class:`MethodSpec`: ``strengths.<name>`` when set, else ``strength``
    (``evidence``: chosen during training, from 1)."""
    entry = METHODS[name]
    strength, evidence = 0.0, False
    if entry.regularized:
        specific = config.strengths.get(name)
        # The evidence's starting λ is 1: the earlier tasks' Laplace posterior as it is.
        evidence = specific == EVIDENCE
        strength = 1.0 if evidence else float(config.strength if specific is None else specific)
    return MethodSpec(
        name=name,
        strength=strength,
        evidence=evidence,
        evidence_every=config.evidence_every,
        estimator=config.estimator,
        fisher_samples=config.fisher_samples,
        fisher_batch_size=config.fisher_batch_size or None,
        gamma=float(config.gamma) if entry.decays else 1.0,
        kfac_sequence=config.kfac_sequence,
    )
