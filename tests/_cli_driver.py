"""Runs many CLI invocations in one process: the imports once, then one ``fork`` per case.

Each CLI start costs a ~2 s import; the cases that end in one line (or a small run) share it.
Usage: ``python tests/_cli_driver.py cases.json results.json``, where each case is
``{"name", "argv", "cwd", "raise"}`` (``raise``: optional, an exception that the experiment
raises instead of running, to reach the CLI's own branches: ``"interrupt"`` or
``"enospc:<path>"``). Each result is ``{"name", "returncode", "stdout", "stderr"}``.

A child sets up nothing the parent has not: the parent imports the modules but never starts a
JAX backend, so each child starts its own.
"""

import errno
import json
import os
import signal
import sys
import tempfile

import experiments.main as cli
from experiments.training.signals import Interrupted


def _raiser(kind: str):
    def raise_it(*args, **kwargs):
        del args, kwargs
        if kind == "interrupt":
            raise Interrupted(signal.SIGINT)
        path = kind.split(":", 1)[1]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    return raise_it


def run_case(case: dict, out_dir: str) -> dict:
    """Forks, runs the CLI with ``case["argv"]`` in the child, and collects its outcome."""
    stdout_path = os.path.join(out_dir, f"{case['name']}.out")
    stderr_path = os.path.join(out_dir, f"{case['name']}.err")
    pid = os.fork()
    if pid == 0:  # the child: the CLI, its output to files, its status to the parent
        code = 0
        try:
            with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                os.chdir(case["cwd"])
                if case.get("raise"):
                    cli.train_and_evaluate = _raiser(case["raise"])
                sys.argv = ["experiments.main", *case["argv"]]
                try:
                    cli.run()
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
                    if isinstance(stop.code, str):
                        print(stop.code, file=sys.stderr)
        except BaseException as error:
            print(f"driver: {type(error).__name__}: {error}", file=sys.stderr)
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    with open(stdout_path) as out, open(stderr_path) as err:
        return {
            "name": case["name"],
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read(),
            "stderr": err.read(),
        }


def main() -> None:
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path) as handle:
        cases = json.load(handle)
    with tempfile.TemporaryDirectory() as out_dir:
        results = [run_case(case, out_dir) for case in cases]
    with open(results_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
