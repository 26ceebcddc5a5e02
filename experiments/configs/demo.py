"""Demo (``make demo``): finetune vs L2 vs EWC on 4 permuted tasks of the embedded MNIST digits.

Runs offline (``embedded:mnist``: 4,000 real MNIST training digits, 1,000 test) in well under a
minute on 2 CPU cores and prints the comparison table and the figure paths:

    python -m experiments.main --config experiments/configs/demo.py --workdir runs/demo

Settings: a 784-100-100-10 MLP, Adam (lr 1e-3, fresh state per task), 5 epochs per task, exact
Fisher on 1,000 examples, EWC strength 1000. The L2 strength 0.001 is the best of {1e-4, 1e-3,
1e-2} for L2 on this stream, so the comparison is not against a crippled baseline.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Permuted embedded MNIST, 4 tasks, finetune vs L2 vs EWC (exact Fisher); no variants."""
    if variant:
        raise ValueError(f"unknown variant {variant!r}; the demo has no variants")
    config = default.get_config()
    config.variant = variant
    config.scenario = "permuted"
    config.datasets = ("embedded:mnist",)
    config.num_tasks = 4
    config.model = "mlp"
    config.hidden_sizes = (100, 100)
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.batch_size = 32
    config.epochs = 5
    config.methods = ("finetune", "l2", "ewc")
    config.strength = 1000.0
    config.strengths.l2 = 1e-3
    config.estimator = "exact"
    config.fisher_samples = 1000
    return config
