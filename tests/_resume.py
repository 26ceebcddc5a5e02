"""Kill a CLI run with SIGKILL right after a given checkpoint, then rerun the same command.

Shared by the single-run and the sweep resume tests (``test_checkpoint.py``, ``test_sweep.py``).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
