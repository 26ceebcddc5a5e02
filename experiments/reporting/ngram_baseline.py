r"""A byte n-gram baseline for the continual language model: what a transformer must beat.

Interpolated absolute discounting (Ney, Essen & Kneser 1994) over bytes, trained on the same
training windows the language model sees and scored on the same test windows, in the same unit
(:func:`experiments.text.bits_per_character`). Histories stay inside a window, as the model's
context does: the target at position ``t`` of a window is predicted from at most the
``order - 1`` bytes before it in that window.

.. math::

    P_j(c \mid h_j) = \frac{\max(C(h_j c) - D, 0)}{C(h_j)}
        + \frac{D \, N_{1+}(h_j \bullet)}{C(h_j)} P_{j-1}(c \mid h_{j-1}),
    \qquad P_{-1}(c) = \frac{1}{256},

with :math:`h_j` the last :math:`j` bytes, :math:`C` the training counts,
:math:`N_{1+}(h \bullet)` the number of distinct bytes seen after :math:`h`, and
:math:`P_j = P_{j-1}` for a history never seen in training.

Run::

    python -m experiments.reporting.ngram_baseline --language en --order 5 --discount 0.75 \
        --test-windows 500

``--seed S`` scores the windows that ``fortunes_lm.py`` (``test_limit`` 500) evaluates with seed
``S`` instead of the first 500.
"""

import argparse
import sys

import numpy as np

from experiments.data import text

VOCAB = 256


class NGramModel:
    """Counts of every history of length ``0 .. order - 1`` and its next byte, as sorted keys."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, order: int, discount: float):
        """Counts the training windows.

        Args:
            inputs: ``[N, T]`` input bytes of the windows (the model's inputs).
            targets: ``[N, T]`` next bytes (``targets[:, t] == window[t + 1]``).
            order: n of the n-gram (histories of up to ``order - 1`` bytes).
            discount: D in ``(0, 1)``.
        """
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}.")
        if not 0 < discount < 1:
            raise ValueError(f"the discount must lie in (0, 1), got {discount}.")
        self.order, self.discount = order, discount
        self.tables = []
        for length in range(order):
            history, valid = _histories(inputs, length)
            pairs = history[valid] * VOCAB + targets[valid].astype(np.int64)
            pair_keys, pair_counts = np.unique(pairs, return_counts=True)
            context_keys, first, distinct = np.unique(
                pair_keys // VOCAB, return_index=True, return_counts=True
            )
            context_counts = np.add.reduceat(pair_counts, first)
            self.tables.append((pair_keys, pair_counts, context_keys, context_counts, distinct))

    def log_prob(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Natural-log probability of each target byte ``[N, T]`` given its in-window history."""
        prob = np.full(targets.shape, 1.0 / VOCAB)
        for length, (pair_keys, pair_counts, context_keys, context_counts, distinct) in enumerate(
            self.tables
        ):
            history, valid = _histories(inputs, length)
            seen_pair = _lookup(pair_keys, pair_counts, history * VOCAB + targets)
            index = np.searchsorted(context_keys, history)
            index = np.minimum(index, len(context_keys) - 1)
            seen = valid & (context_keys[index] == history)
            total = np.where(seen, context_counts[index], 1)
            backoff = self.discount * distinct[index] / total
            mixed = np.maximum(seen_pair - self.discount, 0) / total + backoff * prob
            prob = np.where(seen, mixed, prob)
        return np.log(prob)


def _histories(inputs: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``length`` bytes before each target, packed into an int64 key, and whether the
    window holds that many (the target at ``t`` has the ``t + 1`` inputs ``0..t`` before it)."""
    inputs = inputs.astype(np.int64)
    key = np.zeros(inputs.shape, np.int64)
    for back in range(length):  # byte ``back`` steps before the target's own input position
        shifted = np.zeros_like(inputs)
        shifted[:, back:] = inputs[:, : inputs.shape[1] - back]
        key = key * VOCAB + shifted
    positions = np.arange(inputs.shape[1])[None, :]
    return key, np.broadcast_to(positions + 1 >= length, inputs.shape)


def _lookup(keys: np.ndarray, counts: np.ndarray, queries: np.ndarray) -> np.ndarray:
    index = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[index] == queries, counts[index], 0)


def baseline_bpc(
    language: str,
    order: int,
    discount: float,
    test_windows: int | None,
    context_length: int = 64,
    seed: int | None = None,
) -> tuple[float, int, int]:
    """Test bits per character of the n-gram model of one language's fortunes.

    Args:
        language: a language of :data:`experiments.data.text.LANGUAGES`.
        order: n of the n-gram.
        discount: D in ``(0, 1)``.
        test_windows: how many test windows to score (None: all).
        context_length: bytes per window.
        seed: None scores the first ``test_windows``; a seed scores the random ``test_windows``
            that an experiment with ``test_limit = test_windows`` (and ``train_limit = 0``)
            evaluates on that seed (:func:`experiments.scenarios.build.subsample`).

    Returns:
        (bits per character, training windows, test windows scored).
    """
    data = text.load_fortunes(f"{language}:{context_length}")
    model = NGramModel(data.train_images, data.train_labels, order, discount)
    if seed is not None:
        from experiments.scenarios.build import subsample

        data = subsample(data, 0, test_windows or 0, seed)
    inputs, targets = data.test_images[:test_windows], data.test_labels[:test_windows]
    log_prob = model.log_prob(inputs, targets)
    bits = -log_prob.sum() / np.log(2.0) / text.character_starts(targets).sum()
    return float(bits), len(data.train_images), len(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--language", default="en", choices=sorted(text.LANGUAGES))
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--discount", type=float, default=0.75)
    parser.add_argument("--test-windows", type=int, default=500, help="0: all test windows")
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="score the test windows an experiment of this seed with test_limit=--test-windows "
        "evaluates on (default: the first --test-windows)",
    )
    args = parser.parse_args(argv)
    try:
        bpc, train, test = baseline_bpc(
            args.language,
            args.order,
            args.discount,
            args.test_windows or None,
            args.context_length,
            args.seed,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"fortunes:{args.language} byte {args.order}-gram, D={args.discount}: {bpc:.3f} bits per "
        f"character on {test} test windows{'' if args.seed is None else f' of seed {args.seed}'} "
        f"(trained on {train} windows of {args.context_length})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
