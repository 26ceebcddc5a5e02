"""Sharded K-FAC: factors, state, penalty and a train step on a 2x4 mesh of 8 simulated CPUs.

XLA fixes the device count at start-up, so the checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and ``--xla_dump_to`` (for the factor
program's optimised HLO).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _xla import xla_flags

CODE = """
import glob, re
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import ewc_jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes, jax's default
DUMP = {dump!r}


def model(p, x):
    # A scale without a Kronecker block: its diagonal Fisher comes from the factors' pass.
    h = jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"][None]) * p["s"][None]
    h = jnp.tanh(h @ p["l1"]["w"])
    h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"][None])
    # A DenseGeneral with two output axes (attention's per-head [D, H, Dh] projection).
    h = jnp.tanh(jnp.einsum("bi,ihd->bhd", h, p["l2h"]["w"]) + p["l2h"]["b"][None])
    return h.reshape(h.shape[0], -1) @ p["l3"]["w"] + p["l3"]["b"][None]


k = jax.random.split(jax.random.key(0), 12)
params = {{
    "l0": {{"w": jax.random.normal(k[0], (8, 16)) / 3, "b": jax.random.normal(k[1], (16,))}},
    "l1": {{"w": jax.random.normal(k[2], (16, 12)) / 3}},
    "l2": {{"w": jax.random.normal(k[3], (12, 8)) / 3, "b": jax.random.normal(k[4], (8,))}},
    "l2h": {{"w": jax.random.normal(k[9], (8, 4, 2)) / 3,
               "b": jax.random.normal(k[10], (4, 2))}},
    "l3": {{"w": jax.random.normal(k[5], (8, 5)) / 3, "b": jax.random.normal(k[6], (5,))}},
    "s": 1.0 + 0.2 * jax.random.normal(k[11], (16,)),
}}
spec = {{
    "l0": {{"w": P(None, "model"), "b": P("model")}},  # kernel split along out
    "l1": {{"w": P("model", None)}},  # along in
    "l2": {{"w": P("model", None), "b": P()}},  # along in, with a bias
    "l2h": {{"w": P(None, "model", None), "b": P("model", None)}},  # along the heads
    "l3": {{"w": P(), "b": P()}},  # replicated
    "s": P("model"),  # along l0's out axis, as its activations are
}}
# (A, G) specs: A's rows follow the kernel's in axis (whole with a bias: [W; b] has in + 1
# rows, which 4 devices cannot split evenly), G's rows its out axis (for [D, H, Dh] the
# flattened H·Dh columns, split in blocks along H).
want = [(P(None, None), P("model", None)), (P("model", None), P(None, None)),
        (P(None, None), P(None, None)), (P(None, None), P("model", None)),
        (P(None, None), P(None, None))]
sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, spec)
x = jax.random.normal(k[7], (16, 8))
y = jax.random.randint(k[8], (16,), 0, 5)
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ys = jax.device_put(y, NamedSharding(mesh, P("data")))
forbidden = {{
    tuple(p.shape) for p in jax.tree.leaves(sharded) if not p.sharding.is_fully_replicated
}}


def gathered(hlo):
    return sorted(re.findall(r"= ([a-z0-9]+\\[[0-9,]*\\])[^ ]* all-gather\\(", hlo))


def whole_params(hlo):
    # All-gathers whose result is a sharded parameter's full shape (leading 1s dropped: a
    # [1, in, out] stack of one deviation is a whole kernel too).
    found = set()
    for dims in re.findall(r"= [a-z0-9]+\\[([0-9,]*)\\][^ ]* all-gather\\(", hlo):
        shape = tuple(int(d) for d in dims.split(",") if d)
        while shape and shape[0] == 1:
            shape = shape[1:]
        found |= {{shape}} & forbidden
    return found


# The check can fail: replicating a kernel split along "model" is an all-gather of its shape.
replicate = jax.jit(lambda w: w * 1.0, out_shardings=NamedSharding(mesh, P()))
assert whole_params(replicate.lower(sharded["l1"]["w"]).compile().as_text()) == {{(16, 12)}}


def close(got, ref, what):
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(ref), rtol=1e-10, atol=1e-12, err_msg=what
    )


kw = dict(estimator="sampled", key=jax.random.key(1), chunk_size=8)
one = ewc_jax.kfac.kfac_fisher(model, params, x, **kw)
many = ewc_jax.kfac.kfac_fisher(model, sharded, xs, **kw)
for i, (a, b, (sa, sg)) in enumerate(zip(one.layers, many.layers, want, strict=True)):
    close(b.a, a.a, f"A{{i}}")
    close(b.g, a.g, f"G{{i}}")
    assert b.a.sharding.mesh == mesh and b.a.sharding.spec == sa, (i, b.a.sharding)
    assert b.g.sharding.mesh == mesh and b.g.sharding.spec == sg, (i, b.g.sharding)
