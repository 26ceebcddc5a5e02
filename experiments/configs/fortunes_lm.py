"""Continual language modelling on real text: English, German, Spanish, Italian fortunes in turn.

    python -m experiments.main --config experiments/configs/fortunes_lm.py --workdir runs/lm
    python -m experiments.main --config experiments/configs/fortunes_lm.py:small \
        --workdir runs/lm_small
    python -m experiments.main --config experiments/configs/fortunes_lm.py:lora \
        --workdir runs/lm_lora

A byte-level causal transformer (``experiments/models/language.py``: 2 pre-LayerNorm blocks, width
64, 4 heads, context 64 bytes, 137k parameters) learns the fortunes of Debian's ``fortunes``,
``fortunes-de``, ``fortunes-es`` and ``fortunes-it`` packages one language after another
(``experiments/data/text.py``: 64-byte windows of the UTF-8 text, records split into train and test
by a hash). The matrix it reports is test bits per character (lower is better) on every language
after every task. English is the "pretraining": 1,500 Adam steps (``first_task_steps``), then
300-step fine-tunes on German, Spanish and Italian (lr 2e-3, fresh Adam state per task,
batch 32). The Fisher is the ``sampled`` estimator (one label per byte drawn from the model:
unbiased, one backward pass per sequence; the exact one would take 64 x 256 passes) over 1,000
training sequences of the finished language. Strengths: EWC 0.03 (its Italian within 0.2 bits
of finetune's), L2 0.01 (the L2 of about that cost), online EWC 0.03; README "Continual
language modelling" has the measured sweeps and the matrix rows of each.

K-FAC runs too (``--config.methods=kfac``, default strength 10, not swept here): every Dense and
DenseGeneral layer (attention's query, key, value and output projections, the MLP, the output
layer) gets a Kronecker block, factored over the 64 byte positions by K-FAC-expand (the default,
for a loss per byte) or K-FAC-reduce (``--config.kfac_sequence=reduce``); embeddings and
LayerNorms keep the diagonal Fisher. The windows have no padding, so no token mask.

``small`` (tests): 2 languages, 32-byte windows, a 1-block width-32 model, 30 steps per task;
``--config.lora_rank=2`` gives it adapters.

``large`` (4 blocks, width 160, 4 heads: 1,329,856 parameters): English for 4,000 Adam steps
of batch 64 (lr 1.5e-3, about 7 passes over its 35,647 training windows), then 200-step fine-tunes
on German, Spanish and Italian; finetune, L2, EWC, online EWC and K-FAC. Strengths: EWC, online
EWC and K-FAC 1, L2 0.03: the best average final bits per character of a seed-0 sweep (EWC
0.1-10, online EWC 0.1-3, K-FAC 0.1-3, L2 0.003-0.3; ``docs/results.md`` has the sweep and the
3 seeds at these).
The English pretraining runs once per seed: ``first_task_params`` is ``runs/lm_large/first_task``
(relative to the current directory), where the first run saves it and every later run of another
method, workdir or sweep loads it (``experiments/runs/first_task.py``); a mid-task checkpoint
every 1,000 steps (rounded up to whole epochs of 557 steps) lets the pretraining resume::

    python -m experiments.main --config experiments/configs/fortunes_lm.py:large \
        --workdir runs/lm_large/finetune --config.methods=finetune   # trains English, saves it
    python -m experiments.main --config experiments/configs/fortunes_lm.py:large \
        --workdir runs/lm_large/ewc --config.methods=ewc             # loads English
    python -m experiments.reporting.ngram_baseline --language en --test-windows 500 --seed 0

The last line is the n-gram baseline on the 500 English test windows the model is scored on.

``lora``: the same English pretraining, then German, Spanish and Italian fine-tune only rank-8
low-rank adapters (``lora_rank`` 8, ``lora_alpha`` 8: ``W x + B A x``) on every attention
projection and MLP Dense layer (:mod:`experiments.models.lora`; 18,432 adapter parameters
beside the 137k of the base, which stays frozen after English). EWC, online EWC and L2 then
penalise the adapters alone: their precision, the diagonal Fisher (or 1) of the adapters, is
consolidated with ``where=`` the adapters, the first after English, where ``B = 0``.
K-FAC (``--config.methods=kfac``) gives each adapter factor ``A`` and ``B`` its own
K-FAC-expand block and the frozen base none (``kfac_fisher(..., where=)``).
"""

import ml_collections

from experiments.configs import default

LANGUAGES = ("en", "de", "es", "it")
LARGE_FIRST_TASK = "runs/lm_large/first_task"
"""Where ``large`` keeps its English pretraining, shared by its runs (``first_task_params``)."""


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The four-language fortunes sequence; ``variant="small"`` for the tests, ``"large"`` for the
    1.3M-parameter model whose English pretraining runs once, ``"lora"`` for adapter fine-tunes."""
    config = default.get_config()
    config.variant = variant
    config.scenario = "sequence"
    config.datasets = tuple(f"fortunes:{language}" for language in LANGUAGES)
    config.test_limit = 500
    config.model = "causal_transformer"
    config.transformer.num_layers = 2
    config.transformer.width = 64
    config.transformer.num_heads = 4
    config.optimizer = "adam"
    config.learning_rate = 2e-3
    config.batch_size = 32
    config.steps_per_task = 300
    config.first_task_steps = 1500
    config.eval_every_steps = 150
    config.eval_batch_size = 250
    config.methods = ("finetune", "l2", "ewc", "online_ewc")
    config.strength = 0.03
    config.strengths.l2 = 0.01
    config.strengths.online_ewc = 0.03
    config.estimator = "sampled"
    config.fisher_samples = 1000
    config.gamma = 1.0
    if variant == "small":
        config.datasets = ("fortunes:en:32", "fortunes:de:32")
        config.train_limit = 512
        config.test_limit = 100
        config.transformer.num_layers = 1
        config.transformer.width = 32
        config.transformer.num_heads = 2
        config.steps_per_task = 30
        config.first_task_steps = 0
        config.eval_every_steps = 15
        config.eval_batch_size = 64
        config.batch_size = 16
        config.methods = ("finetune", "ewc")
        config.strength = 1.0
        config.fisher_samples = 64
    elif variant == "large":
        config.transformer.num_layers = 4
        config.transformer.width = 160
        config.transformer.num_heads = 4
        config.learning_rate = 1.5e-3
        config.batch_size = 64
        config.first_task_steps = 4000
        config.steps_per_task = 200
        config.eval_every_steps = 250
        config.checkpoint_every_steps = 1000
        config.methods = ("finetune", "l2", "ewc", "online_ewc", "kfac")
        # The seed-0 sweep's best average final bpc (docs/results.md).
        config.strength = 1.0
        config.strengths.l2 = 0.03
        config.strengths.online_ewc = config.strengths.kfac = 1.0
        config.first_task_params = LARGE_FIRST_TASK
    elif variant == "lora":
        config.lora_rank = 8
        config.lora_alpha = 8.0
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid variants: 'small', 'large', 'lora'")
    return config
