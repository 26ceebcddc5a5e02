"""Checkpoint, resume and determinism of the experiments (``experiments/storage/checkpoint.py``).

A run killed with SIGKILL and resumed must give the uninterrupted run's accuracy matrix bit for
bit on CPU; an interrupted save is never taken for complete; a corrupt checkpoint or one of
another config is refused, never silently replaced by a fresh start.
"""

import contextlib
import copy
import io
import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from _resume import TINY_ARGS, kill_after_line_then_resume, tiny_config

from experiments.reporting import plots
from experiments.runs import experiment as train
from experiments.storage import checkpoint, workdir

TIMING_FIELDS = ("task_wall_time_s", "fisher_wall_time_s", "wall_time_s", "environment")


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """Figures cost seconds per run and are tested elsewhere."""
    monkeypatch.setattr(plots, "write_figures", lambda *args, **kwargs: [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of ``tiny_config()`` (results and printed log)."""
    workdir = tmp_path_factory.mktemp("reference")
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(log):
        patch.setattr(plots, "write_figures", lambda *args, **kwargs: [])
        results = train.train_and_evaluate(tiny_config(), workdir)
    assert not (workdir / "checkpoints").exists()  # removed once finished
    return results, log.getvalue()


def without_timings(tree):
    """A copy of a results tree without the fields that hold wall times or the environment."""
    if isinstance(tree, dict):
        return {k: without_timings(v) for k, v in tree.items() if k not in TIMING_FIELDS}
    if isinstance(tree, list):
        return [without_timings(v) for v in tree]
    return tree


def read_results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_same_config_and_seed_give_identical_results(tmp_path, reference):
    config = tiny_config(estimator="sampled")
    train.train_and_evaluate(config, tmp_path / "a")
    train.train_and_evaluate(copy.deepcopy(config), tmp_path / "b")
    first, second = read_results(tmp_path / "a"), read_results(tmp_path / "b")
    assert first["runs"][0]["task_wall_time_s"] and first["wall_time_s"]  # removed below
    assert without_timings(first) == without_timings(second)
    # Identical up to the method's own choices: finetune has no Fisher, so it equals the
    # reference's finetune; the sampled Fisher makes ewc differ, so the comparison can fail.
    assert without_timings(first["runs"][0]) == without_timings(reference[0]["runs"][0])
    assert first["runs"][1]["accuracy_matrix"] != reference[0]["runs"][1]["accuracy_matrix"]


class Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint was written."""


def test_checkpoints_are_taken_at_whole_epochs(reference):
    log = reference[1]
    # 45 steps per epoch: the first epoch at or past 50 steps ends at 90; 135 ends the task,
    # which is checkpointed after consolidation instead.
    for method in ("finetune", "ewc"):
        saves = [line for line in log.splitlines() if line.startswith(f"[{method} seed 0] check")]
        where = [line.rsplit("(", 1)[1] for line in saves]
        assert where == ["task 1, step 90)", "task 2, step 0)", "task 2, step 90)", "finished)"]


def test_run_stopped_after_a_checkpoint_resumes_to_the_same_results(
    tmp_path, monkeypatch, capsys, reference
):
    config = tiny_config()
    expected = without_timings(reference[0])
    # Saves: finetune 1-4, ewc 5-8 (see the test above). Stop mid-task in finetune, and
    # between ewc's tasks (after its first consolidation, with finetune finished).
    original_save = checkpoint.RunCheckpoints.save
    for stop_after in (1, 6):
        workdir = tmp_path / f"stopped-{stop_after}"
        count = 0

        def save_then_stop(self, arrays, progress, stop_after=stop_after):
            nonlocal count
            path = original_save(self, arrays, progress)
            count += 1
            if count == stop_after:
                raise Killed
            return path

        monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save_then_stop)
        with pytest.raises(Killed):
            train.train_and_evaluate(config, workdir)
        assert not (workdir / "results.json").exists()
        monkeypatch.setattr(checkpoint.RunCheckpoints, "save", original_save)
        resumed = without_timings(train.train_and_evaluate(config, workdir))
        log = capsys.readouterr().out
        if stop_after == 1:
            assert "[finetune seed 0] resuming task 1/2 at step 90" in log
        else:
            assert "[finetune seed 0] finished earlier" in log
            assert "[ewc seed 0] resuming task 2/2 at step 0" in log
        assert resumed == expected, f"stopped after checkpoint {stop_after}"


def test_a_changed_config_is_refused_and_overwrite_starts_afresh(tmp_path, monkeypatch):
    config = tiny_config(epochs=1, methods=("finetune",))
    changed = tiny_config(epochs=1, methods=("finetune",), learning_rate=0.02)
    original_save = checkpoint.RunCheckpoints.save

    def save_then_stop(self, arrays, progress):
        original_save(self, arrays, progress)
        raise Killed

    def stop(self, arrays, progress):
        raise Killed

    # Stopped before its first checkpoint: nothing to lose, another config may use the workdir.
    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", stop)
    with pytest.raises(Killed):
        train.train_and_evaluate(changed, tmp_path)
    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save_then_stop)
    with pytest.raises(Killed):
        train.train_and_evaluate(config, tmp_path)
    monkeypatch.undo()
    with pytest.raises(workdir.WorkdirExistsError, match=r"learning_rate: 0.01 -> 0.02"):
        train.train_and_evaluate(changed, tmp_path)
    # Checkpoint frequency is not part of a run's identity: changing it still resumes.
    config.checkpoint_every_steps = 7
    train.train_and_evaluate(config, tmp_path)
    train.train_and_evaluate(changed, tmp_path, overwrite=True)
    assert read_results(tmp_path)["config"]["learning_rate"] == 0.02


