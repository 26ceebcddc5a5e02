"""Every CLI error is one line ``error: ...`` on stderr and exit status 1 (or a correct run).

The cases share one process (``tests/_cli_driver.py``: the imports once, one ``fork`` per
case), since each CLI start costs a ~2 s import. Each case is ``(argv, cwd, message)``:
``message`` is the whole line after ``error: `` (or a compiled pattern it must match).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_cli_safety import ENV, OLD_RESULTS, TINY, read_only_dir  # noqa: E402


def _shipped() -> str:
    shipped = sorted(p.name for p in (REPO / "experiments/configs").glob("*.py"))
    return ", ".join(name for name in shipped if name != "__init__.py")


def bad_config_path(tmp_path):
    shipped = _shipped()
    return (
        ["--config=experiments/configs/demo.py", f"--workdir={tmp_path / 'w'}"],
        tmp_path,
        f"--config file experiments/configs/demo.py does not exist (relative to {tmp_path}); "
        f"did you mean {REPO / 'experiments/configs/demo.py'}? the configs shipped are "
        f"{shipped} in {REPO / 'experiments/configs'}",
    )


def missing_config_with_a_variant(tmp_path):
    return (
        ["--config=experiments/configs/nothere.py:small", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--config file experiments/configs/nothere.py does not exist (relative to {REPO}); the "
        f"configs shipped are {_shipped()} in {REPO / 'experiments/configs'}",
    )


def bad_value_in_a_variant(tmp_path):
    # A `file.py:variant` spec reaches the config's own checks (the file part is found).
    return (
        [
            "--config=experiments/configs/permuted_mnist.py:small",
            "--config.learning_rate=inf",
            f"--workdir={tmp_path / 'w'}",
        ],
        REPO,
        "learning_rate must be a finite number > 0, got inf",
    )


def comma_separated_methods(tmp_path):
    # Split into names (the comma form of the issue), then checked like any list of methods.
    return (
        [*TINY, "--config.methods=finetune,si,nope", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "unknown method 'nope'; valid methods: finetune, l2, ewc, online_ewc, si, mas, kfac, joint",
    )


def unknown_variant(tmp_path):
    return (
        ["--config=experiments/configs/tutorial.py:big", f"--workdir={tmp_path / 'w'}"],
        REPO,
        re.compile(
            r"--config experiments/configs/tutorial\.py \(line \d+\): unknown variant 'big'; "
            r"valid variants: 'small'"
        ),
    )


def float_for_an_int_field(tmp_path):
    return (
        [*TINY, "--config.fisher_samples=1e8", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "flag --config.fisher_samples=1e8: invalid literal for int() with base 10: '1e8' "
        "(see --help)",
    )


def hidden_size_zero(tmp_path):
    return (
        [
            "--config=experiments/configs/default.py",
            "--config.hidden_sizes=0",
            f"--workdir={tmp_path / 'w'}",
        ],
        REPO,
        "hidden_sizes must all be >= 1 (the width of each hidden layer), got (0,)",
    )


def workdir_is_a_file(tmp_path):
    (tmp_path / "w").write_text("a file")
    return (
        [*TINY, f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--workdir {tmp_path / 'w'} is a file, not a directory; choose another --workdir",
    )


def read_only_workdir(tmp_path):
    directory = read_only_dir(tmp_path)
    return (
        [*TINY, f"--workdir={directory}"],
        REPO,
        f"cannot write to {directory} (Permission denied); choose a writable --workdir",
    )


def overwrite_with_infinite_learning_rate(tmp_path):
    return (
        [*TINY, "--config.learning_rate=inf", "--overwrite", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "learning_rate must be a finite number > 0, got inf",
    )


def config_raises_on_import(tmp_path):
    path = tmp_path / "raises.py"
    path.write_text('import math\nraise RuntimeError("no such setting")\n')
    return (
        [f"--config={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--config {path} (line 2): RuntimeError: no such setting",
    )


def config_with_a_syntax_error(tmp_path):
    path = tmp_path / "syntax.py"
    path.write_text("def get_config(:\n    pass\n")
    return (
        [f"--config={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--config {path}: syntax error on line 1: invalid syntax",
    )


def get_config_raises(tmp_path):
    path = tmp_path / "get_raises.py"
    path.write_text('def get_config():\n    return {}["strength"]\n')
    return (
        [f"--config={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--config {path} (line 2): KeyError: 'strength'",
    )


def get_config_returns_none(tmp_path):
    path = tmp_path / "none.py"
    path.write_text("def get_config():\n    config = 1\n")
    return (
        [f"--config={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"--config {path}: get_config() returned NoneType, not an ml_collections.ConfigDict "
        "(a missing return statement?)",
    )


def init_written_by_np_save(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3, np.float32))
    return (
        [*TINY, f"--config.init={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"init file {path} holds one array (np.save); the init needs an .npz of the "
        "state_dict's named arrays, written with np.savez",
    )


def init_a_text_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("fc1.weight 0.1 0.2\n")
    return (
        [*TINY, f"--config.init={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"init file {path} is not an .npz archive of arrays (write one with np.savez)",
    )


def init_with_a_nan(tmp_path):
    path = tmp_path / "nan.npz"
    weight = np.zeros((16, 64), np.float32)
    weight[3, 5] = np.nan
    arrays = {"fc1.weight": weight, "fc1.bias": np.zeros(16, np.float32)}
    arrays |= {"fc2.weight": np.zeros((10, 16), np.float32), "fc2.bias": np.zeros(10, np.float32)}
    np.savez(path, **arrays)
    return (
        [*TINY, f"--config.init={path}", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"init file {path}: array 'fc1.weight' holds NaN or infinite values",
    )


def empty_workdir(tmp_path):
    return (
        [f"--config={REPO / TINY[0].split('=')[1]}", *TINY[1:], "--workdir="],
        tmp_path,
        "--workdir is empty; give a directory for the results (e.g. --workdir runs/demo)",
    )


def unknown_variant_of_the_demo(tmp_path):
    return (
        ["--config=experiments/configs/demo.py:bogus", f"--workdir={tmp_path / 'w'}"],
        REPO,
        re.compile(
            r"--config experiments/configs/demo\.py \(line \d+\): unknown variant 'bogus'; "
            "the demo has no variants"
        ),
    )


def unknown_variant_of_the_defaults(tmp_path):
    return (
        ["--config=experiments/configs/default.py:small", f"--workdir={tmp_path / 'w'}"],
        REPO,
        re.compile(r"\(line \d+\): unknown variant 'small'; the defaults have no variants"),
    )


def strength_of_finetune(tmp_path):
    return (
        [*TINY, "--config.strengths.finetune=1", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "unknown config field 'strengths.finetune': method 'finetune' has no penalty, hence no "
        "strength; per-method strengths exist for l2, ewc, online_ewc, si, mas, kfac",
    )


def unknown_field_with_a_guess(tmp_path):
    return (
        [*TINY, "--config.learning_rte=0.1", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "unknown config field 'learning_rte' (did you mean 'learning_rate'?); the valid fields "
        "are those of experiments/config/defaults.py",
    )


def renamed_field(tmp_path):
    return (
        [*TINY, "--config.seed=1", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "config field 'seed' was replaced by 'seeds', a tuple: write --config.seeds=<value> "
        "(once per element) or config.seeds = (<value>, ...)",
    )


def one_class_heads(tmp_path):
    return (
        [
            "--config=experiments/configs/split_mnist.py:small",
            "--config.class_groups=((0,), (1,))",
            f"--workdir={tmp_path / 'w'}",
        ],
        REPO,
        "every head of scenario 'split-task' has 1 output: a one-class head is right whatever "
        "the model learns; give every task at least 2 classes in class_groups (or use "
        "split_mode 'class')",
    )


def missing_data_directory(tmp_path):
    return (
        [TINY[0], "--config.datasets=idx:/nonexistent/mnist", f"--workdir={tmp_path / 'w'}"],
        REPO,
        "IDX data directory /nonexistent/mnist does not exist. For Fashion-MNIST install "
        "Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist; files in "
        '/usr/share/datasets/fashion-mnist), or use "embedded:mnist", which needs no files.',
    )


def positional_argument(tmp_path):
    return (
        [*TINY, f"--workdir={tmp_path / 'w'}", "demo"],
        REPO,
        "unexpected argument(s) demo: every setting is a flag, e.g. --config "
        "experiments/configs/demo.py --workdir runs/demo (see --help)",
    )


def full_disk_where_results_are_written(tmp_path):
    # The OSError branch of the CLI: a write that fails for lack of space, named.
    path = tmp_path / "w" / "results.json"
    return (
        [*TINY, f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"cannot write {path}: no space left on device; free some space (or choose a "
        "--workdir on another disk) and rerun the same command",
        f"enospc:{path}",
    )


def full_disk_during_overwrite(tmp_path):
    # With --overwrite, rerunning the same command would start afresh: the line says so.
    path = tmp_path / "w" / "results.json"
    return (
        [*TINY, "--overwrite", f"--workdir={tmp_path / 'w'}"],
        REPO,
        f"cannot write {path}: no space left on device; free some space (or choose a "
        "--workdir on another disk) and rerun the command without --overwrite (with it, the "
        "run starts afresh from task 1)",
        f"enospc:{path}",
    )


CASES = [
    bad_config_path,
    missing_config_with_a_variant,
    bad_value_in_a_variant,
    comma_separated_methods,
    unknown_variant,
    float_for_an_int_field,
    hidden_size_zero,
    workdir_is_a_file,
    read_only_workdir,
    overwrite_with_infinite_learning_rate,
    config_raises_on_import,
    config_with_a_syntax_error,
    get_config_raises,
    get_config_returns_none,
    init_written_by_np_save,
    init_a_text_file,
    init_with_a_nan,
    empty_workdir,
    unknown_variant_of_the_demo,
    unknown_variant_of_the_defaults,
    strength_of_finetune,
    unknown_field_with_a_guess,
    renamed_field,
    one_class_heads,
    missing_data_directory,
    positional_argument,
    full_disk_where_results_are_written,
    full_disk_during_overwrite,
]
"""Each: ``tmp_path -> (argv, cwd, message[, raise])`` (``raise``: see tests/_cli_driver.py)."""

OTHER = {
    "help_short": (["-h"], REPO),
    "helpshort": (["--helpshort"], REPO),
    "interrupted_overwrite": ([*TINY, "--overwrite", "--workdir=w"], REPO, "interrupt"),
}
"""Driver cases that end otherwise: help (exit 0) and an interrupted ``--overwrite`` (130)."""


def run_driver(cases: list[dict], tmp_path: Path) -> dict[str, dict]:
    """Runs ``cases`` through ``tests/_cli_driver.py``; the outcome of each, by name."""
    cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
    cases_path.write_text(json.dumps(cases))
    subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cli_driver.py"), cases_path, results_path],
        cwd=REPO,
        env=ENV,
        check=True,
        timeout=600,
    )
    return {r["name"]: r for r in json.loads(results_path.read_text())}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case of :data:`CASES` and :data:`OTHER`, run once in one driver process."""
    root = tmp_path_factory.mktemp("cli")
    cases, expected = [], {}
    for case in CASES:
        tmp_path = root / case.__name__
        tmp_path.mkdir()
        if case is overwrite_with_infinite_learning_rate:
            (tmp_path / "w").mkdir()
            for name, text in OLD_RESULTS.items():
                (tmp_path / "w" / name).write_text(text)
        argv, cwd, message, *patch = case(tmp_path)
        cases.append(
            {
                "name": case.__name__,
                "argv": argv,
                "cwd": str(cwd),
                "raise": patch[0] if patch else None,
            }
        )
        expected[case.__name__] = (message, tmp_path)
    for name, (argv, cwd, *patch) in OTHER.items():
        (root / name).mkdir()
        argv = [a.replace("--workdir=w", f"--workdir={root / name / 'w'}") for a in argv]
        cases.append(
            {"name": name, "argv": argv, "cwd": str(cwd), "raise": patch[0] if patch else None}
        )
    return run_driver(cases, root), expected, root


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_user_errors_are_one_line_on_stderr(outcomes, case):
    results, expected, _ = outcomes
    result = results[case.__name__]
    message, tmp_path = expected[case.__name__]
    assert result["returncode"] == 1, result
    assert result["stderr"].endswith("\n") and result["stderr"].count("\n") == 1, result["stderr"]
    line = result["stderr"].rstrip("\n")
    assert line.startswith("error: "), line
    if isinstance(message, re.Pattern):
        assert message.search(line), line
    else:
        assert line == f"error: {message}"
    old = tmp_path / "w"
    if case is overwrite_with_infinite_learning_rate:
        assert {p.name: p.read_text() for p in old.glob("[!.]*")} == OLD_RESULTS
    elif case is empty_workdir:
        assert list(tmp_path.iterdir()) == []  # nothing written into the current directory
    else:
        assert not (old / "results.json").exists()


def test_help_flags_print_the_help_and_exit_0(outcomes):
    results, _, _ = outcomes
    for name in ("help_short", "helpshort"):
        assert results[name]["returncode"] == 0, results[name]
        assert (
            "--workdir:" in results[name]["stdout"]
            and "python -m experiments.main" in results[name]["stdout"]
        )


def test_an_interrupted_overwrite_says_how_to_resume(outcomes):
    results, _, root = outcomes
    result = results["interrupted_overwrite"]
    assert result["returncode"] == 130, result
    assert result["stderr"] == (
        f"interrupted by SIGINT: progress up to the last checkpoint in "
        f"{root / 'interrupted_overwrite' / 'w'} is kept; rerun the command without "
        "--overwrite to resume (with it, the run starts afresh)\n"
    )
