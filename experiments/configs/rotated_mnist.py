"""Rotated MNIST: each task shows the digits rotated by a fixed angle; one shared 10-way head.

    python -m experiments.main --config experiments/configs/rotated_mnist.py \
        --workdir runs/rotated_mnist
    python -m experiments.main --config experiments/configs/rotated_mnist.py:small \
        --workdir runs/rotated_mnist_small

Full variant: the 60k MNIST digits (``tfds:mnist``, or ``--config.datasets=idx:/path/to/mnist``)
at 0, 20, ..., 180 degrees (10 tasks), an MLP 784-1000-1000-10, Adam lr 1e-4, batch 128, 5,000
steps per task. ``small`` runs offline on the embedded 4,000 digits at 0, 45, 90 and 135 degrees
with an MLP 784-400-400-10, Adam lr 1e-3 and 500 steps per task. Rotation is bilinear
(``scipy.ndimage.rotate``), done once per task before training.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Rotated MNIST; ``variant="small"`` for the offline laptop-sized version."""
    config = default.get_config()
    config.variant = variant
    config.scenario = "rotated"
    config.datasets = ("tfds:mnist",)
    config.angles = tuple(float(a) for a in range(0, 181, 20))
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
    if variant == "small":
        config.datasets = ("embedded:mnist",)
        config.angles = (0.0, 45.0, 90.0, 135.0)
        config.hidden_sizes = (400, 400)
        config.learning_rate = 1e-3
        config.steps_per_task = 500
        config.eval_every_steps = 100
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid variants: 'small'")
    return config
