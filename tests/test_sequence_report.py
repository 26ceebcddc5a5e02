"""The language sequence's summaries: each task's final value, the first-versus-last trade-off and
the equal-cost comparison of two methods (``experiments.reporting.sequence_report``)."""

import json

import numpy as np
import pytest

from experiments.reporting import sequence_report

# Two tasks; row t is after training task t. Values are bits per character (lower is better).
KFAC = [np.array([[2.0, 5.0], [2.6, 3.2]]), np.array([[2.0, 5.0], [2.8, 3.0]])]
EWC_LOW = [np.array([[2.0, 5.0], [3.6, 2.4]]), np.array([[2.0, 5.0], [3.4, 2.6]])]
EWC_HIGH = [np.array([[2.0, 5.0], [2.9, 3.6]]), np.array([[2.0, 5.0], [3.1, 3.4]])]
RUNS = {"ewc λ=0.1": EWC_LOW, "ewc λ=1": EWC_HIGH, "kfac λ=1": KFAC}


def test_final_table_is_the_last_rows_mean_and_sample_std():
    table = sequence_report.final_table(RUNS, ["en", "it"]).splitlines()
    assert table[0] == "| method | seeds | en final | it final | average final |"
    # kfac: en (2.6, 2.8) -> 2.700 ± 0.141; it (3.2, 3.0) -> 3.100 ± 0.141; averages (2.9, 2.9).
    assert table[4] == "| kfac λ=1 | 2 | 2.700 ± 0.141 | 3.100 ± 0.141 | 2.900 ± 0.000 |"


def test_equal_cost_interpolates_between_the_other_methods_strengths():
    # EWC's mean end points: λ=0.1 (it 2.5, en 3.5), λ=1 (it 3.5, en 3.0). K-FAC's it is 3.1:
    # 60% of the way from 2.5 to 3.5, so EWC's en there is 3.5 - 0.6 * 0.5 = 3.2.
    [line] = sequence_report.equal_cost_lines(RUNS, "kfac", "ewc")
    assert line == (
        "kfac λ=1: last 3.100, first 2.700, earlier 2.700; "
        "ewc at that last: first 3.200, earlier 3.200"
    )
    # The other way round: EWC λ=0.1's it 2.5 is outside K-FAC's single point, which is refused.
    with pytest.raises(ValueError, match="at least two strengths of 'kfac'"):
        sequence_report.equal_cost_lines(RUNS, "ewc", "kfac")
    wider = {**RUNS, "kfac λ=10": [np.array([[2.0, 5.0], [2.2, 4.0]])]}
    lines = sequence_report.equal_cost_lines(wider, "ewc", "kfac")
    assert lines[0].endswith("outside its range 3.100-4.000")  # λ=0.1's it 2.5 < 3.1
    # λ=1's it 3.5 lies between (3.1, 2.7) and (4.0, 2.2): 2.7 - 0.4 / 0.9 * 0.5.
    assert f"first {2.7 - 0.4 / 0.9 * 0.5:.3f}," in lines[1]


def _write_runs(tmp_path):
    """``RUNS`` as a sweep's results.json (English, then Italian, in bits per character)."""
    document = {
        "sweep": True,
        "config": {"methods": ["ewc", "kfac"], "strength": 1.0, "strengths": {}},
        "task_names": ["en", "it"],
        "metric": "bits_per_character",
        "runs": [
            {
                "method": label.split(" ")[0],
                "strength": float(label.split("=")[1]),
                "accuracy_matrix": matrix.tolist(),
            }
            for label, matrices in RUNS.items()
            for matrix in matrices
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    return path


def test_cli_prints_the_final_table_the_equal_cost_and_draws_the_trade_off(tmp_path, capsys):
    path = _write_runs(tmp_path)
    figure = tmp_path / "trade_off.png"
    sequence_report.main(
        [
            str(path),
            "--every",
            "2",
            "--final",
            "--equal-cost",
            "kfac,ewc",
            "--trade-off",
            str(figure),
        ]
    )
    printed = capsys.readouterr().out
    assert "| kfac λ=1 | 2 | 2.700 ± 0.141 | 3.100 ± 0.141 | 2.900 ± 0.000 |" in printed
    assert "ewc at that last: first 3.200, earlier 3.200" in printed
    assert figure.stat().st_size > 1000
    assert "| method | seeds | avg bpc @2 | BWT @2 |" in printed  # the file's metric names it


def test_one_seed_prints_its_value_without_a_spread():
    one = {"kfac λ=1": KFAC[:1]}
    assert sequence_report.final_table(one, ["en", "it"]).splitlines()[2] == (
        "| kfac λ=1 | 1 | 2.600 | 3.200 | 2.900 |"
    )


def test_a_missing_results_file_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sequence_report.main([str(tmp_path / "absent" / "results.json")])
    assert "no such results file" in capsys.readouterr().err


def test_labels_sort_by_method_then_strength_by_value(tmp_path):
    document = {
        "sweep": True,
        "config": {"methods": ["ewc"], "strength": 1.0, "strengths": {}},
        "runs": [
            {"method": m, "strength": lam, "accuracy_matrix": [[1.0]]}
            for m, lam in [("kfac", 0.3), ("ewc", 10.0), ("ewc", 3.0), ("ewc", 0.1)]
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    assert list(sequence_report.collect_runs([path])) == [
        "ewc λ=0.1",
        "ewc λ=3",
        "ewc λ=10",
        "kfac λ=0.3",
    ]


def test_matrices_of_draws_the_named_labels_only_and_refuses_unknown_ones(
    tmp_path, monkeypatch, capsys
):
    from experiments.reporting import plots

    path = _write_runs(tmp_path)
    drawn = []
    monkeypatch.setattr(
        plots, "plot_accuracy_matrices", lambda summary, *a, **k: drawn.append(summary) or a[1]
    )
    figure = str(tmp_path / "m.png")
    sequence_report.main([str(path), "--matrices", figure, "--matrices-of", "kfac λ=1, ewc λ=1"])
    assert list(drawn[0]) == ["ewc λ=1", "kfac λ=1"]
    np.testing.assert_allclose(drawn[0]["kfac λ=1"]["accuracy_matrix_mean"], np.mean(KFAC, 0))
    with pytest.raises(SystemExit):
        sequence_report.main([str(path), "--matrices", figure, "--matrices-of", "kfac λ=9"])
    assert "no runs labelled ['kfac λ=9']" in capsys.readouterr().err
