"""The benchmark harness: our PyTorch tutorial Fisher equals ewc_jax's, and the harness runs.

Timings are not asserted here (benchmarks live apart from tests); these tests check that the
baseline computes the same numbers as the library and that ``python -m benchmarks.compare
--quick`` produces a report of the documented shape.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewc_jax
from benchmarks import compare, memory

TORCH_REASON = "torch is optional (the 'bench' extra); it is needed to compare with the tutorial"

ENTRY_KEYS = {
    "name",
    "framework",
    "n",
    "status",
    "reason",
    "median_s",
    "samples_s",
    "compile_s",
    "warmup_s",
    "repeats",
    "note",
}


@pytest.fixture(scope="module")
def model_and_data() -> tuple[list, np.ndarray]:
    weights = compare.tutorial_weights(seed=0)
    inputs, _ = compare.make_data(48, weights, data="random", seed=1)
    return weights, inputs


def test_max_relative_error_known_answer():
    reference = [(np.array([[2.0, -4.0]]), np.array([1.0]))]
    actual = [(np.array([[2.0, -3.0]]), np.array([1.5]))]
    # kernel: 1 / 4; bias: 0.5 / 1, the larger.
    assert compare.max_relative_error(actual, reference) == pytest.approx(0.5)
    assert compare.max_relative_error(reference, reference) == 0.0


def test_failed_check_is_recorded_and_raises():
    checks = compare.Checks(rtol=1e-4)
    reference = [(np.ones((2, 2)), np.ones(2))]
    checks("same", 8, reference, reference)
    with pytest.raises(compare.CheckFailed, match=r"off at N=8: max rel err 1\.000e-03"):
        checks("off", 8, [(np.full((2, 2), 1.001), np.ones(2))], reference)
    assert [c["passed"] for c in checks.results] == [True, False]


def test_make_data_has_no_argmax_near_ties(model_and_data):
    weights, inputs = model_and_data
    assert inputs.shape == (48, 784) and inputs.dtype == np.float32
    top2 = np.sort(compare._forward_numpy(weights, inputs), axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] >= 1e-4)


def test_flax_params_round_trip(model_and_data):
    weights, inputs = model_and_data
    params = compare.flax_params(weights)
    for (k, b), (k2, b2) in zip(compare.layer_arrays(params), weights, strict=True):
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(b, b2)
    logits = compare.TutorialMLP().apply(params, jnp.asarray(inputs))
    np.testing.assert_allclose(
        np.asarray(logits), compare._forward_numpy(weights, inputs), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_tutorial_fisher_loop_equals_ewc_jax_argmax(model_and_data, fast):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs = model_and_data
    model = torch_tutorial.build_mlp(weights)
    expected = torch_tutorial.to_layer_arrays(
        torch_tutorial.tutorial_fisher(model, torch.from_numpy(inputs))
    )
    fisher = ewc_jax.fisher_diagonal(
        compare.TutorialMLP().apply,
        compare.flax_params(weights),
        jnp.asarray(inputs),
        estimator="argmax",
        chunk_size=20,  # 48 = 20 + 20 + 8: a partial last chunk
        fast=fast,
    )
    actual = compare.layer_arrays(fisher)
    for (k, b), (k2, b2) in zip(actual, expected, strict=True):
        assert k.shape == k2.shape and b.shape == b2.shape
        assert k.dtype == b.dtype == np.float32
    assert np.max(expected[0][0]) > 0  # a non-trivial Fisher
    assert compare.max_relative_error(actual, expected) < 1e-4


def test_functorch_fisher_equals_tutorial_loop(model_and_data):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs = model_and_data
    model = torch_tutorial.build_mlp(weights)
    x = torch.from_numpy(inputs)
    loop = torch_tutorial.to_layer_arrays(torch_tutorial.tutorial_fisher(model, x))
    vectorised = torch_tutorial.to_layer_arrays(torch_tutorial.functorch_fisher(model, x, 20))
    assert compare.max_relative_error(vectorised, loop) < 1e-4


def test_tutorial_loss_gradient_equals_jax_loss_with_penalty(model_and_data):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs = model_and_data
    rng = np.random.default_rng(0)
    start = [(k + np.float32(0.01), b - np.float32(0.01)) for k, b in weights]
    fisher = [
        (rng.random(k.shape, np.float32), rng.random(b.shape, np.float32)) for k, b in weights
    ]
    labels = rng.integers(0, 10, len(inputs)).astype(np.int32)

    model = torch_tutorial.build_mlp(start)
    names = [name for name, _ in model.named_parameters()]
    precision, means = (
        dict(zip(names, map(torch.from_numpy, compare._torch_layout(t)), strict=True))
        for t in (fisher, weights)
    )
    torch_tutorial.tutorial_loss(
        model,
        torch.from_numpy(inputs),
        torch.from_numpy(labels.astype(np.int64)),
        precision,
        means,
        importance=1000.0,
    ).backward()
    expected = torch_tutorial.to_layer_arrays({n: p.grad for n, p in model.named_parameters()})

    state = ewc_jax.consolidate(None, compare.flax_params(weights), compare.flax_params(fisher))
    grads = jax.jit(jax.grad(compare._loss_fn(strength=2000.0)))(
        compare.flax_params(start), state, jnp.asarray(inputs), jnp.asarray(labels)
    )
    assert compare.max_relative_error(compare.layer_arrays(grads), expected) < 1e-4


def test_torch_entries_are_skipped_with_a_reason():
    config = compare.Config(use_torch=False)
    entries = compare._time_all(compare.FISHER_METHODS[:2], {}, 10, config)
    assert [e.status for e in entries] == ["skipped", "skipped"]
    assert all(e.reason == "disabled with --no-torch" for e in entries)
    ratios = compare.compute_ratios(entries, compare.FISHER_RATIOS, 10)
    assert all(r["value"] is None and r["met"] is None for r in ratios)


@pytest.mark.slow
def test_quick_harness_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    compare.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "jax_fast vs torch_tutorial_loop" in printed

    assert report["schema_version"] == compare.SCHEMA_VERSION
    assert set(report) == {
        "schema_version",
        "command",
        "config",
        "machine",
        "versions",
        "fisher",
        "epoch",
        "checks",
        "ratios",
    }
    assert report["command"] == f"python -m benchmarks.compare --quick --out {out}"
    sizes = report["config"]["sizes"]
    assert report["config"]["quick"] is True
    assert {"jax_devices", "jax_backend", "cpu_model", "torch_device"} <= set(report["machine"])
    assert report["versions"]["jax"] == jax.__version__

    have_torch = compare.torch_available()
    expected = [(name, n) for n in sizes for name in compare.FISHER_METHODS]
    assert [(e["name"], e["n"]) for e in report["fisher"]] == expected
    assert [e["name"] for e in report["epoch"]] == list(compare.EPOCH_METHODS)
    for entry in report["fisher"] + report["epoch"]:
        assert set(entry) == ENTRY_KEYS
        if entry["framework"] == "torch" and not have_torch:
            assert entry["status"] == "skipped" and entry["reason"]
            continue
        assert entry["status"] == "ok"
        assert len(entry["samples_s"]) == entry["repeats"] >= 1
        assert entry["median_s"] > 0
        assert (entry["compile_s"] is not None) == (entry["framework"] == "jax")

    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert all(c["max_rel_err"] < c["rtol"] for c in report["checks"])
    names = {(r["name"], r["n"]) for r in report["ratios"]}
    assert ("jax_fast vs torch_tutorial_loop", sizes[0]) in names
    for r in report["ratios"]:
        assert r["value"] is None or r["value"] > 0
        if r["target"] is None or r["value"] is None:
            assert r["met"] is None


@pytest.mark.slow
def test_memory_child_reports_peak_rss(capsys):
    (row,) = memory.main(["--sizes", "256", "--paths", "fast"])
    assert row["n"] == 256 and row["path"] == "fast"
    assert row["peak_rss_mib"] > row["rss_before_mib"] > row["data_mib"] > 0
    assert row["fisher_mib"] > 0
    assert "Fisher" in capsys.readouterr().out
