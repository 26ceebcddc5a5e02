"""The benchmark harness: every PyTorch tool's Fisher equals ewc_jax's, and the harness runs.

Timings are not asserted here (benchmarks live apart from tests). These tests check that each
PyTorch competitor (the tutorial loop, ``torch.func``, plain hooks, BackPACK, nngeometry)
computes the same numbers as the library, on small sizes, and that ``python -m
benchmarks.compare --quick`` produces a report of the documented shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _xla import FAST_COMPILE

import ewc_jax
from benchmarks import compare, epoch, fisher, harness, memory, roofline, workload

ROOT = Path(__file__).resolve().parents[1]

TORCH_REASON = "torch is optional (the 'bench' extra); it is needed to compare with the tutorial"
TOOL_REASONS = {
    "hooks": TORCH_REASON,
    "backpack": "backpack-for-pytorch is optional (installed by the Makefile with --no-deps)",
    "nngeometry": "nngeometry is optional (installed by the Makefile with --no-deps)",
}

MC_COPIES = 100
"""Monte-Carlo checks draw 100 labels per example (4,800): relative error ~0.04 against exact."""
MC_RTOL = harness.Config().mc_rtol

ENTRY_KEYS = {
    "name",
    "group",
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
    "flops",
    "gflops",
    "peak_fraction",
}


@pytest.fixture(scope="module")
def model_and_data() -> tuple[list, np.ndarray, np.ndarray]:
    weights = workload.tutorial_weights(seed=0)
    inputs, labels = workload.make_data(48, weights, data="random", seed=1)
    return weights, inputs, labels


def _jax_fisher(weights, inputs, estimator, labels=None, **kwargs) -> list:
    fisher_tree = ewc_jax.fisher_diagonal(
        workload.apply_fn(),
        workload.flax_params(weights),
        jnp.asarray(inputs),
        None if labels is None else jnp.asarray(labels),
        estimator=estimator,
        **kwargs,
    )
    return workload.layer_arrays(fisher_tree)


def test_max_relative_error_known_answer():
    reference = [(np.array([[2.0, -4.0]]), np.array([1.0]))]
    actual = [(np.array([[2.0, -3.0]]), np.array([1.5]))]
    # kernel: 1 / 4; bias: 0.5 / 1, the larger.
    assert harness.max_relative_error(actual, reference) == pytest.approx(0.5)
    assert harness.max_relative_error(reference, reference) == 0.0


def test_relative_l2_error_known_answer():
    reference = [(np.array([[3.0, 4.0]]), np.array([2.0]))]
    actual = [(np.array([[3.0, 3.0]]), np.array([2.2]))]
    # kernel: ‖(0, 1)‖ / ‖(3, 4)‖ = 0.2; bias: 0.2 / 2 = 0.1.
    assert harness.relative_l2_error(actual, reference) == pytest.approx(0.2)


def test_failed_check_is_recorded_and_raises():
    checks = harness.Checks()
    reference = [(np.ones((2, 2)), np.ones(2))]
    checks("same", 8, reference, reference, 1e-4)
    with pytest.raises(harness.CheckFailed, match=r"off at N=8: max_rel_err 1\.000e-03"):
        checks("off", 8, [(np.full((2, 2), 1.001), np.ones(2))], reference, 1e-4)
    assert [c["passed"] for c in checks.results] == [True, False]
    assert [c["metric"] for c in checks.results] == ["max_rel_err"] * 2


def test_make_data_has_no_argmax_near_ties_nor_relu_kinks(model_and_data):
    weights, inputs, labels = model_and_data
    assert inputs.shape == (48, 784) and inputs.dtype == np.float32
    assert labels.shape == (48,) and labels.dtype == np.int32
    top2 = np.sort(workload.forward_numpy(weights, inputs), axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] >= 1e-4)
    for z in workload.preactivations_numpy(weights, inputs):
        assert np.all(np.abs(z) >= 1e-5)


def test_flax_params_round_trip(model_and_data):
    weights, inputs, _ = model_and_data
    params = workload.flax_params(weights)
    for (k, b), (k2, b2) in zip(workload.layer_arrays(params), weights, strict=True):
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(b, b2)
    logits = workload.apply_fn()(params, jnp.asarray(inputs))
    np.testing.assert_allclose(
        np.asarray(logits), workload.forward_numpy(weights, inputs), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("method", ["one_pass", "general"])
def test_tutorial_fisher_loop_equals_ewc_jax_argmax(model_and_data, method):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs, _ = model_and_data
    model = torch_tutorial.build_mlp(weights)
    expected = torch_tutorial.to_layer_arrays(
        torch_tutorial.tutorial_fisher(model, torch.from_numpy(inputs))
    )
    # 48 = 20 + 20 + 8: a partial last chunk.
    actual = _jax_fisher(weights, inputs, "argmax", chunk_size=20, method=method)
    for (k, b), (k2, b2) in zip(actual, expected, strict=True):
        assert k.shape == k2.shape and b.shape == b2.shape
        assert k.dtype == b.dtype == np.float32
    assert np.max(expected[0][0]) > 0  # a non-trivial Fisher
    assert harness.max_relative_error(actual, expected) < 1e-4


def test_tutorial_fisher_loop_with_labels_equals_ewc_jax_empirical(model_and_data):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs, labels = model_and_data
    model = torch_tutorial.build_mlp(weights)
    y = torch.from_numpy(labels.astype(np.int64))
    expected = torch_tutorial.to_layer_arrays(
        torch_tutorial.tutorial_fisher(model, torch.from_numpy(inputs), y)
    )
    actual = _jax_fisher(weights, inputs, "empirical", labels)
    assert harness.max_relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("with_labels", [False, True], ids=["argmax", "empirical"])
def test_functorch_fisher_equals_tutorial_loop(model_and_data, with_labels):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs, labels = model_and_data
    model = torch_tutorial.build_mlp(weights)
    x = torch.from_numpy(inputs)
    y = torch.from_numpy(labels.astype(np.int64)) if with_labels else None
    loop = torch_tutorial.to_layer_arrays(torch_tutorial.tutorial_fisher(model, x, y))
    vectorised = torch_tutorial.to_layer_arrays(
        torch_tutorial.functorch_fisher(model, x, 20, labels=y)
    )
    assert harness.max_relative_error(vectorised, loop) < 1e-4


def _tool(name: str):
    """The PyTorch tool ``name`` and the model it needs, or a skip with the reason."""
    pytest.importorskip("torch", reason=TORCH_REASON)
    if name != "hooks":
        pytest.importorskip(name, reason=TOOL_REASONS[name])
    from benchmarks import torch_fisher

    if name == "hooks":
        return torch_fisher.hooks_fisher, lambda model: model
    if name == "backpack":
        return torch_fisher.backpack_fisher, torch_fisher.backpack_model
    return torch_fisher.nngeometry_fisher, lambda model: model


@pytest.mark.parametrize("estimator", ["argmax", "empirical", "exact"])
@pytest.mark.parametrize("tool", ["hooks", "backpack", "nngeometry"])
def test_torch_tool_equals_ewc_jax(model_and_data, tool, estimator):
    fisher_fn, prepare = _tool(tool)
    import torch

    from benchmarks import torch_tutorial

    weights, inputs, labels = model_and_data
    model = prepare(torch_tutorial.build_mlp(weights))
    y = torch.from_numpy(labels.astype(np.int64)) if estimator == "empirical" else None
    # Chunks of 20 (a partial last one): each tool sums over chunks and divides by N once.
    result = fisher_fn(model, torch.from_numpy(inputs), estimator, y, chunk_size=20)
    actual = torch_tutorial.to_layer_arrays(result)
    expected = _jax_fisher(weights, inputs, estimator, labels if y is not None else None)
    assert np.max(expected[0][0]) > 0
    assert harness.max_relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("tool", ["hooks", "backpack", "nngeometry"])
def test_torch_tool_sampled_is_an_unbiased_estimate_of_exact(model_and_data, tool):
    fisher_fn, prepare = _tool(tool)
    import torch

    from benchmarks import torch_tutorial

    weights, inputs, _ = model_and_data
    model = prepare(torch_tutorial.build_mlp(weights))
    tiled = torch.from_numpy(np.tile(inputs, (MC_COPIES, 1)))
    torch.manual_seed(0)
    actual = torch_tutorial.to_layer_arrays(fisher_fn(model, tiled, "sampled"))
    exact = _jax_fisher(weights, inputs, "exact")
    assert harness.relative_l2_error(actual, exact) < MC_RTOL


def test_ewc_jax_sampled_passes_the_harness_monte_carlo_check(model_and_data):
    weights, inputs, _ = model_and_data
    tiled = np.tile(inputs, (MC_COPIES, 1))
    sampled = _jax_fisher(weights, tiled, "sampled", key=jax.random.key(0))
    exact = _jax_fisher(weights, inputs, "exact")
    error = harness.relative_l2_error(sampled, exact)
    assert error < MC_RTOL
    # The check tells a wrong estimator apart: argmax is far from exact here (3.3).
    assert harness.relative_l2_error(_jax_fisher(weights, inputs, "argmax"), exact) > 10 * MC_RTOL


def test_torch_tool_rejects_unknown_estimator_and_missing_labels(model_and_data):
    fisher_fn, _ = _tool("hooks")
    import torch

    from benchmarks import torch_tutorial

    weights, inputs, _ = model_and_data
    model = torch_tutorial.build_mlp(weights)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fisher_fn(model, torch.from_numpy(inputs), "batched")
    with pytest.raises(ValueError, match="needs labels"):
        fisher_fn(model, torch.from_numpy(inputs), "empirical")


def test_tutorial_loss_gradient_equals_jax_loss_with_penalty(model_and_data):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from benchmarks import torch_tutorial

    weights, inputs, _ = model_and_data
    rng = np.random.default_rng(0)
    start = [(k + np.float32(0.01), b - np.float32(0.01)) for k, b in weights]
    fisher_arrays = [
        (rng.random(k.shape, np.float32), rng.random(b.shape, np.float32)) for k, b in weights
    ]
    labels = rng.integers(0, 10, len(inputs)).astype(np.int32)

    model = torch_tutorial.build_mlp(start)
    names = [name for name, _ in model.named_parameters()]
    precision, means = (
        dict(zip(names, map(torch.from_numpy, epoch.torch_layout(t)), strict=True))
        for t in (fisher_arrays, weights)
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

    state = ewc_jax.consolidate(
        None, workload.flax_params(weights), workload.flax_params(fisher_arrays)
    )
    grads = jax.jit(jax.grad(epoch.loss_fn(strength=2000.0)))(
        workload.flax_params(start), state, jnp.asarray(inputs), jnp.asarray(labels)
    )
    assert harness.max_relative_error(workload.layer_arrays(grads), expected) < 1e-4


def test_torch_entries_are_skipped_with_a_reason():
    config = harness.Config(use_torch=False)
    for estimator in harness.ESTIMATORS:
        for name in fisher.TORCH_METHODS[estimator]:
            assert fisher.skip_reason(name, config) == "disabled with --no-torch"
    entries = [
        harness.Entry("jax_default", "exact", "jax", 10, median_s=0.5),
        harness.Entry("jax_general", "exact", "jax", 10, median_s=2.0),
        harness.Entry("torch_hooks", "exact", "torch", 10, status="skipped", reason="no"),
        harness.Entry("backpack_diag_ggn_exact", "exact", "torch", 10, status="skipped"),
    ]
    ratios = fisher.ratios(entries)
    assert [r["value"] for r in ratios] == [None, None, None, 4.0]
    assert ratios[2]["name"] == "exact: jax_default vs fastest torch (-)"


def test_speedups_known_answer():
    entries = [
        harness.Entry("jax_default", "argmax", "jax", 10, median_s=0.5),
        harness.Entry("torch_hooks", "argmax", "torch", 10, median_s=1.0),
        harness.Entry("backpack_sum_grad_squared", "argmax", "torch", 10, median_s=3.0),
    ]
    ratios = harness.speedups(entries, "jax_default")
    assert [(r["name"], r["value"]) for r in ratios] == [
        ("argmax: jax_default vs torch_hooks", 2.0),
        ("argmax: jax_default vs backpack_sum_grad_squared", 6.0),
        ("argmax: jax_default vs fastest torch (torch_hooks)", 2.0),
    ]


@pytest.mark.slow
def test_quick_harness_writes_the_documented_json(tmp_path):
    # A subprocess at XLA's default optimisation (tests/_xla.py): the harness times its
    # programs, and at LLVM -O0 the run took 60% longer.
    out = tmp_path / "bench.json"
    env = dict(os.environ, EWC_JAX_TEST_XLA_OPTIMIZE="1")
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(FAST_COMPILE, "")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    report = json.loads(out.read_text())
    printed = result.stdout
    assert "argmax: jax_default vs fastest torch" in printed

    assert report["schema_version"] == compare.SCHEMA_VERSION == 3
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
        "roofline",
    }
    roof = report["roofline"]
    assert roof["peak_gflops"] == max(m["gflops"] for m in roof["matmuls"]) > 0
    assert set(roof["ewc_jax_program_flops"]) == set(harness.ESTIMATORS)
    assert [r["family"] for r in roof["families"]] == list(roofline.FAMILY_SIZES)
    assert [r["stage"] for r in roof["profile"]][-1] == "ewc_jax.fisher_diagonal"
    assert "float32 matmul peak under jax.jit" in printed and "argmax stage" in printed
    assert {"cpu_flags", "cpu_flags_summary", "loadavg_start", "loadavg_end"} <= set(
        report["machine"]
    )
    assert report["command"] == f"python -m benchmarks.compare --quick --out {out}"
    sizes = report["config"]["sizes"]
    assert report["config"]["quick"] is True
    assert {"jax_devices", "jax_backend", "cpu_model", "torch_device", "omp_wait_policy"} <= set(
        report["machine"]
    )
    assert report["versions"]["jax"] == jax.__version__

    expected = [
        (estimator, name, n)
        for n in sizes
        for estimator in harness.ESTIMATORS
        for name in fisher.methods(estimator)
    ]
    assert [(e["group"], e["name"], e["n"]) for e in report["fisher"]] == expected
    assert [e["name"] for e in report["epoch"]] == list(epoch.METHODS)
    config = harness.Config(**{**report["config"], "sizes": tuple(sizes)})
    for entry in report["fisher"] + report["epoch"]:
        assert set(entry) == ENTRY_KEYS
        if entry["framework"] == "torch" and entry["status"] == "skipped":
            assert entry["reason"]
            if entry["group"] != "epoch":
                assert entry["reason"] == fisher.skip_reason(entry["name"], config)
            continue
        assert entry["status"] == "ok"
        assert len(entry["samples_s"]) == entry["repeats"] >= 1
        assert entry["median_s"] > 0
        if entry["group"] != "epoch":
            assert entry["gflops"] == pytest.approx(entry["flops"] / entry["median_s"] / 1e9)
            assert entry["peak_fraction"] == pytest.approx(entry["gflops"] / roof["peak_gflops"])
        compiled = entry["framework"] == "jax" or entry["name"] == "torch_compile"
        assert (entry["compile_s"] is not None) == compiled

    assert report["checks"] and all(c["passed"] for c in report["checks"])
    assert all(c["error"] < c["tolerance"] for c in report["checks"])
    assert {c["metric"] for c in report["checks"]} <= {"max_rel_err", "rel_l2_err"}
    names = {(r["name"], r["n"]) for r in report["ratios"]}
    for estimator in harness.ESTIMATORS:
        assert (f"{estimator}: jax_default vs jax_general", sizes[0]) in names
    for r in report["ratios"]:
        assert set(r) == {"name", "group", "n", "reference", "other", "value"}
        assert r["value"] is None or r["value"] > 0


def test_mlp_fisher_flops_known_answer_and_xla_count():
    # 2N(2·Σ d_in·d_out + K·Σ_{l≥2} d_in·d_out) for 3-4-2: Σ = 12 + 8, the second layer's 8.
    assert roofline.mlp_fisher_flops((3, 4, 2), 5, "argmax") == 2 * 5 * (2 * 20 + 8)
    assert roofline.mlp_fisher_flops((3, 4, 2), 5, "exact") == 2 * 5 * (2 * 20 + 2 * 8)
    # XLA's count of ewc_jax's own argmax program adds only elementwise work to it.
    weights = workload.tutorial_weights(0)
    n = 64
    counted = roofline.program_flops(
        lambda p, x: ewc_jax.fisher_diagonal(workload.apply_fn(), p, x, estimator="argmax"),
        workload.flax_params(weights),
        jax.ShapeDtypeStruct((n, workload.LAYER_SIZES[0]), jnp.float32),
    )
    analytic = roofline.mlp_fisher_flops(workload.LAYER_SIZES, n, "argmax")
    assert counted["source"] == "xla"
    assert analytic <= counted["xla"] <= 1.02 * analytic


def test_jaxpr_flops_counts_a_loop_body_per_iteration():
    a = jnp.ones((8, 8), jnp.float32)

    def ten_products(a):
        return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=10)[0]

    counted = roofline.program_flops(ten_products, a)
    assert counted["source"] == "jaxpr (loops)"
    assert counted["flops"] == 10 * 2 * 8**3
    assert counted["xla"] < counted["flops"]  # XLA counts the loop body once


def test_cpu_flags_summary_and_matmul_peak():
    flags = {"avx2": True, "fma": True, "avx512": ["avx512bw", "avx512f"], "amx": []}
    assert roofline.flags_summary(flags) == "avx2 fma avx512 (bw, f)"
    assert roofline.flags_summary({"avx2": False, "avx512": []}) == "none found"
    assert set(roofline.cpu_flags()) == {"avx2", "fma", "avx512", "amx"}
    peak = roofline.matmul_peak(((16, 8, 4, False), (8, 16, 4, True)), repeats=1)
    assert [m["shape"] for m in peak["shapes"]] == ["16x8x4", "8x16x4 (aᵀb)"]
    assert peak["peak_gflops"] == max(m["gflops"] for m in peak["shapes"]) > 0


def test_skip_option_and_hooks_candidates():
    config = compare.parse_args(["--skip", "torch_tutorial_loop,jax_general,jax_default"])
    assert fisher.skip_reason("jax_general", config) == "skipped with --skip"
    assert fisher.skip_reason("jax_default", config) is None  # the reference always runs
    with pytest.raises(SystemExit):
        compare.parse_args(["--skip", "no_such_entry"])
    # ewc_jax's calibration candidates for all N, and the fixed torch_chunk_size.
    assert fisher.hooks_chunk_candidates(10_000, harness.Config(torch_chunk_size=1024)) == (
        10_000,
        5000,
        2500,
        1250,
        1024,
        625,
    )


def test_stage_profile_adds_up():
    rows = roofline.stage_profile(32, repeats=1)
    stages = [r["stage"] for r in rows]
    assert stages == [
        "forward",
        "backward δ",
        "(a²)ᵀδ² contractions",
        "total (minimal JAX)",
        "ewc_jax.fisher_diagonal",
    ]
    assert sum(r["gflop"] for r in rows[:3]) == pytest.approx(rows[3]["gflop"])
    assert sum(r["ms"] for r in rows[:3]) == pytest.approx(rows[3]["ms"])


@pytest.mark.slow
def test_memory_child_reports_peak_rss(capsys):
    (row,) = memory.main(["--sizes", "256", "--paths", "fast"])
    assert row["n"] == 256 and row["path"] == "fast"
    assert row["peak_rss_mib"] > row["rss_before_mib"] > row["data_mib"] > 0
    assert row["fisher_mib"] > 0
    assert "Fisher" in capsys.readouterr().out


def test_paths_benchmark_rows_have_the_documented_shape():
    from benchmarks import paths

    rows = paths.measure("mlp", width=4, n=16, estimator="exact", repeats=1)
    assert [r["mode"] for r in rows] == ["eager", "jit"]
    for row in rows:
        assert {"auto_s", "one_pass_s", "general_s", "auto_over_best"} <= set(row)
        best = min(row["one_pass_s"], row["general_s"])
        assert row["auto_over_best"] == pytest.approx(row["auto_s"] / best)
        assert paths.format_row(row).startswith("mlp")


@pytest.mark.skipif(not harness.installed("torch"), reason=TORCH_REASON)
def test_minimal_programs_compute_the_library_fisher():
    import torch

    from benchmarks import minimal

    weights = workload.tutorial_weights(0)
    x, _ = workload.make_data(40, weights)
    x = x.copy()
    params = workload.flax_params(weights)
    want = ewc_jax.fisher_diagonal(workload.apply_fn(), params, jnp.asarray(x), estimator="argmax")
    layers = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]
    torch_layers = [
        (torch.from_numpy(np.array(w)), torch.from_numpy(np.array(b))) for w, b in weights
    ]
    got_jax = minimal.minimal_jax(layers)(jnp.asarray(x))
    got_torch = minimal.minimal_torch(torch_layers)(torch.from_numpy(x))
    for i, (kernel_sum, bias_sum) in enumerate(reversed(got_jax)):
        ref = want["params"][f"Dense_{i}"]
        np.testing.assert_allclose(np.asarray(kernel_sum) / 40, ref["kernel"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.asarray(bias_sum) / 40, ref["bias"], rtol=1e-5, atol=1e-9)
        t_kernel, _ = list(reversed(got_torch))[i]
        np.testing.assert_allclose(t_kernel.numpy() / 40, ref["kernel"], rtol=1e-4, atol=1e-9)
