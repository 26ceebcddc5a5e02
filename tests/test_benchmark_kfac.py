"""``python -m benchmarks.kfac --quick``: the report has its rows and positive finite ratios.

Timings are not asserted (benchmarks measure, tests check). The smoke test runs the MLP with the
sampled estimator only: the transformer's ``kfac_fisher`` alone compiles for 10-25 s on two
cores, more than this test may take.
"""

from __future__ import annotations

import itertools
import json
import math

import jax
import pytest

from benchmarks import kfac

FISHER_ROWS = {
    "forward+backward",
    "kfac_fisher sampled",
    "fisher_diagonal sampled",
    "kfac-jax fisher_gradients",
}
STEP_ROWS = {"plain step", "EWC (diagonal) penalty step", "K-FAC penalty step"}


def test_quick_report_has_every_row_and_positive_finite_ratios(tmp_path, capsys):
    out = tmp_path / "kfac.json"
    argv = ["--quick", "--models", "mlp", "--estimators", "sampled", "--out", str(out)]
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction: float ** int32
        kfac.main(argv)
    report = json.loads(out.read_text())
    assert {r["name"] for r in report["fisher"]} == FISHER_ROWS
    assert {r["name"] for r in report["steps"]} == STEP_ROWS
    assert {r["model"] for r in report["fisher"] + report["steps"]} == {"mlp"}
    for row in report["fisher"] + report["steps"]:
        if row["name"].startswith("kfac-jax") and row["status"] == "skipped":
            assert row["reason"]  # not installed, or failed on this jax: says which
            continue
        assert row["status"] == "ok", row
        assert len(row["samples_s"]) == kfac.QUICK_OVERRIDES["repeats"]
    ok = {r["name"] for r in report["fisher"] + report["steps"] if r["status"] == "ok"}
    ratios = {r["name"]: r for r in report["ratios"]}
    expected = {f"{n} / forward+backward" for n in FISHER_ROWS - {"forward+backward"}}
    expected |= {f"{n} / plain step" for n in STEP_ROWS - {"plain step"}}
    assert set(ratios) == expected
    for name, ratio in ratios.items():
        if name.split(" / ")[0] in ok:
            assert math.isfinite(ratio["value"]) and ratio["value"] > 0, ratio
        else:
            assert ratio["value"] is None
    assert ratios["kfac_fisher sampled / forward+backward"]["target"] == kfac.SAMPLED_TARGET
    # FLOPs: at least the matrix products each computation must make (quick MLP 16-8-10, N = 8):
    # forward+backward the forward's products and the kernels' gradients; kfac_fisher the
    # forward and, per layer, A = ā āᵀ ([in + 1]²) and G = δ δᵀ ([out]²) over the N examples.
    n, sizes = kfac.QUICK_OVERRIDES["mlp_examples"], (16, 8, 10)
    dense = sum(2 * n * i * o for i, o in itertools.pairwise(sizes))
    factors = sum(2 * n * ((i + 1) ** 2 + o**2) for i, o in itertools.pairwise(sizes))
    gflop = {r["name"]: r["gflop"] for r in report["fisher"] if r["status"] == "ok"}
    assert gflop["forward+backward"] * 1e9 >= 2 * dense
    assert gflop["kfac_fisher sampled"] * 1e9 >= dense + factors
    assert gflop["fisher_diagonal sampled"] * 1e9 >= 2 * dense
    flops = ratios["kfac_fisher sampled / forward+backward"]["flop_value"]
    assert flops == pytest.approx(gflop["kfac_fisher sampled"] / gflop["forward+backward"])
    printed = capsys.readouterr().out
    assert "kfac_fisher sampled" in printed and "K-FAC penalty step" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "cnn"], "--models"),
        (["--estimators", "empirical"], "--estimators"),
        (["--estimators", "sampled,argmax"], "--estimators"),
    ],
)
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        kfac.parse_args(argv)
    assert message in capsys.readouterr().err
