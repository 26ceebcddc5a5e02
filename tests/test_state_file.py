"""A consolidated state as a file (ewc_jax.io): round trips bit for bit, refusals in one line.

The reference for a round trip is the state itself: every leaf's bytes, dtype and shape, and the
penalty computed from it here against the one a fresh Python process computes from the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _xla import xla_flags
from flax.core import FrozenDict

import ewc_jax
import ewc_jax.io
from tests import _state_file_worker
from tests._models import init_plain_mlp, plain_mlp

ROOT = Path(__file__).resolve().parents[1]


def _params():
    return init_plain_mlp(jax.random.key(0), (4, 3, 2))


def _ewc_state():
    """A bfloat16 anchor, a float32 precision, a where= selection (a MaskedNode)."""
    params = _params()
    where = {"layer0": {"w": True, "b": False}, "layer1": True}
    fisher = jax.tree.map(lambda p: p * p + 0.5, params)  # any positive precision will do
    return ewc_jax.consolidate(None, params, fisher, where=where, anchor_dtype=jnp.bfloat16), where


def _kfac_state(tasks=2):
    params = _params()
    x = jax.random.normal(jax.random.key(2), (6, 4))
    fisher = ewc_jax.kfac.kfac_fisher(plain_mlp, params, x, estimator="exact")
    state = fisher.empty_precision(params)
    for _ in range(tasks):
        state = ewc_jax.consolidate(state, params, fisher)
        params = jax.tree.map(lambda p: p - 0.125, params)
    return state


def _assert_identical(got, want):
    """Same tree, then per leaf the same shape, dtype and bytes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _one_line_error(match, call, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_ewc_state_round_trip_is_bit_identical(tmp_path):
    state, where = _ewc_state()
    assert state.anchor["layer0"]["w"].dtype == jnp.bfloat16
    assert isinstance(state.anchor["layer0"]["b"], optax.MaskedNode)
    path = ewc_jax.io.save_state(tmp_path / "ewc", state)
    _assert_identical(ewc_jax.io.load_state(path), state)
    _assert_identical(ewc_jax.io.load_state(path, like=state), state)
    _assert_identical(ewc_jax.io.load_state(path, like=ewc_jax.EWCState), state)
    params = jax.tree.map(lambda p: p * 1.5, _params())
    loaded = ewc_jax.io.load_state(path)
    assert float(ewc_jax.penalty(params, loaded, 3.0, where=where)) == float(
        ewc_jax.penalty(params, state, 3.0, where=where)
    )


@pytest.mark.parametrize("tasks", [0, 2])
def test_kfac_state_round_trip_is_bit_identical(tmp_path, tasks):
    state = _kfac_state(tasks)
    assert state.layers[0].a.shape[0] == tasks  # no task yet: zero-size arrays
    path = ewc_jax.io.save_state(tmp_path / "kfac", state)
    _assert_identical(ewc_jax.io.load_state(path), state)
    _assert_identical(ewc_jax.io.load_state(path, like=state), state)


def test_a_fresh_process_computes_the_same_penalty_and_the_root_skips_orbax(tmp_path):
    ewc, where = _ewc_state()
    kfac = _kfac_state()
    ewc_jax.io.save_state(tmp_path / "ewc", ewc)
    ewc_jax.io.save_state(tmp_path / "kfac", kfac)
    params = jax.tree.map(lambda p: p * 1.5 - 0.5, _params())
    want = {
        "ewc": float(ewc_jax.penalty(params, ewc, 7.0, where=where)).hex(),
        "kfac": float(ewc_jax.penalty(params, kfac, 7.0)).hex(),
    }
    assert float.fromhex(want["kfac"]) > 0 and float.fromhex(want["ewc"]) > 0
    script = textwrap.dedent(f"""
        import json, sys, jax, ewc_jax
        assert "ewc_jax.io" not in sys.modules and "orbax" not in sys.modules  # not on the root
        import ewc_jax.io
        from tests._models import init_plain_mlp
        params = jax.tree.map(lambda p: p * 1.5 - 0.5, init_plain_mlp(jax.random.key(0), (4, 3, 2)))
        where = {where!r}
        ewc = ewc_jax.io.load_state({str(tmp_path / "ewc")!r})
        kfac = ewc_jax.io.load_state({str(tmp_path / "kfac")!r}, like=ewc_jax.kfac.KFACState)
        print(json.dumps({{
            "ewc": float(ewc_jax.penalty(params, ewc, 7.0, where=where)).hex(),
            "kfac": float(ewc_jax.penalty(params, kfac, 7.0)).hex(),
        }}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == want


def _largest_array_file(path: Path) -> Path:
    return max((p for p in (path / "arrays").rglob("*") if p.is_file()), key=os.path.getsize)


def test_a_flipped_byte_is_refused(tmp_path):
    path = ewc_jax.io.save_state(tmp_path / "kfac", _kfac_state())
    file = _largest_array_file(path)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    message = _one_line_error(
        "is damaged: .* is changed since it was saved", ewc_jax.io.load_state, path
    )
    assert str(path) in message


def test_a_truncated_or_missing_array_file_is_refused(tmp_path):
    path = ewc_jax.io.save_state(tmp_path / "ewc", _ewc_state()[0])
    file = _largest_array_file(path)
    file.write_bytes(file.read_bytes()[:-7])
    _one_line_error(f"{path} is damaged: .* changed", ewc_jax.io.load_state, path)
    file.unlink()
    _one_line_error(f"{path} is damaged: .* is missing", ewc_jax.io.load_state, path)


def test_an_edited_manifest_is_refused(tmp_path):
    path = ewc_jax.io.save_state(tmp_path / "ewc", _ewc_state()[0])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["leaves"][0]["dtype"] = "float16"
    (path / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error("manifest.json was changed since it was saved", ewc_jax.io.load_state, path)
    (path / "manifest.json").write_text("{")
    _one_line_error("is not an ewc_jax state file", ewc_jax.io.load_state, path)


def test_a_missing_file_is_refused(tmp_path):
    _one_line_error(f"{tmp_path / 'nothing'}: no such", ewc_jax.io.load_state, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    _one_line_error("is not an ewc_jax state file", ewc_jax.io.load_state, tmp_path / "empty")


def test_a_kfac_file_where_an_ewc_state_is_expected_is_refused(tmp_path):
    path = ewc_jax.io.save_state(tmp_path / "kfac", _kfac_state())
    ewc_like = ewc_jax.empty_state(_params())
    for like in (ewc_jax.EWCState, ewc_like):
        _one_line_error(
            "holds KFACState, not the EWCState that like= expects",
            ewc_jax.io.load_state,
            path,
            like=like,
        )


def test_a_like_of_another_tree_is_refused(tmp_path):
    params = _params()
    path = ewc_jax.io.save_state(tmp_path / "ewc", ewc_jax.empty_state(params))
    other = ewc_jax.empty_state({"layer0": params["layer0"]})
    _one_line_error("holds another tree than like=", ewc_jax.io.load_state, path, like=other)


def test_a_tree_the_file_cannot_describe_loads_with_like(tmp_path):
    params = FrozenDict(_params())
    state = ewc_jax.consolidate(None, params, jax.tree.map(jnp.ones_like, params))
    path = ewc_jax.io.save_state(tmp_path / "frozen", state)
    _one_line_error("pass like=", ewc_jax.io.load_state, path)
    _assert_identical(ewc_jax.io.load_state(path, like=ewc_jax.empty_state(params)), state)


def test_saving_replaces_a_state_file_and_refuses_anything_else(tmp_path):
    first, _ = _ewc_state()
    second = _kfac_state()
    path = ewc_jax.io.save_state(tmp_path / "state", first)
    ewc_jax.io.save_state(path, second)
    _assert_identical(ewc_jax.io.load_state(path), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    _one_line_error(
        "is not an ewc_jax state file; refusing", ewc_jax.io.save_state, tmp_path / "notes", first
    )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    _one_line_error("writes an EWCState or a KFACState", ewc_jax.io.save_state, path, _params())


def test_a_crash_while_writing_leaves_the_old_file(tmp_path, monkeypatch):
    old = _kfac_state()
    path = ewc_jax.io.save_state(tmp_path / "state", old)

    def crash(tmp, destination):
        raise KeyboardInterrupt  # after every array and the manifest were written

    monkeypatch.setattr(ewc_jax.io, "_move_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        ewc_jax.io.save_state(path, _ewc_state()[0])
    with pytest.raises(KeyboardInterrupt):
        ewc_jax.io.save_state(tmp_path / "new", _ewc_state()[0])
    _assert_identical(ewc_jax.io.load_state(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, ewc_jax, ewc_jax.io
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 2, jax.devices()
mesh = jax.make_mesh((2,), ("data",))
rows = NamedSharding(mesh, P("data"))
params = {"w": jax.device_put(jnp.arange(8.0).reshape(4, 2), rows), "b": jnp.ones(2)}
fisher = jax.tree.map(lambda p: p * p + 1.0, params)
state = ewc_jax.consolidate(None, params, fisher)
assert state.precision["w"].sharding.is_equivalent_to(rows, 2)
path = ewc_jax.io.save_state(PATH, state)
loaded = ewc_jax.io.load_state(path, like=state)
for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
assert len(loaded.precision["w"].addressable_shards) == 2
shaped = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
abstract = jax.tree.map(shaped, state)
assert ewc_jax.io.load_state(path, like=abstract).anchor["w"].sharding.is_equivalent_to(rows, 2)
try:
    ewc_jax.io.load_state(path, like=jax.eval_shape(lambda s: s, state))
except ValueError as error:
    assert "abstract mesh" in str(error), error
else:
    raise AssertionError("an abstract sharding was taken")
single = ewc_jax.io.load_state(path)
assert single.anchor["w"].sharding.device_set == {jax.devices()[0]}
print("ok")
"""


def test_sharded_state_restores_sharded_on_two_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    script = SHARDED.replace("PATH", repr(str(tmp_path / "sharded")))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"


def test_saving_under_jit_is_refused(tmp_path):
    def save(state):
        ewc_jax.io.save_state(tmp_path / "traced", state)
        return state.num_tasks

    _one_line_error("outside jax.jit", jax.jit(save), ewc_jax.empty_state(_params()))
    assert not (tmp_path / "traced").exists()


def test_numpy_and_python_leaves_are_saved_as_jax_holds_them(tmp_path):
    state = ewc_jax.EWCState(
        anchor={"w": np.arange(3, dtype=np.float32)},
        precision={"w": np.ones(3, np.float32)},
        num_tasks=1,
    )
    loaded = ewc_jax.io.load_state(ewc_jax.io.save_state(tmp_path / "numpy", state))
    _assert_identical(loaded, jax.tree.map(jnp.asarray, state))
    assert loaded.num_tasks.dtype == jnp.int32  # JAX's int without x64


def test_kfac_layers_of_other_leaves_are_refused(tmp_path):
    state = _kfac_state()
    path = ewc_jax.io.save_state(tmp_path / "kfac", state)
    first, *rest = state.layers
    swapped = state._replace(layers=(dataclasses.replace(first, bias=None), *rest))
    _one_line_error("K-FAC layers of other leaves", ewc_jax.io.load_state, path, like=swapped)


@pytest.mark.slow
def test_a_state_sharded_over_two_processes_is_saved_and_read_by_a_third(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["XLA_FLAGS"] = xla_flags()  # one device per process
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    path = tmp_path / "two-processes"
    worker = str(ROOT / "tests" / "_state_file_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(port), str(i), str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-5000:]
    params, precision = _state_file_worker.problem()
    want = ewc_jax.consolidate(None, jax.tree.map(jnp.asarray, params), precision)
    _assert_identical(ewc_jax.io.load_state(path), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two-processes"]
