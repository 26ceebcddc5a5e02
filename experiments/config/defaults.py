"""The experiment config's fields and their defaults: :func:`get_config`.

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
  (``experiments/models/language.py``), ``init`` (the initial
  parameters: ``flax``, Flax's initialisers; ``torch``, ``U(±1/√fan_in)`` weights and biases as
  ``torch.nn.Linear`` and ``Conv2d`` draw them; or the path of an ``.npz`` holding a PyTorch
  ``state_dict``, ``fc1.weight`` ``[out, in]``, ``fc1.bias``, ..., whose weight/bias pairs, in the
  file's key order, become the model's Dense/Conv layers in the order it defines them; see
  :func:`experiments.models.init_params`; the transformer takes ``flax`` only),
  ``lora_rank`` (0: off; r > 0 gives the transformer's attention projections and MLP Dense
  layers rank-r low-rank adapters, :mod:`experiments.models.lora`: the first task trains the
  base with the adapters frozen at zero, every later task trains only the adapters with the
  base frozen, and the penalty and its precision cover the adapters only, ``where=``) and
  ``lora_alpha`` (their scale ``α``: the update is ``α / r · B A x``).
* training: ``optimizer`` (sgd | adam), ``learning_rate``, ``momentum`` (SGD), ``batch_size``,
  ``epochs`` per task or ``steps_per_task`` (SGD steps; overrides epochs when > 0),
  ``first_task_steps`` (SGD steps of the first task only, e.g. a long "pretraining" language
  before short fine-tunes; 0: as every task),
  ``reset_optimizer`` (fresh optimiser state per task), ``eval_every_steps`` (0: after every
  epoch), ``eval_batch_size``, ``checkpoint_every_steps`` (0: checkpoint after every task only;
  else also within a task, rounded up to whole epochs; see ``experiments/storage/checkpoint.py``),
  ``first_task_params`` (a directory, relative to the current one; "": off): the first run of a
  seed to finish training task 1 saves its parameters, optimiser state and PRNG key there, and
  every later run (any workdir, method or sweep) whose task 1 would train the same way (same
  seed, model, optimiser, batch size, task 1 steps, devices and task 1 training data) loads them
  instead of training task 1, then evaluates task 1 and computes its importance as usual; a
  directory saved for another task 1, or damaged, is refused in one line. SI and joint train
  task 1 their own way and ignore it (``experiments/runs/first_task.py``).
* methods: ``methods`` (finetune, l2, ewc, online_ewc, si, mas, kfac, joint), ``strength`` (λ
  of the penalty ``λ/2 Σ F (θ - θ*)²``) and ``strengths.<method>`` (a per-method override of
  it), ``estimator`` (exact | sampled | empirical | argmax | batched; K-FAC takes the first
  three), ``fisher_samples`` (also MAS's and K-FAC's examples), ``fisher_batch_size``
  (batched estimator), ``gamma`` (online EWC decay), ``evidence_every`` (epochs between the
  evidence's choices of λ for ``strengths.<method>=evidence``; 0: at task ends only),
  ``kfac_sequence`` (expand | reduce: how K-FAC factors a Dense layer applied over a
  sequence's positions, as a language model's are; :func:`ewc_jax.kfac.kfac_fisher`'s
  ``sequence``, Eschenhagen et al. 2023; ``expand``, the default, suits a loss per token).

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

  ``strengths.<method>=evidence`` (ewc, online_ewc and kfac; :attr:`Method.laplace
  <experiments.training.methods.Method.laplace>`) chooses λ without a sweep: every
  ``evidence_every`` epochs of a task after the first (0: only at task ends) and at each task's
  end, λ is set to the maximiser of the Laplace evidence of the current task
  (:func:`ewc_jax.evidence.evidence_strength`) from the consolidated precision, the current
  parameters and the current task's own Fisher on ``fisher_samples`` of its examples (the
  method's own estimator), and training goes on with it; the next task starts from the last
  choice. Before the first choice (task 2, or its first ``evidence_every`` epochs) λ is 1, the
  strength at which the penalty is the earlier tasks' Laplace posterior itself (prior
  precision :math:`N Λ`). The λ chosen at each task's end is in ``results.json``
  (``strengths_per_task``, every choice in ``strength_choices``) and the printed summary.
  Single runs only (not a sweep). The default ``evidence_every`` 0 chooses at task ends only:
  re-chosen after every epoch, λ and the deviation from the anchor feed back (a stronger λ keeps
  θ nearer the anchor, a smaller deviation asks for a stronger λ; on the demo, task 2's λ rose
  168, 1040, 4250, 13000, 28700 over its 5 epochs) and the final average accuracy fell from
  0.875-0.908 to 0.833 (``docs/results.md``).
* seeds: ``seeds`` (results report mean ± std over them).
* devices: ``data_parallel`` (split every mini-batch, evaluation chunk and Fisher sample over a
  1-D mesh of devices), ``mesh_devices`` (how many; 0: all), ``param_sharding`` (``replicated``:
  a copy of the params on every device; ``fsdp``: params, optimiser and EWC state split over the
  mesh, each leaf along its largest axis the device count divides; needs ``data_parallel``, not
  for sweeps).
* sweep (``experiments/runs/experiment.py``): ``sweep.seeds`` (S > 0: seeds ``s0 .. s0+S-1`` from
  the first seed; 0: ``seeds``) and ``sweep.strengths`` (λ values; empty: each method's strength).

List-valued fields are tuples. On the command line give one element per flag or a Python tuple:
``--config.methods=finetune --config.methods=ewc``, ``--config.methods="('finetune', 'ewc')"``;
numbers may be comma-separated: ``--config.seeds=0,1,2``, ``--config.hidden_sizes=100,100``,
and so may the methods on the command line: ``--config.methods=finetune,si,mas,kfac``.

A seed fixes everything random: the data subset, the permutations, the initial parameters (the
same for every method), the shuffling and the Fisher's examples.
"""

