"""A tiny run (in process and as CLI flags), and killing it with SIGKILL, then resuming it.

Shared by the single-run and the sweep resume tests (``test_checkpoint.py``, ``test_sweep.py``).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from experiments.configs import default

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = (
    "--config=experiments/configs/default.py",
    "--config.datasets=embedded:digits",
    "--config.num_tasks=2",
    "--config.hidden_sizes=16",
    "--config.epochs=3",
    "--config.methods=finetune",
    "--config.methods=ewc",
    "--config.fisher_samples=64",
    "--config.checkpoint_every_steps=50",
)
"""The command-line flags of :func:`tiny_config`."""


def tiny_config(**overrides):
    """Digits, 2 permuted tasks of 3 epochs (45 steps each), a 16-unit MLP, checkpoints at 90."""
    config = default.get_config()
    config.datasets = ("embedded:digits",)
    config.num_tasks = 2
    config.hidden_sizes = (16,)
    config.epochs = 3
    config.methods = ("finetune", "ewc")
    config.fisher_samples = 64
    config.checkpoint_every_steps = 50
    for field, value in overrides.items():
        config[field] = value
    return config


def kill_after_line_then_resume(
    args: list[str], workdir: Path, prefix: str, position: str, log_dir: Path
) -> subprocess.CompletedProcess:
    """Runs ``python -m experiments.main --workdir=<workdir> <args>`` until it prints a line
    that starts with ``prefix`` and holds ``position``, SIGKILLs it, checks that it died
    unfinished, and reruns the same command.

    Returns:
        The finished rerun (stdout and stderr captured).
    """
    command = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log_dir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith(prefix) and position in line:
                os.kill(process.pid, signal.SIGKILL)
                break
        process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert not (workdir / "results.json").exists()
    resumed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed
