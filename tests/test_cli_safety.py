"""The CLI as a user meets it: one line per user error, one run per workdir, signals, --help.

Every case runs ``python -m experiments.main`` in a subprocess (the repository root on
``PYTHONPATH``, so this checkout's code runs) and checks the exact line on stderr, the exit
status, that no traceback appears, and that earlier results are left as they were.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import config as config_lib
from experiments.data import tfds_source
from experiments.reporting import plots
from experiments.runs import experiment as train
from experiments.storage import workdir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
TINY = (
    "--config=experiments/configs/default.py",
    "--config.num_tasks=2",
    "--config.hidden_sizes=16",
    "--config.methods=finetune",
    "--config.fisher_samples=64",
    "--config.epochs=3",
    "--config.datasets=embedded:digits",
)
OLD_RESULTS = {
    "results.json": '{"finished": true}\n',
    "config.json": '{"learning_rate": 0.01}\n',
    "metrics.csv": "method\nfinetune\n",
}


def cli(*args: str, cwd: Path = REPO, python: tuple[str, ...] = ("-m", "experiments.main")):
    return subprocess.run(
        [sys.executable, *python, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write to (root writes anywhere but into sysfs)."""
    if os.geteuid() == 0:
        if not Path("/sys/fs").is_dir():
            pytest.skip("running as root without /sys/fs: no read-only directory to try")
        return Path("/sys/fs")
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    return directory


def test_help_lists_the_flags_and_where_the_fields_are_documented():
    module = cli("--help")
    # The console script's __main__ has no docstring of its own (as with python -c).
    script = cli("--help", python=("-c", "from experiments.main import run; run()"))
    for done in (module, script):
        assert done.returncode == 0, done.stderr
        for text in ("--config:", "--workdir:", "--[no]overwrite:", "config/defaults.py"):
            assert text in done.stdout
        assert "python -m experiments.main" in done.stdout  # the module docstring


def test_tfds_without_tensorflow_is_one_line_naming_what_to_install(tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    if tfds_source._tensorflow_installed():
        pytest.skip("TensorFlow is installed: TFDS would prepare the dataset")
    # TFDS's metadata look-up on GCS off, as in tests/test_data.py: no test reaches the network.
    program = textwrap.dedent(
        f"""
        import tempfile
        from tensorflow_datasets.core.utils import gcs_utils
        gcs_utils._is_gcs_disabled = True
        tempfile.tempdir = {str(tmp_path)!r}
        from experiments.main import run
        run()
        """
    )
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    done = cli(
        *TINY[:-1],
        "--config.datasets=tfds:mnist",
        f"--config.data_dir={data_dir}",
        f"--workdir={tmp_path / 'w'}",
        python=("-c", program),
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f'error: "tfds:mnist" is not prepared in {data_dir}')
    assert done.stderr.count("\n") == 1
    assert 'pip install "ewc-jax[tfds-online]"' in done.stderr
    assert '"embedded:mnist"' in done.stderr and '"idx:/usr/share/datasets' in done.stderr


def test_a_second_run_on_a_workdir_in_use_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "w"
    with workdir.locked(run_dir):
        done = cli(*TINY, f"--workdir={run_dir}")
    assert (done.returncode, done.stderr) == (
        1,
        f"error: {run_dir} is in use by another run (PID {os.getpid()}); wait for it to "
        "finish, stop it, or choose another --workdir\n",
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    # A holder that dies, however it dies, releases the lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from experiments.storage import workdir\n"
            f"with workdir.locked({str(run_dir)!r}):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    with (
        pytest.raises(workdir.WorkdirBusyError, match=rf"\(PID {holder.pid}\)"),
        workdir.locked(run_dir),
    ):
        pass
    holder.kill()
    holder.wait(timeout=60)
    with workdir.locked(run_dir):
        assert (run_dir / workdir.LOCK).read_text() == f"{os.getpid()}\n"


def test_an_interrupted_promotion_is_completed_by_the_next_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "w"
    staging = run_dir / workdir.STAGING
    staging.mkdir(parents=True)
    for name, text in OLD_RESULTS.items():
        (run_dir / name).write_text(text)
    (run_dir / "sweep_runs.csv").write_text("old sweep\n")
    new = {"results.json": '{"new": 1}\n', "config.json": '{"new": 1}\n', "metrics.csv": "n\n"}
    for name, text in new.items():
        (staging / name).write_text(text)
    real_replace, moves = os.replace, []

    def killed_after_one_move(source, target):
        if len(moves) == 2:  # the list of new files, then one of them
            raise KeyboardInterrupt  # stands for SIGKILL
        moves.append(Path(target).name)
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_after_one_move)
        with pytest.raises(KeyboardInterrupt):
            workdir.promote(run_dir)
    assert moves == [workdir.MANIFEST, "config.json"] and not (run_dir / "results.json").exists()
    config = config_lib.get_config()
    with (
        pytest.raises(workdir.WorkdirExistsError, match="already holds finished results"),
        workdir.locked(run_dir),
    ):
        workdir.prepare(config, run_dir, overwrite=False)
    assert {p.name: p.read_text() for p in run_dir.glob("[!.]*")} == new  # old sweep file gone
    assert not staging.exists()


def signal_after_line(command: list[str], signum: int, starts: str) -> tuple[str, str, int]:
    """Runs ``command``, sends ``signum`` once a stdout line starts with ``starts``."""
    process = subprocess.Popen(
        command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(starts):
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=300)
    return "".join(seen) + out, err, process.returncode


@pytest.mark.slow
def test_sigterm_and_sigint_stop_at_a_safe_point_and_the_rerun_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "w"
    command = [sys.executable, "-m", "experiments.main", *TINY, f"--workdir={run_dir}"]
    resume = "rerun the same command to resume\n"
    kept = f"progress up to the last checkpoint in {run_dir} is kept; "
    # SIGTERM once task 1 is done: the run stops after the next epoch, saving it.
    out, err, status = signal_after_line(command, signal.SIGTERM, "[finetune seed 0] task 1/2")
    assert (status, err) == (143, f"interrupted by SIGTERM: {kept}{resume}"), out
    assert "[finetune seed 0] checkpoint" in out.splitlines()[-1]
    # SIGINT as the rerun resumes: it stops again at the next safe point.
    out, err, status = signal_after_line(
        command, signal.SIGINT, "[finetune seed 0] resuming task 2/2"
    )
    assert (status, err) == (130, f"interrupted by SIGINT: {kept}{resume}"), out
    assert "[finetune seed 0] checkpoint" in out.splitlines()[-1]
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "[finetune seed 0] resuming task 2/2 at step " in done.stdout
    resumed = json.loads((run_dir / "results.json").read_text())

    monkeypatch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
    config = config_lib.get_config()
    config.datasets, config.num_tasks, config.hidden_sizes = ("embedded:digits",), 2, (16,)
    config.methods, config.fisher_samples, config.epochs = ("finetune",), 64, 3
    reference = train.train_and_evaluate(config, tmp_path / "reference")
    keys = ("accuracy_matrix", "curves", "metrics", "steps_per_task")
    assert [run[k] for run in resumed["runs"] for k in keys] == [
        run[k] for run in reference["runs"] for k in keys
    ]
