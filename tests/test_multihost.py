"""The README's multi-host recipe, run for real: two JAX processes on this machine.

Two worker processes (``tests/_multihost_worker.py``) join one cluster through
``jax.distributed.initialize`` with a coordinator on localhost; CPU collectives across
processes go through gloo (jax's default ``jax_cpu_collectives_implementation``). Each process
contributes 4 CPU devices to a global (data=2, model=4) mesh. The Fisher (sharding-preserving
and data parallel), the consolidated state and the penalty computed on that mesh must equal the
same calls in this single process on one device.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from _xla import xla_flags

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    sys.path.insert(0, str(TESTS))
    import _multihost_worker as worker

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = xla_flags()  # one device per process
    port, out = free_port(), tmp_path / "two_processes.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "_multihost_worker.py"), str(port), str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    got = np.load(out)
    model, params, x, y = worker.problem()
    fisher, state, value = worker.compute(model, params, x, y)
    expected = {
        "fisher": jax.tree.leaves(fisher),
        "data_parallel": jax.tree.leaves(fisher),
        "precision": jax.tree.leaves(state.precision),
        "anchor": jax.tree.leaves(state.anchor),
        "penalty": [value],
    }
    scale = max(float(np.max(f)) for f in expected["fisher"])
    for name, leaves in expected.items():
        for i, want in enumerate(leaves):
            have = got[f"{name}_{i}"]
            assert have.shape == np.shape(want), (name, i)
            # float32 reduction-order noise: examples are summed in a different order.
            tolerance = 1e-6 * (scale if name in ("fisher", "data_parallel", "precision") else 1)
            np.testing.assert_allclose(have, np.asarray(want), rtol=1e-5, atol=tolerance)
