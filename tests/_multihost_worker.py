"""One process of the two-process test (tests/test_multihost.py); also the README's recipe.

Run as ``python tests/_multihost_worker.py PORT PROCESS_ID OUT.npz``: it joins a two-process
JAX cluster with a coordinator on ``localhost:PORT``, builds a (data=2, model=4) mesh over both
processes' CPU devices (4 each), shards an MLP's params along "model", and computes the Fisher
(data parallel and sharding-preserving), the consolidated state and the penalty on the global
mesh. Process 0 writes the results, gathered to host, to ``OUT.npz``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ewc_jax


def problem():
    """The model, params, inputs and labels both processes (and the reference run) use."""
    from _models import LinenMLP

    model = LinenMLP(features=(24,), num_classes=8)
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))
    x = np.asarray(jax.random.normal(jax.random.key(1), (37, 12)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (37,), 0, 8))
    return model, jax.tree.map(np.asarray, params), x, y


def compute(model, params, x, y, mesh=None):
    """Fisher, consolidated state and penalty: the same calls on one device or a mesh."""
    fisher = ewc_jax.fisher_diagonal(
        model.apply, params, x, y, estimator="empirical", chunk_size=8, mesh=mesh
    )
    state = ewc_jax.consolidate(None, params, fisher)
    moved = jax.tree.map(lambda p: p + 0.01, params)
    return fisher, state, ewc_jax.penalty(moved, state, 100.0)


def main(port: int, process_id: int, out: str) -> None:
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model, params, x, y = problem()

    def global_array(value, spec):
        # Every process holds the whole value here; each device takes its own slice.
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    sharded = jax.tree.map(lambda p: global_array(p, P(*([None] * (p.ndim - 1)), "model")), params)
    x_global, y_global = global_array(x, P()), global_array(y, P())
    fisher, state, value = compute(model, sharded, x_global, y_global, mesh=mesh)
    for leaf, param in zip(jax.tree.leaves(fisher), jax.tree.leaves(sharded), strict=True):
        assert leaf.sharding == param.sharding, (leaf.sharding, param.sharding)
    replicated = jax.tree.map(lambda p: global_array(p, P()), params)
    data_parallel, _, _ = compute(model, replicated, x_global, y_global, mesh=mesh)
    gather = lambda tree: [
        np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in jax.tree.leaves(tree)
    ]
    results = {
        "fisher": gather(fisher),
        "precision": gather(state.precision),
        "anchor": gather(state.anchor),
        "data_parallel": gather(data_parallel),
        "penalty": [np.asarray(multihost_utils.process_allgather(value, tiled=True))],
    }
    if process_id == 0:
        np.savez(out, **{f"{k}_{i}": v for k, vs in results.items() for i, v in enumerate(vs)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
