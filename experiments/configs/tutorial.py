"""The PyTorch EWC tutorial: an MLP learns MNIST, then Fashion-MNIST; finetune vs EWC.

    python -m experiments.main --config experiments/configs/tutorial.py --workdir runs/tutorial
    python -m experiments.main --config experiments/configs/tutorial.py:small \
        --workdir runs/tutorial_small

The tutorial's settings: its MLP 784-256-256-256-10 with a ReLU on the logits, one shared
10-way head, plain SGD with lr 1e-3, batch 32, 25 epochs per task, a Fisher from 512 examples
of the finished task labelled by the model's argmax, and importance 1000, which is
``strength=2000`` here because ``ewc_jax.penalty`` carries the paper's ½.

MNIST is ``embedded:mnist`` (4,000 real training digits) and Fashion-MNIST the real 60k/10k IDX
files of Debian's ``dataset-fashion-mnist`` (``idx:/usr/share/datasets/fashion-mnist``). The
tutorial trained on the full 60k MNIST: 25 epochs of 1,875 batches. On 4,000 images 25 epochs are
only 3,125 steps, a fifteenth of the tutorial's training (MNIST reaches 78% instead of 92% here),
so each task runs the original 46,875 SGD steps (``steps_per_task``), and the learning curves are
evaluated every 1,875 steps (one epoch of the original).

With the tutorial's argmax-labelled Fisher, EWC keeps MNIST above the tutorial's 70% but loses
about 17 points of it; the true Fisher (``--config.estimator=exact`` or ``sampled``) or
``--config.strength=5000`` loses about 11. The ``small`` variant (tests, quick looks) trains
2,000 steps per task on a 10,000 image subset of Fashion-MNIST.

Initialisation. The numbers above start from Flax's initialisation (``lecun_normal`` kernels,
zero biases). The tutorial's ``torch.nn.Linear`` layers draw weights and biases from
``U(±1/√fan_in)``: √3 smaller weights and non-zero biases, so the hidden activations shrink from
layer to layer and the logits are dominated by their biases. With the tutorial's ReLU on the
logits, a logit unit whose bias is negative is then 0 for every image: its class is never
predicted, and since the ReLU passes no gradient back, small SGD steps (lr 1e-3) rarely revive it.
On the 11,000 MNIST and Fashion-MNIST test images, PyTorch's initialisation from
``torch.manual_seed(s)``, s = 0..9, leaves 1, 3, 2, 0, 3, 3, 4, 2, 3, 1 of the 10 logit units dead
before any training, Flax's none (seeds 0..9). So the numbers of the original run differ from
this config's, by far more than the seeds' spread, while the algorithm is the same:

* ``--config.init=torch`` draws PyTorch's initialisation (from the run's seed);
* ``--config.init=<file.npz>`` starts from a PyTorch ``state_dict`` saved with ``numpy.savez``,
  e.g. the initial weights of a PyTorch run: then this config reproduces that run within
  the spread of the shuffling seeds (``python -m benchmarks.reproduce_tutorial``; README,
  "Reproducing a PyTorch run").

On the ``small`` variant (seeds 0, 1, 2; 2-vCPU machine), MNIST after task A is 66.0, 46.3,
65.5% with Flax's initialisation and 25.3, 16.6, 12.1% with ``--config.init=torch``; after
Fashion-MNIST, finetune keeps 41.5, 30.2, 26.8% of MNIST and reaches 65.4, 49.0, 64.7% on
Fashion-MNIST with Flax's initialisation, against 20.6, 14.0, 17.2% and 39.6, 11.4, 33.7% with
PyTorch's. The tutorial uses plain SGD, which has no state, so ``reset_optimizer`` changes
nothing here.
"""

import ml_collections

from experiments.configs import default

FASHION_MNIST = "idx:/usr/share/datasets/fashion-mnist"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """MNIST -> Fashion-MNIST with the tutorial's model and hyperparameters."""
    config = default.get_config()
    config.variant = variant
    config.scenario = "sequence"
    config.datasets = ("embedded:mnist", FASHION_MNIST)
    config.model = "tutorial_mlp"
    config.relu_on_logits = True
    config.optimizer = "sgd"
    config.learning_rate = 1e-3
    config.batch_size = 32
    config.epochs = 25
    config.steps_per_task = 25 * 1875
    config.eval_every_steps = 1875
    config.methods = ("finetune", "ewc")
    config.strength = 2000.0
    config.estimator = "argmax"
    config.fisher_samples = 512
    if variant == "small":
        config.train_limit = 10_000
        config.steps_per_task = 2000
        config.eval_every_steps = 250
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid variants: 'small'")
    return config
