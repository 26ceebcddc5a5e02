"""The typed pieces of an experiment: frozen values that the layers below the config take.

:func:`experiments.config.read_spec` is the only code that reads the ``ConfigDict``; it checks
every field and returns a :class:`experiments.config.RunSpec` made of these pieces. Every module
below it takes a piece (a :class:`DataSpec` for the scenarios, a :class:`ModelSpec` for the
models, ...) or plain values, never the ``ConfigDict``. This module imports nothing else of the
experiments, so every layer can use it.
"""

from __future__ import annotations

import dataclasses

SCENARIOS = ("sequence", "permuted", "split", "rotated")
SPLIT_MODES = ("task", "domain", "class")
CLASS_ORDERS = ("fixed", "permuted")
OPTIMIZERS = ("sgd", "adam")
PARAM_SHARDINGS = ("replicated", "fsdp")
"""Layouts of the params on the data mesh (:func:`experiments.training.device.param_shardings`)."""


class ConfigError(ValueError):
    """A config that cannot run: raised before any data is loaded or any step is taken."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The datasets and the task stream built from them (:mod:`experiments.scenarios`).

    Attributes:
        scenario: one of :data:`SCENARIOS`.
        datasets: ``load_dataset`` specs: one per task for a sequence, else one.
        data_dir: where TFDS and IDX datasets are read (None: their defaults).
        train_limit: keep a random subset of this many training examples (0: all).
        test_limit: the same for the test set.
        num_tasks: permuted tasks.
        first_task_unpermuted: the first permuted task keeps the pixel order.
        split_mode: ``task``, ``domain`` or ``class`` incremental (split).
        class_groups: the classes of each split task (empty: consecutive pairs).
        angles: rotation of each rotated task, in degrees.
        class_order: ``fixed`` or ``permuted`` per seed before the split.
    """

    scenario: str = "permuted"
    datasets: tuple[str, ...] = ("embedded:mnist",)
    data_dir: str | None = None
    train_limit: int = 0
    test_limit: int = 0
    num_tasks: int = 3
    first_task_unpermuted: bool = True
    split_mode: str = "task"
    class_groups: tuple[tuple[int, ...], ...] = ()
    angles: tuple[float, ...] = (0.0, 45.0, 90.0)
    class_order: str = "fixed"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model (:mod:`experiments.models`).

    Attributes:
        name: a model of :data:`experiments.models.MODELS` or
            :data:`experiments.models.LM_MODELS`.
        hidden_sizes: widths of the MLPs' hidden layers.
        relu_on_logits: a ReLU after the MLP's last layer (as the tutorial does).
        init: ``flax``, ``torch`` or the path of an ``.npz`` PyTorch state_dict.
        num_layers: transformer blocks.
        width: transformer width.
        num_heads: attention heads.
        lora_rank: rank of the language model's low-rank adapters (0: none).
        lora_alpha: their scale ``α`` (the update is ``α / r · B A x``).
    """

    name: str = "mlp"
    hidden_sizes: tuple[int, ...] = (256, 256)
    relu_on_logits: bool = False
    init: str = "flax"
    num_layers: int = 2
    width: int = 64
    num_heads: int = 4
    lora_rank: int = 0
    lora_alpha: float = 8.0


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimiser: ``sgd`` (with optional momentum) or ``adam``.

    Attributes:
        name: one of :data:`OPTIMIZERS`.
        learning_rate: finite, > 0.
        momentum: SGD momentum in [0, 1) (0: plain SGD).
        reset_per_task: a fresh optimiser state for every task.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.0
    reset_per_task: bool = True


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """How long each task trains, and when the loop evaluates and checkpoints.

    Attributes:
        batch_size: examples per SGD step.
        epochs: epochs per task (when ``steps_per_task`` is 0).
        steps_per_task: SGD steps per task (0: ``epochs`` epochs).
        first_task_steps: SGD steps of the first task only (0: as every task).
        eval_every_steps: learning-curve cadence (0: every epoch).
        eval_batch_size: examples per evaluation chunk.
        checkpoint_every_steps: checkpoint cadence within a task (0: after tasks only).
    """

    batch_size: int = 32
    epochs: int = 1
    steps_per_task: int = 0
    first_task_steps: int = 0
    eval_every_steps: int = 0
    eval_batch_size: int = 1000
    checkpoint_every_steps: int = 0

    def task_steps(self, task: int, steps_per_epoch: int) -> int:
        """SGD steps of task ``task`` whose epoch takes ``steps_per_epoch`` steps.

        Example:
            >>> schedule = ScheduleSpec(epochs=2, first_task_steps=5)
            >>> schedule.task_steps(0, 10), schedule.task_steps(1, 10)
            (5, 20)
        """
        first = self.first_task_steps if task == 0 else 0
        return first or self.steps_per_task or self.epochs * steps_per_epoch


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The devices a run uses.

    Attributes:
        data_parallel: split every mini-batch (a sweep: its runs) over a 1-D mesh.
        mesh_devices: devices of the mesh (0: all).
        param_sharding: ``replicated`` or ``fsdp`` (params split over the mesh).
    """

    data_parallel: bool = False
    mesh_devices: int = 0
    param_sharding: str = "replicated"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A seed x strength sweep (:mod:`experiments.runs`).

    Attributes:
        seeds: S > 0 runs seeds ``s0 .. s0+S-1``; 0: the config's seeds.
        strengths: λ values of every regularised method (empty: each method's own).
    """

    seeds: int = 0
    strengths: tuple[float, ...] = ()

    @property
    def requested(self) -> bool:
        """Whether the config asks for a sweep."""
        return self.seeds > 0 or bool(self.strengths)
