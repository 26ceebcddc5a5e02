"""Sharded params stay sharded: the Fisher, the state and the penalty on a 2x4 mesh.

Params are sharded along the "model" axis of a (data=2, model=4) mesh of 8 simulated CPU
devices (tensor parallel; one case FSDP along "data"). Every result must equal the single-device
result (float32 reduction-order noise: within 1e-5 of the largest Fisher entry), carry its
parameter's sharding, and come from compiled programs that never all-gather a sharded parameter
to its full shape (read from the optimised HLO). XLA fixes the device count at start-up, so all
cases run in one subprocess.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _xla import xla_flags

TESTS = Path(__file__).parent

CODE = """
import glob, re
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from _models import LinenMLP, TinyCausalLM
import ewc_jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"))
DUMP = {dump!r}


def along(axis, size):
    # Shards the last dimension divisible by the axis size; others replicated.
    def spec(leaf):
        for d in reversed(range(leaf.ndim)):
            if leaf.shape[d] % size == 0:
                return P(*[axis if i == d else None for i in range(leaf.ndim)])
        return P()
    return spec


def shard(params, spec):
    return jax.tree.map(lambda p: jax.device_put(p, NamedSharding(mesh, spec(p))), params)


def gathered_shapes(hlo):
    # Result shapes of every all-gather in an optimised HLO module.
    return {{tuple(int(d) for d in m.split(",") if d)
            for m in re.findall(r"= [a-z0-9]+\\[([0-9,]*)\\][^ ]* all-gather\\(", hlo)}}


def full_shapes(params):
    return {{tuple(p.shape) for p in jax.tree.leaves(params) if not p.sharding.is_fully_replicated}}


def check(name, got, want, params):
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want)) or 1.0
    for g, w, p in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(params),
                       strict=True):
        err = float(jnp.max(jnp.abs(g - w))) / scale
        assert err < 1e-5, (name, err)
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (name, g.sharding, p.sharding)


mlp = LinenMLP(features=(24,), num_classes=8)
params = mlp.init(jax.random.key(0), jnp.ones((1, 12)))
x = jax.random.normal(jax.random.key(1), (37, 12))
tp = shard(params, along("model", 4))
fsdp = shard(params, along("data", 2))
for method in ("one_pass", "general"):
    kw = dict(method=method, chunk_size=8)
    one = ewc_jax.fisher_diagonal(mlp.apply, params, x, **kw)
    check(("mlp", method), ewc_jax.fisher_diagonal(mlp.apply, tp, x, mesh=mesh, **kw), one, tp)
check("fsdp", ewc_jax.fisher_diagonal(mlp.apply, fsdp, x, mesh=mesh, **kw), one, fsdp)

lm = TinyCausalLM(vocab=8, width=8)
tokens = jax.random.randint(jax.random.key(2), (13, 5), 0, 8)
lm_params = lm.init(jax.random.key(0), tokens[:1])
lm_tp = shard(lm_params, along("model", 4))
kw = dict(estimator="sampled", key=jax.random.key(3), chunk_size=4, method="one_pass")
one = ewc_jax.fisher_diagonal(lm.apply, lm_params, tokens, **kw)
lm_fisher = ewc_jax.fisher_diagonal(lm.apply, lm_tp, tokens, mesh=mesh, **kw)
check("lm", lm_fisher, one, lm_tp)

# The tensor-parallel Fisher programs (MLP both paths, LM): no sharded leaf gathered whole.
modules = glob.glob(f"{{DUMP}}/*jit__chunked_fisher*after_optimizations.txt")
assert len(modules) >= 4, modules
forbidden = full_shapes(tp) | full_shapes(lm_tp)
seen = set()
for path in modules:
    seen |= gathered_shapes(open(path).read())
assert not seen & forbidden, (seen & forbidden)
print("fisher all-gathers", sorted(seen), "forbidden", sorted(forbidden))

# State, penalty and the Optax transform on the sharded LM: sharded, equal, no full gathers.
moved = jax.tree.map(lambda p: p + 0.01, lm_tp)
state = ewc_jax.consolidate(None, lm_tp, lm_fisher)
check("precision", state.precision, lm_fisher, lm_tp)
check("anchor", state.anchor, lm_params, lm_tp)
dense_state = ewc_jax.consolidate(None, lm_params, one)
want = ewc_jax.penalty(jax.tree.map(lambda p: p + 0.01, lm_params), dense_state, 3.0)
penalty = jax.jit(ewc_jax.penalty)
assert abs(float(penalty(moved, state, 3.0)) - float(want)) < 1e-5 * float(want)
tx = ewc_jax.add_ewc_penalty(3.0)
opt_state = ewc_jax.set_ewc_state(tx.init(lm_tp), state)
check("empty state", tx.init(lm_tp).ewc.precision, jax.tree.map(jnp.zeros_like, one), lm_tp)
update = jax.jit(tx.update)
zeros = jax.tree.map(jnp.zeros_like, lm_tp)
grads = jax.jit(jax.grad(ewc_jax.penalty))(moved, state, 3.0)
check("update", update(zeros, opt_state, moved)[0], grads, lm_tp)
for fn, args in ((penalty, (moved, state, 3.0)), (update, (zeros, opt_state, moved)),
                 (jax.jit(ewc_jax.consolidate), (state, lm_tp, lm_fisher))):
    hlo = fn.lower(*args).compile().as_text()
    assert not gathered_shapes(hlo) & forbidden, gathered_shapes(hlo)
print("ok")
"""


@pytest.mark.slow
def test_sharded_params_stay_sharded(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(
            "--xla_force_host_platform_device_count=8", f"--xla_dump_to={tmp_path}"
        ),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CODE.format(dump=str(tmp_path)))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
