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

Strengths: each method's best average accuracy after task 20 (seed 0) of a sweep on this
sequence (README "Results" has the commands and every value): L2 1e-3, EWC 3, online EWC 10,
SI 10, MAS 0.01, K-FAC 10. The table in the README was made by two commands (the methods
split so that they could run side by side; every method's runs depend only on the config and
the seeds, not on the other methods listed):

    python -m experiments.main --config experiments/configs/permuted_long.py \
        --workdir runs/permuted_long_a --config.sweep.seeds=3 \
        --config.methods=finetune --config.methods=ewc --config.methods=online_ewc \
        --config.methods=kfac
    python -m experiments.main --config experiments/configs/permuted_long.py \
        --workdir runs/permuted_long_b --config.sweep.seeds=3 \
        --config.methods=l2 --config.methods=si --config.methods=mas
    python -m experiments.reporting.sequence_report runs/permuted_long_a/results.json \
        runs/permuted_long_b/results.json --every 5 \
        --plot docs/figures/permuted_long_average_accuracy.png

``small`` (for tests): 3 tasks of 50 steps, an MLP 784-20-10, importances on 100 examples.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """Permuted embedded MNIST, 20 tasks; ``variant="small"``: 3 short tasks for tests."""
    config = default.get_config()
    config.variant = variant
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
    # Best average accuracy after task 20 (seed 0) of the sweeps in README "Results".
    config.strengths.l2 = 1e-3
    config.strengths.ewc = 3.0
    config.strengths.online_ewc = 10.0
    config.strengths.si = 10.0
    config.strengths.mas = 0.01
    config.strengths.kfac = 10.0
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
