"""The experiment config in one place: its fields with their defaults, their checks, and methods.

Every config in ``experiments/configs`` starts from :func:`get_config` and changes fields; a
single run and a sweep read the same object. Fields (override any with ``--config.<field>=...``):

* data: ``scenario`` (sequence | permuted | split | rotated), ``datasets`` (``load_dataset``
  specs: one for permuted, split and rotated; one per task for a sequence), ``data_dir``,
  ``train_limit`` / ``test_limit`` (keep a random subset; 0 keeps all), ``num_tasks`` and
  ``first_task_unpermuted`` (permuted), ``split_mode`` (task | domain | class) and
  ``class_groups`` (split, e.g. ``((0, 1), (2, 3))``; empty: consecutive pairs), ``angles``
  (rotated, degrees), ``class_order`` (split: ``fixed`` keeps the classes in label order,
  ``permuted`` permutes them per seed before they are grouped into tasks, as van de Ven's
  continual-learning code does).
* model: ``model`` (tutorial_mlp | mlp | multihead_mlp | cnn; the MLPs become multi-head for
  task-incremental scenarios; causal_transformer for text), ``hidden_sizes``,
  ``relu_on_logits``, ``transformer.num_layers`` / ``.width`` / ``.num_heads``
  (``experiments/lm_models.py``), ``init`` (the initial
  parameters: ``flax``, Flax's initialisers; ``torch``, ``U(±1/√fan_in)`` weights and biases as
  ``torch.nn.Linear`` and ``Conv2d`` draw them; or the path of an ``.npz`` holding a PyTorch
  ``state_dict``, ``fc1.weight`` ``[out, in]``, ``fc1.bias``, ..., whose weight/bias pairs, in the
  file's key order, become the model's Dense/Conv layers in the order it defines them; see
  :func:`experiments.models.init_params`; the transformer takes ``flax`` only).
* training: ``optimizer`` (sgd | adam), ``learning_rate``, ``momentum`` (SGD), ``batch_size``,
  ``epochs`` per task or ``steps_per_task`` (SGD steps; overrides epochs when > 0),
  ``first_task_steps`` (SGD steps of the first task only, e.g. a long "pretraining" language
  before short fine-tunes; 0: as every task),
  ``reset_optimizer`` (fresh optimiser state per task), ``eval_every_steps`` (0: after every
  epoch), ``eval_batch_size``, ``checkpoint_every_steps`` (0: checkpoint after every task only;
  else also within a task, rounded up to whole epochs; see ``experiments/checkpoint.py``).
* methods: ``methods`` (finetune, l2, ewc, online_ewc, si, mas, kfac, joint), ``strength`` (λ
  of the penalty ``λ/2 Σ F (θ - θ*)²``) and ``strengths.<method>`` (a per-method override of
  it), ``estimator`` (exact | sampled | empirical | argmax | batched; K-FAC takes the first
  three), ``fisher_samples`` (also MAS's and K-FAC's examples), ``fisher_batch_size``
  (batched estimator), ``gamma`` (online EWC decay).

  The defaults of ``strengths.si`` (10), ``strengths.mas`` (0.03) and ``strengths.kfac`` (10)
  are the best final average accuracy of a sweep on the demo (``experiments/configs/demo.py``:
  4 permuted embedded-MNIST tasks, MLP 784-100-100-10, Adam lr 1e-3, 5 epochs; seed 0)::

      python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo_si \
          --config.methods=si --config.sweep.strengths=0.01,0.1,1,3,10,30,100
      # avg acc: 0.769 0.798 0.845 0.881 0.892 0.870 0.836
      python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo_mas \
          --config.methods=mas --config.sweep.strengths=0.003,0.01,0.03,0.1,1,10,100
      # avg acc: 0.863 0.885 0.903 0.890 0.843 0.786 0.693
      python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo_kfac \
          --config.methods=kfac --config.sweep.strengths=10,100,1000,10000
      # avg acc: 0.920 0.908 0.856 0.695 (10 keeps every task at its first accuracy)

  (EWC 1000 there: 0.859; finetune 0.737.) A strength carries the method's own scale: SI's
  and MAS's ``c`` of their papers is ``strength = 2c``.
* seeds: ``seeds`` (results report mean ± std over them).
* devices: ``data_parallel`` (split every mini-batch, evaluation chunk and Fisher sample over a
  1-D mesh of devices), ``mesh_devices`` (how many; 0: all), ``param_sharding`` (``replicated``:
  a copy of the params on every device; ``fsdp``: params, optimiser and EWC state split over the
  mesh, each leaf along its largest axis the device count divides; needs ``data_parallel``, not
  for sweeps).
* sweep (``experiments/sweep.py``): ``sweep.seeds`` (S > 0: seeds ``s0 .. s0+S-1`` from the first
  seed; 0: ``seeds``) and ``sweep.strengths`` (λ values; empty: each method's strength).

List-valued fields are tuples. On the command line give one element per flag or a Python tuple:
``--config.methods=finetune --config.methods=ewc``, ``--config.methods="('finetune', 'ewc')"``;
numbers may be comma-separated: ``--config.seeds=0,1,2``, ``--config.hidden_sizes=100,100``,
and so may the methods on the command line: ``--config.methods=finetune,si,mas,kfac``.

A seed fixes everything random: the data subset, the permutations, the initial parameters (the
same for every method), the shuffling and the Fisher's examples.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

import ewc_jax
from experiments import models
from experiments.lm_models import LM_MODELS
from experiments.models import MODELS

METHODS = ("finetune", "l2", "ewc", "online_ewc", "si", "mas", "kfac", "joint")
REGULARIZED_METHODS = ("l2", "ewc", "online_ewc", "si", "mas", "kfac")
ONLINE_METHODS = ("online_ewc", "si", "mas", "kfac")
"""Methods that sum precisions and anchor at the latest parameters (``mode="online"``)."""
KRONECKER_METHODS = ("kfac",)
"""Methods whose EWC state is a Kronecker-factored :class:`ewc_jax.kfac.KFACState`."""
EXAMPLE_METHODS = ("ewc", "online_ewc", "mas", "kfac")
"""Methods whose importance is computed on examples of the finished task."""
OPTIMIZERS = ("sgd", "adam")
SCENARIOS = ("sequence", "permuted", "split", "rotated")
SPLIT_MODES = ("task", "domain", "class")
PARAM_SHARDINGS = ("replicated", "fsdp")
"""Layouts of the params on the data mesh (:func:`experiments.device_data.param_shardings`)."""
RENAMED = {
    "method": "methods",
    "seed": "seeds",
    "dataset": "datasets",
}
"""Fields of earlier versions, and the field that replaces each (the new one takes a tuple)."""


class ConfigError(ValueError):
    """A config that cannot run: raised before any data is loaded or any step is taken."""


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The defaults: 3 permuted embedded-MNIST tasks, finetune vs EWC, one epoch each."""
    config = ml_collections.ConfigDict()
    config.variant = variant

    config.scenario = "permuted"
    config.datasets = ("embedded:mnist",)
    config.data_dir = config_dict.placeholder(str)
    config.train_limit = 0
    config.test_limit = 0
    config.num_tasks = 3
    config.first_task_unpermuted = True
    config.split_mode = "task"
    config.class_groups = ()
    config.angles = (0.0, 45.0, 90.0)
    config.class_order = "fixed"

    config.model = "mlp"
    config.hidden_sizes = (256, 256)
    config.relu_on_logits = False
    config.init = "flax"
    config.transformer = ml_collections.ConfigDict(dict(num_layers=2, width=64, num_heads=4))

    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.0
    config.batch_size = 32
    config.epochs = 1
    config.steps_per_task = 0
    config.first_task_steps = 0
    config.reset_optimizer = True
    config.eval_every_steps = 0
    config.eval_batch_size = 1000
    config.checkpoint_every_steps = 0

    config.methods = ("finetune", "ewc")
    config.strength = 1000.0
    config.strengths = ml_collections.ConfigDict(
        {name: config_dict.placeholder(float) for name in REGULARIZED_METHODS}
    )
    # Chosen by a sweep on the demo: see the module docstring.
    config.strengths.si = 10.0
    config.strengths.mas = 0.03
    config.strengths.kfac = 10.0
    config.estimator = "exact"
    config.fisher_samples = 512
    config.fisher_batch_size = 0
    config.gamma = 1.0

    config.seeds = (0,)

    config.data_parallel = False
    config.mesh_devices = 0
    config.param_sharding = "replicated"
    config.sweep = ml_collections.ConfigDict(dict(seeds=0, strengths=()))
    return config


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One continual-learning method with its hyperparameters.

    Attributes:
        name: one of :data:`METHODS`.
        strength: EWC/L2 strength λ (0 for finetune and joint).
        estimator: Fisher estimator of :func:`ewc_jax.fisher_diagonal`.
        fisher_samples: examples of the finished task the Fisher is averaged over.
        fisher_batch_size: mini-batch size of the ``"batched"`` estimator.
        gamma: decay of old precision for online EWC (1 for the others).
        damping: SI's ``ξ`` in ``Ω = ω / (Δθ² + ξ)`` (Zenke et al.'s 0.1 for MNIST).
    """

    name: str
    strength: float = 0.0
    estimator: str = "exact"
    fisher_samples: int = 512
    fisher_batch_size: int | None = None
    gamma: float = 1.0
    damping: float = 0.1

    @property
    def regularized(self) -> bool:
        """Whether the method adds a quadratic penalty after each task."""
        return self.name in REGULARIZED_METHODS

    @property
    def needs_fisher(self) -> bool:
        """Whether consolidation needs examples of the finished task (Fisher, MAS, K-FAC).

        L2 uses precision 1 and SI its path integral instead.
        """
        return self.name in EXAMPLE_METHODS


def method_strength(config: ml_collections.ConfigDict, name: str) -> float:
    """``strengths.<name>`` when set, else ``strength``; 0 for unregularised methods."""
    if name not in REGULARIZED_METHODS:
        return 0.0
    specific = config.strengths.get(name)
    return float(config.strength if specific is None else specific)


def method_specs(config: ml_collections.ConfigDict) -> list[MethodSpec]:
    """The validated :class:`MethodSpec` of every method the config runs."""
    validate(config)
    return [
        MethodSpec(
            name=name,
            strength=method_strength(config, name),
            estimator=config.estimator,
            fisher_samples=int(config.fisher_samples),
            fisher_batch_size=int(config.fisher_batch_size) or None,
            gamma=float(config.gamma) if name == "online_ewc" else 1.0,
        )
        for name in config.methods
    ]


def sweep_requested(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.sweep`` asks for a sweep (``seeds > 0`` or a non-empty ``strengths``)."""
    return int(config.sweep.seeds) > 0 or bool(config.sweep.strengths)


