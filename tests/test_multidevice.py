"""Data-parallel Fisher on 8 simulated CPU devices equals the single-device result.

XLA fixes the device count at start-up, so each check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _xla import xla_flags

TESTS = Path(__file__).parent


def run_on_8_devices(code: str) -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_fisher_on_8_devices_equals_one_device():
    out = run_on_8_devices(
        """
        import jax, jax.numpy as jnp
        from _models import LinenCNN, LinenMLP
        import ewc_jax

        jax.config.update("jax_numpy_dtype_promotion", "strict")
        assert jax.device_count() == 8, jax.devices()
        meshes = {
            "explicit": jax.make_mesh((8,), ("data",)),
            "auto": jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
        }
        cases = [(LinenMLP(features=(16,), num_classes=5), (7,), e, f, "auto")
                 for e in ("exact", "sampled", "empirical", "argmax")
                 for f in ("one_pass", "general")]
        cases += [(LinenCNN(num_classes=5), (6, 6, 1), "exact", "one_pass", m) for m in meshes]
        for model, shape, estimator, method, mesh_name in cases:
            params = model.init(jax.random.key(0), jnp.ones((1, *shape)))
            # 37 examples: not divisible by 8 devices, nor by the chunk size 3.
            x = jax.random.normal(jax.random.key(1), (37, *shape))
            y = jax.random.randint(jax.random.key(2), (37,), 0, 5)
            kw = dict(estimator=estimator, key=jax.random.key(3), method=method, chunk_size=3)
            one = ewc_jax.fisher_diagonal(model.apply, params, x, y, **kw)
            many = ewc_jax.fisher_diagonal(model.apply, params, x, y, mesh=meshes[mesh_name], **kw)
            for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one), strict=True):
                err = float(jnp.max(jnp.abs(a - b)) / jnp.max(b))
                assert err < 1e-5, (estimator, method, mesh_name, err)
        # A dropped or doubled example would change the mean: check against 36 and 38 too.
        params = LinenMLP(features=(16,), num_classes=5).init(jax.random.key(0), jnp.ones((1, 7)))
        x = jax.random.normal(jax.random.key(1), (38, 7))
        apply = LinenMLP(features=(16,), num_classes=5).apply
        full = ewc_jax.fisher_diagonal(apply, params, x[:37], mesh=meshes["auto"])
        fewer = ewc_jax.fisher_diagonal(apply, params, x[:36])
        more = ewc_jax.fisher_diagonal(apply, params, x[:38])
        one = ewc_jax.fisher_diagonal(apply, params, x[:37])
        leaf = lambda t: jax.tree.leaves(t)[1]
        assert float(jnp.max(jnp.abs(leaf(full) - leaf(one)))) < 1e-6 * float(jnp.max(leaf(one)))
        assert float(jnp.max(jnp.abs(leaf(fewer) - leaf(one)))) > 1e-4 * float(jnp.max(leaf(one)))
        assert float(jnp.max(jnp.abs(leaf(more) - leaf(one)))) > 1e-4 * float(jnp.max(leaf(one)))
        print("ok", jax.device_count())
        """
    )
    assert "ok 8" in out