def small_arrays(value: float = 1.0):
    return {"w": jnp.full((2, 3), value), "b": {"c": jnp.arange(4, dtype=jnp.int32)}}


def test_an_unfinished_save_is_never_taken_for_complete(tmp_path):
    run = checkpoint.RunCheckpoints(tmp_path / "ewc-seed0", "f" * 64)
    run.save(small_arrays(1.0), {"task": 0})
    second = run.save(small_arrays(2.0), {"task": 1})
    # Killed inside Orbax's save: only its temporary directory exists.
    in_orbax = tmp_path / "ewc-seed0" / "00000002"
    in_orbax.mkdir()
    (in_orbax / "state.orbax-checkpoint-tmp-1234").mkdir()
    # Killed after Orbax finalized, before the marker was renamed into place.
    before_marker = tmp_path / "ewc-seed0" / "00000003"
    before_marker.mkdir()
    os.system(f"cp -r {second / 'state'} {before_marker / 'state'}")
    (before_marker / ".checkpoint.json.tmp").write_text('{"format": 1, "fing')
    assert run.latest() == second

    arrays, progress = run.restore(small_arrays(0.0))
    assert progress == {"task": 1}
    np.testing.assert_array_equal(arrays["w"], np.full((2, 3), 2.0, np.float32))
    assert not in_orbax.exists() and not before_marker.exists()
    third = run.save(small_arrays(3.0), {"task": 2})
    assert third.name == "00000002"
    # Only the last two complete checkpoints are kept.
    assert sorted(p.name for p in (tmp_path / "ewc-seed0").iterdir()) == ["00000001", "00000002"]