def run_seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds: ``s0 .. s0 + S - 1`` for ``sweep.seeds = S > 0``, else ``seeds``.

    ``s0`` is the first of ``seeds``, which also seeds a sweep's scenario.

    Example:
        >>> config = get_config()
        >>> config.seeds, config.sweep.seeds = (3,), 2
        >>> run_seeds(config)
        [3, 4]
    """
    seeds = [int(seed) for seed in config.seeds]
    count = int(config.sweep.seeds)
    return list(range(seeds[0], seeds[0] + count)) if count else seeds


def sweep_strengths(config: ml_collections.ConfigDict, spec: MethodSpec) -> list[float]:
    """``sweep.strengths`` (or the method's own strength) for a regularised method, else [0]."""
    if not spec.regularized:
        return [0.0]
    return [float(v) for v in config.sweep.strengths] or [spec.strength]


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
                "experiments/config.py"
            )
    for name in config.transformer:
        if name not in known.transformer:
            raise ConfigError(
                f"unknown config field 'transformer.{name}'; valid: {', '.join(known.transformer)}"
            )
    for name in config.strengths:
        if name not in REGULARIZED_METHODS:
            raise ConfigError(
                f"unknown config field 'strengths.{name}'; per-method strengths exist for "
                f"{', '.join(REGULARIZED_METHODS)}"
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
    strengths = {"strength": config.strength}
    for name in REGULARIZED_METHODS:
        value = config.strengths.get(name)
        if value is not None:
            strengths[f"strengths.{name}"] = value
    for field, value in strengths.items():
        _check_float(field, value, 0.0, math.inf)
    _check_float("gamma", config.gamma, 0.0, 1.0)
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


def check_task_sizes(config: ml_collections.ConfigDict, sizes: list[tuple[str, int]]) -> None:
    """Refuses a ``batch_size`` larger than the smallest task's training set.

    Called once the tasks are built (their sizes depend on the data and ``train_limit``), before
    any training: a mini-batch larger than a task would be mostly padding.

    Args:
        config: a validated config.
        sizes: each task's name and number of training examples.

    Raises:
        ConfigError: naming the task and its size.
    """
    name, smallest = min(sizes, key=lambda item: item[1])
    if int(config.batch_size) > smallest:
        raise ConfigError(
            f"batch_size {config.batch_size} is larger than task {name!r}, which has "
            f"{smallest} training examples; set batch_size <= {smallest}"
        )


def fisher_samples_used(
    config: ml_collections.ConfigDict, sizes: list[tuple[str, int]]
) -> list[int]:
    """Per task, the examples its Fisher averages over: ``fisher_samples``, or the whole
    training set of a task that has fewer (recorded in ``results.json``).

    Example:
        >>> config = get_config()
        >>> fisher_samples_used(config, [("a", 100), ("b", 10_000)])
        [100, 512]
    """
    return [min(int(config.fisher_samples), size) for _, size in sizes]


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


CLASS_ORDERS = ("fixed", "permuted")


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

    Checked: no unknown or renamed fields; method, estimator, scenario, split mode, model and
    optimiser names; tuples of the right element type; every numeric field's type (ints are
    ints, not floats) and range (``learning_rate`` finite > 0, strengths finite >= 0, gamma in
    [0, 1], momentum in [0, 1), sizes and counts >= 1, cadences >= 0, ``hidden_sizes`` >= 1,
    finite angles, seeds in [0, 2^31)); the booleans; at least one method and seed; at least 2
    permuted tasks (the task count of the other scenarios is checked once their data is loaded,
    by :func:`experiments.scenarios.check_scenario`, and ``batch_size`` against the smallest
    task by :func:`check_task_sizes`); the sweep; ``param_sharding`` (``fsdp`` needs
    ``data_parallel`` and a single run, not a sweep).

    Args:
        config: the experiment config.

    Raises:
        ConfigError: the first problem found.
    """
    _check_known_fields(config)
    _check_lists(config)
    _choice(config, "estimator", ewc_jax.ESTIMATORS)
    _choice(config, "scenario", SCENARIOS)
    if config.scenario == "split":
        _choice(config, "split_mode", SPLIT_MODES)
    _choice(config, "model", (*MODELS, *LM_MODELS))
    _choice(config, "optimizer", OPTIMIZERS)
    _check_numbers(config)
    _check_sweep(config)
    _check_reproduction(config)
    _check_kronecker_estimator(config)
    _check_param_sharding(config)


def _check_param_sharding(config: ml_collections.ConfigDict) -> None:
    _choice(config, "param_sharding", PARAM_SHARDINGS)
    if config.param_sharding == "fsdp" and not config.data_parallel:
        raise ConfigError(
            "param_sharding 'fsdp' splits params over the data mesh: set data_parallel"
        )
    if config.param_sharding == "fsdp" and sweep_requested(config):
        raise ConfigError(
            "param_sharding 'fsdp' is for single runs; a sweep splits its runs over the devices "
            "(use param_sharding 'replicated')"
        )


def _check_kronecker_estimator(config: ml_collections.ConfigDict) -> None:
    if set(config.methods) & set(KRONECKER_METHODS) and config.model in LM_MODELS:
        raise ConfigError(
            f"method 'kfac' has no Kronecker factors for {config.model!r} (Dense layers applied "
            "over a sequence keep a diagonal Fisher, and sequence outputs are not supported); "
            "use ewc or online_ewc"
        )
    if set(config.methods) & set(KRONECKER_METHODS) and (
        config.estimator not in ewc_jax.kfac.KFAC_ESTIMATORS
    ):
        raise ConfigError(
            f"estimator {config.estimator!r} has no Kronecker-factored version; K-FAC takes "
            f"{', '.join(ewc_jax.kfac.KFAC_ESTIMATORS)}"
        )
