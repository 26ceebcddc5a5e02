"""The n-gram baseline against a dictionary-counting reference written from the formula."""

import collections
import math

import numpy as np
import pytest

from experiments.data import text
from experiments.reporting import ngram_baseline


def _windows(seed: int, n: int, span: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcab a", np.uint8)  # a skewed little alphabet
    stream = letters[rng.integers(0, len(letters), n * span)].reshape(n, span).astype(np.int32)
    return stream[:, :-1], stream[:, 1:]


def _reference_prob(windows: list[bytes], order: int, discount: float, window: bytes, t: int):
    """P(window[t + 1] | in-window history) by the recursion, with Python dicts."""
    counts = collections.Counter()
    for w in windows:
        for pos in range(1, len(w)):
            for length in range(order):
                if pos - length >= 0:
                    counts[(w[pos - length : pos], w[pos])] += 1
    prob = 1 / 256
    for length in range(order):
        start = t + 1 - length
        if start < 0:
            break
        history = window[start : t + 1]
        total = sum(c for (h, _), c in counts.items() if h == history)
        if total == 0:
            break
        distinct = sum(1 for (h, _) in counts if h == history)
        pair = counts[(history, window[t + 1])]
        prob = max(pair - discount, 0) / total + discount * distinct / total * prob
    return prob


def test_probabilities_match_the_recursion_by_hand():
    inputs, targets = _windows(0, 30)
    windows = [
        bytes(np.concatenate([i[:1], t]).astype(np.uint8))
        for i, t in zip(inputs, targets, strict=True)
    ]
    model = ngram_baseline.NGramModel(inputs, targets, order=3, discount=0.75)
    test_inputs, test_targets = _windows(1, 4)
    got = np.exp(model.log_prob(test_inputs, test_targets))
    for n in range(4):
        window = bytes(np.concatenate([test_inputs[n, :1], test_targets[n]]).astype(np.uint8))
        for t in range(test_targets.shape[1]):
            want = _reference_prob(windows, 3, 0.75, window, t)
            assert math.isclose(got[n, t], want, rel_tol=1e-12), (n, t)


def test_each_distribution_sums_to_one():
    inputs, targets = _windows(2, 50)
    model = ngram_baseline.NGramModel(inputs, targets, order=4, discount=0.5)
    query = np.repeat(inputs[:1], 256, axis=0)
    every_byte = np.repeat(np.arange(256, dtype=np.int32)[:, None], inputs.shape[1], axis=1)
    total = np.exp(model.log_prob(query, every_byte)).sum(axis=0)
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)


def test_bad_settings_are_refused():
    inputs, targets = _windows(0, 3)
    with pytest.raises(ValueError, match="order must be at least 1"):
        ngram_baseline.NGramModel(inputs, targets, order=0, discount=0.5)
    with pytest.raises(ValueError, match=r"discount must lie in \(0, 1\)"):
        ngram_baseline.NGramModel(inputs, targets, order=2, discount=1.5)


@pytest.mark.skipif(
    not (text.FORTUNES_DIR / "riddles").exists(),
    reason="Debian's fortunes package is not installed (.ci/run installs it)",
)
def test_the_english_baseline_beats_a_unigram_and_prints_one_line(capsys):
    assert ngram_baseline.main(["--order", "1", "--test-windows", "100"]) == 0
    unigram = float(capsys.readouterr().out.split(": ")[1].split()[0])
    assert ngram_baseline.main(["--order", "5", "--test-windows", "100"]) == 0
    five = float(capsys.readouterr().out.split(": ")[1].split()[0])
    assert 1.5 < five < unigram < 6.0


@pytest.mark.skipif(
    not (text.FORTUNES_DIR / "riddles").exists(),
    reason="Debian's fortunes package is not installed (.ci/run installs it)",
)
def test_with_a_seed_it_scores_the_experiments_own_test_windows(monkeypatch):
    from experiments import scenarios
    from experiments.spec import DataSpec

    data = text.load_fortunes("en:64")
    spec = DataSpec(scenario="sequence", datasets=("fortunes:en",), test_limit=50)
    scenario = scenarios.build_scenario(spec, {"fortunes:en": data}, 3)
    scored = []
    original = ngram_baseline.NGramModel.log_prob
    monkeypatch.setattr(
        ngram_baseline.NGramModel,
        "log_prob",
        lambda self, inputs, targets: scored.append(inputs) or original(self, inputs, targets),
    )
    ngram_baseline.baseline_bpc("en", 2, 0.75, 50, seed=3)
    np.testing.assert_array_equal(scored[0], scenario.tasks[0].test_images)
    ngram_baseline.baseline_bpc("en", 2, 0.75, 50)
    np.testing.assert_array_equal(scored[1], data.test_images[:50])
    assert not np.array_equal(scored[0], scored[1])