def test_corrupt_or_foreign_checkpoints_raise(tmp_path):
    run = checkpoint.RunCheckpoints(tmp_path / "run", "a" * 64)
    path = run.save(small_arrays(), {"task": 1})

    with pytest.raises(checkpoint.CheckpointError, match="written by a different config"):
        checkpoint.RunCheckpoints(tmp_path / "run", "b" * 64).restore(small_arrays())
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot restore .* another model"):
        run.restore({"w": jnp.zeros((3, 3)), "b": {"c": jnp.zeros(4, jnp.int32)}})
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot restore .* another model"):
        run.restore({"w": jnp.zeros((2, 3))})

    marker = json.loads((path / checkpoint.MARKER).read_text())
    (path / checkpoint.MARKER).write_text(json.dumps({**marker, "format": 99}))
    with pytest.raises(checkpoint.CheckpointError, match="has format 99"):
        run.restore(small_arrays())
    (path / checkpoint.MARKER).write_text(json.dumps(marker))

    for file in (path / checkpoint.STATE).rglob("*"):
        if file.is_file():
            file.write_bytes(b"\0garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"is damaged: state/.*checksum mismatch"):
        run.restore(small_arrays())
    assert (path / checkpoint.MARKER).exists()  # a corrupt checkpoint is left for inspection


def test_one_byte_edited_in_checkpoint_json_is_refused(tmp_path):
    """The marker holds the progress the run resumes from: an edited ``steps_done`` (valid JSON,
    a plausible value) would resume at another step; its own checksum refuses it."""
    run = checkpoint.RunCheckpoints(tmp_path / "run", "a" * 64)
    path = run.save(small_arrays(), {"task": 1, "steps_done": 125})
    assert run.restore(small_arrays())[1] == {"task": 1, "steps_done": 125}
    text = (path / checkpoint.MARKER).read_text()
    assert text.count('"steps_done": 125') == 1
    (path / checkpoint.MARKER).write_text(text.replace('"steps_done": 125', '"steps_done": 124'))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"checkpoint {path} is damaged: checkpoint.json was changed since it was saved "
        rf"\(checksum mismatch\); delete {path} to resume from the one before",
    ):
        run.restore(small_arrays())
    # Restored byte for byte, it resumes again.
    (path / checkpoint.MARKER).write_text(text)
    assert run.restore(small_arrays())[1]["steps_done"] == 125


def test_a_bit_flip_in_a_stored_array_is_refused_naming_what_to_delete(tmp_path):
    run = checkpoint.RunCheckpoints(tmp_path / "run", "a" * 64)
    values = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}
    run.save(values, {"task": 0})
    path = run.save(values, {"task": 1})
    # The array's bytes live in the largest file of the Orbax checkpoint.
    data = max(
        (f for f in (path / checkpoint.STATE).rglob("*") if f.is_file()), key=os.path.getsize
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    relative = data.relative_to(path).as_posix()
    with pytest.raises(checkpoint.CheckpointError) as caught:
        run.restore({"w": jnp.zeros((64, 64))})
    assert str(caught.value) == (
        f"checkpoint {path} is damaged: {relative} is changed since it was saved (checksum "
        f"mismatch); delete {path} to resume from the one before, or pass --overwrite to start "
        "the run afresh"
    )
    # The marker check that runs before training finds it too; once deleted, the one before
    # restores.
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        run.read_marker(path)
    shutil.rmtree(path)
    arrays, progress = run.restore({"w": jnp.zeros((64, 64))})
    assert progress == {"task": 0}
    np.testing.assert_array_equal(arrays["w"], np.arange(4096, dtype=np.float32).reshape(64, 64))


@pytest.mark.slow
def test_sigkill_mid_task_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    workdir = tmp_path / "killed"
    # Two epochs of ewc's second task are saved: kill during its third.
    resumed = kill_after_line_then_resume(
        list(TINY_ARGS),
        workdir,
        "[ewc seed 0] checkpoint",
        "(task 2, step 90)",
        tmp_path,
    )
    assert "[finetune seed 0] finished earlier" in resumed.stdout  # not retrained
    assert "[ewc seed 0] resuming task 2/2 at step 90" in resumed.stdout
    results = read_results(workdir)
    for got, want in zip(results["runs"], reference[0]["runs"], strict=True):
        assert got["accuracy_matrix"] == want["accuracy_matrix"]  # bit for bit
        assert got["curves"] == want["curves"]
    assert without_timings(results["runs"]) == without_timings(reference[0]["runs"])
    summary, expected = results["summary"]["ewc"], reference[0]["summary"]["ewc"]
    assert summary["backward_transfer"] == expected["backward_transfer"]


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    # `make demo` passes a relative --workdir; Orbax itself only accepts absolute paths.
    import jax.numpy as jnp

    from experiments.storage.checkpoint import RunCheckpoints, checkpoints_root

    monkeypatch.chdir(tmp_path)
    ckpts = RunCheckpoints(checkpoints_root("runs/demo") / "ewc-seed0", "f" * 64)
    ckpts.save({"w": jnp.ones(2)}, {"task": 1})
    arrays, progress = ckpts.restore({"w": jnp.zeros(2)})
    assert progress["task"] == 1 and arrays["w"].tolist() == [1.0, 1.0]
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "ewc-seed0").is_dir()
