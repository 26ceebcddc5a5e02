"""One process of tests/test_state_file.py's two-process save: a state sharded over both.

Run as ``python tests/_state_file_worker.py PORT PROCESS_ID PATH``: it joins a two-process JAX
cluster (2 CPU devices each), shards a consolidated state over the 4 devices, saves it to PATH
(every process writes its own shards) and loads it back with ``like=`` the state: each process
must get its own shards, bit for bit.
"""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ewc_jax
import ewc_jax.io


def problem():
    """Params and precision (NumPy), the same in both processes and the checking one."""
    params = {"w": np.arange(24, dtype=np.float32).reshape(8, 3) / 7, "b": np.ones(3, np.float32)}
    return params, {k: v * v + 0.5 for k, v in params.items()}


def main(port: int, process_id: int, path: str) -> None:
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("model",))

    def global_array(value):
        sharding = NamedSharding(mesh, P("model") if value.shape[0] % 4 == 0 else P())
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    params, precision = (jax.tree.map(global_array, t) for t in problem())
    state = ewc_jax.consolidate(None, params, precision)
    assert not state.anchor["w"].is_fully_addressable
    ewc_jax.io.save_state(path, state)
    loaded = ewc_jax.io.load_state(path, like=state)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype, (a.sharding, b.sharding)
        for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True):
            assert (
                x.index == y.index and np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
            )
    print("ok", process_id)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
