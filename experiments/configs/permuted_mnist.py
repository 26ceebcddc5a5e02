"""Permuted MNIST (Kirkpatrick et al. 2017), the domain-incremental benchmark of van de Ven et al.

    python -m experiments.main --config experiments/configs/permuted_mnist.py \
        --workdir runs/permuted_mnist
    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \
        --workdir runs/permuted_mnist_small --config.seeds=0,1,2

Full variant: 10 tasks of the 60k MNIST digits (``tfds:mnist``; any local copy of the IDX files
works too: ``--config.datasets=idx:/path/to/mnist``), the first unpermuted, one shared 10-way head,
an MLP 784-1000-1000-10, Adam lr 1e-4, batch 128, 5,000 steps per task, as in van de Ven,
Tuytelaars & Tolias 2022 (who report EWC 94.3% vs 78.5% without regularisation).

``small`` runs offline on the embedded 4,000 MNIST digits: 5 tasks, an MLP 784-400-400-10,
Adam lr 1e-3, 500 steps of 128 per task; it finishes in under a minute per method on 2 CPU
cores. The EWC strength 1,000 is the best of {300, 1e3, 3e3, 1e4, 1e5} on the small stream.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Permuted MNIST; ``variant="small"`` for the offline laptop-sized version."""
    config = default.get_config()
    config.variant = variant
    config.scenario = "permuted"
    config.datasets = ("tfds:mnist",)
    config.num_tasks = 10
    config.first_task_unpermuted = True
    config.model = "mlp"
    config.hidden_sizes = (1000, 1000)
    config.optimizer = "adam"
    config.learning_rate = 1e-4
    config.batch_size = 128
    config.steps_per_task = 5000
    config.eval_every_steps = 500
    config.methods = ("finetune", "ewc", "online_ewc", "joint")
    config.strength = 1000.0
    config.estimator = "exact"
    config.fisher_samples = 1000
    config.gamma = 1.0
    if variant == "small":
        config.datasets = ("embedded:mnist",)
        config.num_tasks = 5
        config.hidden_sizes = (400, 400)
        config.learning_rate = 1e-3
        config.steps_per_task = 500
        config.eval_every_steps = 100
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid variants: 'small'")
    return config