# The unfactored scale's diagonal Fisher, from the same pass, on the scale's own layout.
assert float(np.max(one.diagonal["s"])) > 0
close(many.diagonal["s"], one.diagonal["s"], "diagonal s")
assert many.diagonal["s"].sharding == sharded["s"].sharding, many.diagonal["s"].sharding
# (a) The factor programs (one device, and sharded): no sharded kernel gathered whole.
modules = glob.glob(f"{{DUMP}}/*jit_factors_pass*after_optimizations.txt")
assert len(modules) == 2, modules
for path in modules:
    assert not whole_params(open(path).read()), path
    print("factors: all-gathers", gathered(open(path).read()))

# The state: two online consolidations, merged; equal to one device, laid out as the factors.
online = jax.jit(ewc_jax.consolidate, static_argnames="mode")
def state(p, f):
    first = ewc_jax.consolidate(None, p, f, mode="online")
    both = online(first, p, f, mode="online", gamma=0.5)
    return jax.jit(ewc_jax.kfac.merge_kronecker_terms)(both)
state_1, state_8 = state(params, one), state(sharded, many)
for i, (t1, t8, (sa, sg)) in enumerate(zip(state_1.layers, state_8.layers, want, strict=True)):
    for field in ("a", "g", "anchor"):
        close(getattr(t8, field), getattr(t1, field), f"{{field}}{{i}}")
    assert t8.a.sharding.spec == P(None, *sa) and t8.g.sharding.spec == P(None, *sg), i
    assert t8.anchor.sharding.spec == P(None, sa[0], sg[0]), (i, t8.anchor.sharding)

# The penalty and its gradient, jitted on the mesh, against one device.
moved_1 = jax.tree.map(lambda a: a + 0.1, params)
moved_8 = jax.tree.map(lambda a: a + 0.1, sharded)
penalty = jax.jit(ewc_jax.penalty).lower(moved_8, state_8, 2.0).compile()
assert not whole_params(penalty.as_text())
print("penalty: all-gathers", gathered(penalty.as_text()))
close(penalty(moved_8, state_8, 2.0), jax.jit(ewc_jax.penalty)(moved_1, state_1, 2.0), "penalty")
grad = jax.jit(jax.grad(ewc_jax.penalty))
jax.tree.map(lambda g, w: close(g, w, "gradient"), grad(moved_8, state_8, 2.0),
             grad(moved_1, state_1, 2.0))

# (b) A train step with the penalty in add_ewc_penalty: the model's forward and backward run
# on Auto axes (jax.sharding.auto_axes, gradients back in the params' layout), the transform
# on the Explicit mesh.
tx = optax.chain(ewc_jax.add_ewc_penalty(2.0), optax.sgd(0.1))
shardings = jax.tree.map(lambda a: a.sharding, sharded)


def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(p, x), y).mean()


def step(p, opt_state, x, y, grad=jax.grad(loss)):
    updates, opt_state = tx.update(grad(p, x, y), opt_state, p)
    return optax.apply_updates(p, updates)


with jax.set_mesh(mesh):
    opt_8 = ewc_jax.set_ewc_state(tx.init(sharded), state_8)
    auto = jax.sharding.auto_axes(jax.grad(loss), out_sharding=shardings)
    train_step = jax.jit(lambda *a: step(*a, grad=auto)).lower(sharded, opt_8, xs, ys).compile()
    new_8 = train_step(sharded, opt_8, xs, ys)
assert not whole_params(train_step.as_text())
print("train step: all-gathers", gathered(train_step.as_text()))
opt_1 = ewc_jax.set_ewc_state(tx.init(params), state_1)
new_1 = jax.jit(step)(params, opt_1, x, y)
jax.tree.map(lambda g, w: close(g, w, "step"), new_8, new_1)
for leaf, sharding in zip(jax.tree.leaves(new_8), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
print("ok")
"""


@pytest.mark.slow
def test_kfac_on_a_2x4_mesh_keeps_the_layers_sharding(tmp_path):
    """Kernels split along a mesh axis (FSDP-style: along ``in``, along ``out``, along ``in`` with
    a bias, a ``[D, H, Dh]`` kernel along its heads, and one replicated) and an elementwise
    scale without a block (split along its features) on the (data=2, model=4) mesh, examples
    over "data".

    Checked against one device (float64, rtol 1e-10): the factors, the scale's diagonal (on
    the scale's own layout), the state after two online consolidations and
    ``merge_kronecker_terms``, the penalty and its gradient, and a train step. Layout: ``A``
    split along the kernel's ``in`` axis (whole with a bias), ``G`` along its ``out`` axis,
    replicated for a replicated kernel; the state's stacks and anchors the same; the step's
    new params keep their shardings. HLO: the optimised programs of (a) the
    factor computation (both ``factors_pass`` modules XLA dumps) and (b) the jitted train step (and
    the jitted penalty) hold no ``all-gather`` whose result shape, leading 1s dropped, equals a
    sharded parameter's full shape; all-gathers of activations and examples are allowed.
    """
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(
            "--xla_force_host_platform_device_count=8", f"--xla_dump_to={tmp_path}"
        ),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CODE.format(dump=str(tmp_path)))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "ok" in result.stdout
