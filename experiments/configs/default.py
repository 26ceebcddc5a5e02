"""Defaults shared by every experiment config; each config starts from ``get_config()`` here.

Fields (override any with ``--config.<field>=<value>``):

* data: ``scenario`` (sequence | permuted | split | rotated), ``dataset`` (a
  ``experiments.data.load_dataset`` spec) or ``datasets`` (comma-separated specs, for a
  sequence), ``data_dir``, ``train_limit`` / ``test_limit`` (keep a random subset; 0 keeps all),
  ``num_tasks`` and ``first_task_unpermuted`` (permuted), ``split_mode`` (task | domain | class)
  and ``class_groups`` (split, e.g. ``"0-1,2-3"``; empty: consecutive pairs), ``angles``
  (rotated, degrees, e.g. ``"0,45,90"``).
* model: ``model`` (tutorial_mlp | mlp | multihead_mlp | cnn; the MLPs become multi-head for
  task-incremental scenarios), ``hidden_sizes`` (e.g. ``"256,256"``), ``relu_on_logits``.
* training: ``optimizer`` (sgd | adam), ``learning_rate``, ``momentum`` (SGD), ``batch_size``,
  ``epochs`` per task or ``steps_per_task`` (SGD steps; overrides epochs when > 0),
  ``reset_optimizer`` (fresh optimiser state per task), ``eval_every_steps`` (0: after every
  epoch), ``eval_batch_size``, ``checkpoint_every_steps`` (0: checkpoint after every task
  only; else also within a task, rounded up to whole epochs; see ``experiments/checkpoint.py``).
* methods: ``methods`` (comma-separated: finetune, l2, ewc, online_ewc, joint) or ``method`` (one;
  overrides ``methods``), ``strength`` (λ of the penalty ``λ/2 Σ F (θ - θ*)²``) and
  ``strengths.<method>`` (per-method override), ``estimator`` (exact | sampled | empirical |
  argmax | batched), ``fisher_samples``, ``fisher_batch_size`` (batched estimator), ``gamma``
  (online EWC decay).
* seeds: ``seeds`` (comma-separated; results report mean ± std) or ``seed`` (one; overrides).
* devices: ``data_parallel`` (split every mini-batch, evaluation chunk and Fisher sample over a
  1-D mesh of devices; params replicated), ``mesh_devices`` (how many; 0: all).
* sweep (``experiments/sweep.py``): ``sweep.seeds`` (S > 0: seeds ``s0 .. s0+S-1`` from the first
  config seed; 0: the config's seeds) and ``sweep.strengths`` (comma-separated λ; empty: each
  method's ``strength``). Either one set runs every (seed, strength) pair of every method as one
  ``jax.vmap``-ed program on the scenario of the first seed (runs split over the devices with
  ``data_parallel``), and writes mean ± std tables and a strength-sensitivity plot.

A seed fixes everything random: the data subset, the permutations, the initial parameters (the
same for every method), the shuffling and the Fisher's examples.

    python -m experiments.main --config experiments/configs/default.py --workdir runs/default
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The defaults: 3 permuted embedded-MNIST tasks, finetune vs EWC, one epoch each."""
    config = ml_collections.ConfigDict()
    config.variant = variant

    config.scenario = "permuted"
    config.dataset = "embedded:mnist"
    config.datasets = ""
    config.data_dir = config_dict.placeholder(str)
    config.train_limit = 0
    config.test_limit = 0
    config.num_tasks = 3
    config.first_task_unpermuted = True
    config.split_mode = "task"
    config.class_groups = ""
    config.angles = "0,45,90"

    config.model = "mlp"
    config.hidden_sizes = "256,256"
    config.relu_on_logits = False

    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.0
    config.batch_size = 32
    config.epochs = 1
    config.steps_per_task = 0
    config.reset_optimizer = True
    config.eval_every_steps = 0
    config.eval_batch_size = 1000
    config.checkpoint_every_steps = 0

    config.method = config_dict.placeholder(str)
    config.methods = "finetune,ewc"
    config.strength = 1000.0
    config.strengths = ml_collections.ConfigDict(
        {name: config_dict.placeholder(float) for name in ("l2", "ewc", "online_ewc")}
    )
    config.estimator = "exact"
    config.fisher_samples = 512
    config.fisher_batch_size = 0
    config.gamma = 1.0

    config.seed = config_dict.placeholder(int)
    config.seeds = "0"

    config.data_parallel = False
    config.mesh_devices = 0
    config.sweep = ml_collections.ConfigDict(dict(seeds=0, strengths=""))
    return config
