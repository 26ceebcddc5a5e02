"""Chunk sizes by measurement: the chooser, the candidates, the caches and the unchanged numbers.

The timer is injected (``_calibration._time_chunk`` replaced by a fake that returns chosen
seconds per chunk size), so the choice is known in advance; one test keeps the real timer to run
the compiled chunk programs end to end, eagerly and under ``jax.jit``.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import ewc_jax
from ewc_jax import _calibration
from ewc_jax._engine import cost
from ewc_jax._engine import model as model_lib
from ewc_jax._engine.chunking import even_chunk_size
from tests._models import init_plain_mlp, plain_mlp

N = 64
CACHE_PATH = _calibration._cache_path
SECONDS = {64: 8.0, 32: 3.0, 16: 1.0, 8: 0.9}
"""Per chunk: whole-call time ⌈N/c⌉·t(c) = 8, 6, 4, 7.2: 16 is the fastest."""


@pytest.fixture
def calibrated(monkeypatch):
    """Calibration on for an 8-example minimum chunk, a fresh cache, and a fake timer that
    records every size it is asked to time."""
    monkeypatch.setenv(_calibration.ENV_VAR, "on")
    monkeypatch.setattr(_calibration, "MIN_CHUNK", 8)
    monkeypatch.setattr(_calibration, "_cache_path", lambda: None)  # no JSON file
    _calibration.clear_cache()
    timed: list[int] = []

    def fake(size, run, chunks=1):
        timed.append(size)
        return SECONDS.get(size, 10.0)

    monkeypatch.setattr(_calibration, "_time_chunk", fake)
    yield timed
    _calibration.clear_cache()


@pytest.fixture(scope="module")
def problem():
    params = init_plain_mlp(jax.random.key(0), (6, 16, 4))
    x = jax.random.normal(jax.random.key(1), (N, 6))
    return params, x


def _fisher_of(params, x, **kwargs):
    return ewc_jax.fisher_diagonal(plain_mlp, params, x, estimator="argmax", **kwargs)


def _assert_trees_close(a, b, rtol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-12)


def test_choose_minimises_whole_call_time_on_a_fake_timer():
    asked = []

    def seconds(size):
        asked.append(size)
        return SECONDS[size]

    chosen, timed = _calibration.choose((64, 32, 16, 8), seconds, N, patience=2)
    assert chosen == 16
    assert timed == {size: SECONDS[size] for size in (64, 32, 16, 8)}
    assert asked == [64, 32, 16, 8]


def test_choose_stops_after_patience_misses():
    seconds = {100: 1.0, 50: 0.6, 25: 0.5, 13: 0.45, 7: 0.01}
    # whole call: 1.0, 1.2, 2.0, ... : no candidate after the first beats it.
    chosen, timed = _calibration.choose(tuple(seconds), seconds.__getitem__, 100, patience=2)
    assert chosen == 100
    assert list(timed) == [100, 50, 25]


def test_candidates_stay_within_budget_and_minimum():
    assert _calibration.candidates(16384, 10_000, min_chunk=256) == (10_000, 5000, 2500, 1250, 625)
    # A byte budget of 3000 examples (4 chunks): itself, then 8, 16, 32 balanced chunks, none
    # under the minimum.
    sizes = _calibration.candidates(3000, 10_000, min_chunk=256, max_candidates=10)
    assert sizes == (3000, 1250, 625, 313)
    assert _calibration.candidates(200, 10_000, min_chunk=256) == (200,)
    assert _calibration.candidates(16384, 300, min_chunk=256) == (300,)


def test_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv(_calibration.ENV_VAR, raising=False)
    assert _calibration.mode() == "auto"
    monkeypatch.setenv(_calibration.ENV_VAR, "OFF")
    assert _calibration.mode() == "off"
    monkeypatch.setenv(_calibration.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"EWC_JAX_CALIBRATE='sometimes'; valid values"):
        _calibration.mode()


def _spy_chunk_sizes(monkeypatch) -> list[int]:
    """The chunk size each fisher_diagonal call ends up with (when it did not pass one)."""
    chosen: list[int] = []
    original = _calibration.chunk_size

    def spy(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(_calibration, "chunk_size", spy)
    return chosen


def test_calibrated_call_uses_the_fastest_candidate_and_equals_the_uncalibrated_one(
    calibrated, problem, monkeypatch
):
    params, x = problem
    chosen = _spy_chunk_sizes(monkeypatch)
    fisher = _fisher_of(params, x)
    assert calibrated == [64, 32, 16, 8] and chosen == [16]
    (record,) = _calibration.HISTORY
    assert (record.n, record.chosen, record.source) == (N, 16, "measured")
    assert record.seconds == {size: SECONDS[size] for size in (64, 32, 16, 8)}
    # Only the summation order differs from one chunk of all 64 examples.
    _assert_trees_close(fisher, _fisher_of(params, x, chunk_size=N))


def test_every_candidate_is_timed_over_the_largest_candidates_examples(problem, monkeypatch):
    """Each candidate's program sums the same 64 examples (the largest candidate's), in
    ⌈64 / c⌉ chunks, and the timer gets that count; its result is the Fisher of those 64."""
    params, x = problem
    monkeypatch.setenv(_calibration.ENV_VAR, "on")
    monkeypatch.setattr(_calibration, "MIN_CHUNK", 8)
    monkeypatch.setattr(_calibration, "_cache_path", lambda: None)
    _calibration.clear_cache()
    seen: dict[int, tuple[int, float]] = {}

    def fake(size, run, chunks=1):
        out = run()
        total = sum(float(np.sum(np.asarray(leaf))) for leaf in jax.tree.leaves(out))
        seen[size] = (chunks, total)
        return SECONDS.get(size, 10.0)

    monkeypatch.setattr(_calibration, "_time_chunk", fake)
    try:
        _fisher_of(params, x)
    finally:
        _calibration.clear_cache()
    assert {size: chunks for size, (chunks, _) in seen.items()} == {64: 1, 32: 2, 16: 4, 8: 8}
    # The same 64 examples whatever the chunk (a program over its first c examples alone would
    # sum a different Fisher for each c).
    totals = [total for _, total in seen.values()]
    assert totals[0] > 0
    np.testing.assert_allclose(totals, totals[0], rtol=1e-5)


def test_real_timer_reports_seconds_per_chunk():
    calls = []

    def run():
        calls.append(1)
        start = time.perf_counter()
        while time.perf_counter() - start < 0.02:
            pass

    per_chunk = _calibration._time_chunk(16, run, chunks=4)
    assert len(calls) == 1 + _calibration.REPEATS  # one untimed warm-up
    assert 0.004 <= per_chunk <= 0.02  # 20 ms over 4 chunks: 5 ms, with some slack


def _default(path, n=N):
    """The byte-budget chunk evened out over the chunks ``n`` needs (``fisher_diagonal``'s
    default)."""
    return even_chunk_size(cost.default_chunk_size(path.bytes_per_example, path.max_chunk), n)


def _policy(params, x):
    return cost.policy(model_lib.Model.of(plain_mlp, params, x), 1, "auto", (0, 1, 2, 3))


def test_budget_bounds_the_candidates(calibrated, problem, monkeypatch):
    params, x = problem
    budget = 40 * _policy(params, x).bytes_per_example  # room for 40 examples
    monkeypatch.setattr(cost, "MEMORY_BUDGET_BYTES", budget)
    chosen = _spy_chunk_sizes(monkeypatch)
    _fisher_of(params, x)
    # The budget's 40 evened out over the 2 chunks 64 needs: 32, then balanced chunks of 64:
    # 16 (4 chunks), 8; whole-call times 2 · 3, 4 · 1, 8 · 0.9 s.
    assert calibrated == [32, 16, 8] and chosen == [16]


def test_small_budget_leaves_nothing_to_time(calibrated, problem, monkeypatch):
    params, x = problem
    chosen = _spy_chunk_sizes(monkeypatch)
    monkeypatch.setattr(cost, "MEMORY_BUDGET_BYTES", 1)
    _fisher_of(params, x)
    assert calibrated == [] and chosen == [1]


def test_explicit_chunk_size_wins(calibrated, problem):
    params, x = problem
    _fisher_of(params, x, chunk_size=24)
    assert calibrated == [] and _calibration.HISTORY == []


def test_second_call_hits_the_process_cache(calibrated, problem, monkeypatch):
    params, x = problem
    chosen = _spy_chunk_sizes(monkeypatch)
    _fisher_of(params, x)
    _fisher_of(params, x * 2.0)  # new values, same shapes: no new measurement
    assert calibrated == [64, 32, 16, 8] and chosen == [16, 16]
    _fisher_of(params, x[:48])  # a new N is a new program
    assert len(calibrated) > 4


def test_off_gives_the_byte_budget_default(calibrated, problem, monkeypatch):
    params, x = problem
    monkeypatch.setenv(_calibration.ENV_VAR, "off")
    chosen = _spy_chunk_sizes(monkeypatch)
    fisher = _fisher_of(params, x)
    assert calibrated == [] and chosen == [_default(_policy(params, x))]
    _assert_trees_close(fisher, _fisher_of(params, x, chunk_size=chosen[0]), rtol=0)


def test_auto_leaves_small_calls_alone(calibrated, problem, monkeypatch):
    params, x = problem
    monkeypatch.setenv(_calibration.ENV_VAR, "auto")
    _fisher_of(params, x)
    assert calibrated == [] and _calibration.HISTORY == []


def test_json_cache_round_trips_and_survives_a_corrupt_file(
    calibrated, problem, monkeypatch, tmp_path
):
    params, x = problem
    monkeypatch.setattr(_calibration, "_cache_path", CACHE_PATH)  # the real one
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        _check_json_cache(calibrated, params, x, monkeypatch, tmp_path / _calibration.CACHE_FILE)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        # JAX keeps the persistent cache it opened on the first compile after the directory was
        # set: without a reset, every later compile of this worker would write into tmp_path.
        compilation_cache.reset_cache()


def _check_json_cache(calibrated, params, x, monkeypatch, path):
    _fisher_of(params, x)
    saved = json.loads(path.read_text())
    (record,) = saved.values()
    assert record["chunk_size"] == 16 and record["n"] == N
    assert record["seconds"] == {str(k): v for k, v in SECONDS.items()}

    _calibration.clear_cache()  # a new process: the file answers, nothing is timed
    del calibrated[:]
    chosen = _spy_chunk_sizes(monkeypatch)
    _fisher_of(params, x)
    assert calibrated == [] and chosen == [16]
    assert _calibration.HISTORY[-1].source == "file"

    _calibration.clear_cache()
    path.write_text("{not json")
    _fisher_of(params, x)
    assert calibrated == [64, 32, 16, 8] and chosen[-1] == 16
    assert json.loads(path.read_text()) == saved


def test_real_timer_eager_and_under_jit(problem, monkeypatch):
    """The compiled chunk programs run: with concrete arguments, and under an outer jit (where
    they are traced) on stand-ins of the same shapes."""
    params, x = problem
    monkeypatch.setenv(_calibration.ENV_VAR, "on")
    monkeypatch.setattr(_calibration, "MIN_CHUNK", 32)
    monkeypatch.setattr(_calibration, "REPEATS", 1)
    monkeypatch.setattr(_calibration, "_cache_path", lambda: None)
    _calibration.clear_cache()
    reference = _fisher_of(params, x, chunk_size=N)
    key = jax.random.key(3)
    sampled = lambda p, x, **kw: ewc_jax.fisher_diagonal(
        plain_mlp, p, x, estimator="sampled", key=key, **kw
    )
    try:
        eager = _fisher_of(params, x)
        jitted = jax.jit(_fisher_of)(params, x)
        assert len(_calibration.HISTORY) == 1  # the jitted call found the eager call's choice
        _calibration.clear_cache()
        jitted_sampled = jax.jit(sampled)(params, x)
        (record,) = _calibration.HISTORY
    finally:
        _calibration.clear_cache()
    assert set(record.seconds) == {64, 32} and all(t > 0 for t in record.seconds.values())
    _assert_trees_close(eager, reference)
    _assert_trees_close(jitted, reference)
    # The sampled labels are drawn per example: the same whatever the chunk.
    _assert_trees_close(jitted_sampled, sampled(params, x, chunk_size=N))
