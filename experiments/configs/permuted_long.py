"""A long permuted-MNIST sequence: 20 tasks, every quadratic-penalty method, 3 seeds.

    python -m experiments.main --config experiments/configs/permuted_long.py \
        --workdir runs/permuted_long --config.sweep.seeds=3

(``--config.sweep.seeds=3`` trains the three seeds of a method side by side under ``jax.vmap``;
without it the seeds run one after the other, with the same results to float rounding.)

Offline: 20 permutations (the first the identity) of the embedded 4,000 MNIST training digits
(1,000 test digits), one shared 10-way head, an MLP 784-100-100-10, Adam lr 1e-3 (fresh state
per task), 200 steps of 128 per task (6.4 epochs), importances on 1,000 examples of the finished
task (exact Fisher for EWC and K-FAC). Methods: finetune, L2, EWC (one quadratic per task),
online EWC (γ = 1), SI, MAS and K-FAC Laplace (Ritter et al. 2018, online, its Kronecker terms
merged into one per layer so that the penalty costs the same after 20 tasks as after one).

Strengths: EWC's and K-FAC's are the best (average accuracy after the last task, seed 0) of
a sweep on this sequence, see README "Results"; the others are the demo's defaults of
``experiments/config.py``.

``small`` (for tests): 3 tasks of 50 steps, an MLP 784-20-10, importances on 100 examples.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Permuted embedded MNIST, 20 tasks; ``variant="small"``: 3 short tasks for tests."""
    config = default.get_config(variant)
    config.scenario = "permuted"
    config.datasets = ("embedded:mnist",)
    config.num_tasks = 20
    config.first_task_unpermuted = True
    config.model = "mlp"
    config.hidden_sizes = (100, 100)
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.batch_size = 128
    config.steps_per_task = 200
    config.methods = ("finetune", "l2", "ewc", "online_ewc", "si", "mas", "kfac")
    config.estimator = "exact"
    config.fisher_samples = 1000
    config.gamma = 1.0
    config.seeds = (0, 1, 2)
    if variant == "small":
        config.num_tasks = 3
        config.hidden_sizes = (20,)
        config.steps_per_task = 50
        config.fisher_samples = 100
        config.seeds = (0,)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid variants: 'small'")
    return config