from __future__ import annotations

import typing

import ml_collections
from ml_collections import config_dict

import ewc_jax
from experiments.training.methods import METHODS

ESTIMATORS: tuple[ewc_jax.Estimator, ...] = typing.get_args(ewc_jax.Estimator)
"""The values of :data:`ewc_jax.Estimator`."""
REGULARIZED = tuple(name for name, entry in METHODS.items() if entry.regularized)
"""The methods with a penalty, hence a ``strengths.<name>`` field."""
RENAMED = {
    "method": "methods",
    "seed": "seeds",
    "dataset": "datasets",
}
"""Fields of earlier versions, and the field that replaces each (the new one takes a tuple)."""


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
    config.lora_rank = 0
    config.lora_alpha = 8.0

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
    config.first_task_params = ""

    config.methods = ("finetune", "ewc")
    config.strength = 1000.0
    # A method's own default (SI's, MAS's and K-FAC's were chosen by a sweep on the demo: see
    # the module docstring), or None to take `strength`.
    # Typed `object` so that a field takes a number or "evidence" (on the command line too).
    config.strengths = ml_collections.ConfigDict(
        {
            name: config_dict.placeholder(object)
            if METHODS[name].default_strength is None
            else config_dict.FieldReference(METHODS[name].default_strength, field_type=object)
            for name in REGULARIZED
        }
    )
    config.estimator = "exact"
    config.fisher_samples = 512
    config.fisher_batch_size = 0
    config.gamma = 1.0
    config.evidence_every = 0
    config.kfac_sequence = "expand"

    config.seeds = (0,)

    config.data_parallel = False
    config.mesh_devices = 0
    config.param_sharding = "replicated"
    config.sweep = ml_collections.ConfigDict(dict(seeds=0, strengths=()))
    return config
