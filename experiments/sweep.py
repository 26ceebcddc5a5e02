"""Seed x strength sweeps as one ``jax.vmap``-ed program.

``--config.sweep.seeds=S`` and/or ``--config.sweep.strengths=100,1000,10000`` turn a run into a
sweep: for every method of the config, its S x K runs (one per seed and strength; unregularised
methods have one strength, 0) train side by side. Every function of the training loop is the
single-run one of :class:`experiments.train.Trainer` under ``jax.vmap`` over a leading *run*
axis:

* params, optimiser state and EWC state carry the run axis; each run's parameters are
  initialised from its seed's key, exactly as :func:`experiments.train.run_method` does;
* each run splits its own PRNG key for the epoch shuffling and the sampled Fisher;
* the strength is a traced ``[R]`` array passed to :func:`ewc_jax.penalty`, so one compiled
  program serves every strength;
* the Fisher is ``jax.vmap`` over :func:`ewc_jax.fisher_diagonal` (its validation of concrete
  values is skipped for tracers), on each run's own examples, chosen by a NumPy generator seeded
  as in ``run_method``;
* the task data is shared (``in_axes=None``): every run sees the scenario built from the first
  seed (permutations, subsets), and the seed varies the initial parameters, the shuffling and
  the Fisher's examples.

Run ``r`` therefore equals ``run_method`` with the same seed and strength on that scenario, to
float rounding (``tests/test_sweep.py`` checks it). With ``data_parallel`` and several devices,
the run axis is split over the mesh (padded with copies of the last run up to a multiple of the
device count; the copies are dropped), while the data is replicated.

The workdir gets ``results.json`` (every run's accuracy matrix and metrics, and per method and
strength the mean and standard deviation over seeds), ``sweep_summary.csv``, ``sweep_runs.csv``
and ``strength_sensitivity.png``. Learning curves are not recorded in a sweep.

    python -m experiments.main --config experiments/configs/permuted_mnist.py:small \\
        --workdir runs/sweep --config.methods=finetune,ewc \\
        --config.sweep.seeds=5 --config.sweep.strengths=10,100,1000,10000
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import ewc_jax
from experiments import metrics, plots, scenarios, train

SWEEP_METRICS = ("average_accuracy", "backward_transfer", "average_forgetting")


def _strength_list(value: Any) -> list[float]:
    if isinstance(value, str):
        return scenarios.parse_list(value.strip("[]() "), float)
    return [float(v) for v in value]


def sweep_requested(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.sweep`` asks for a sweep (``seeds > 0`` or a non-empty ``strengths``)."""
    sweep = config.get("sweep")
    if sweep is None:
        return False
    return int(sweep.get("seeds", 0)) > 0 or bool(_strength_list(sweep.get("strengths", "")))


def validate_sweep(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`experiments.train.ConfigError` for a sweep that cannot run.

    Checked: ``sweep.seeds`` is an int >= 0; ``sweep.strengths`` are distinct finite numbers
    >= 0.
    """
    sweep = config.get("sweep")
    if sweep is None:
        return
    seeds = sweep.get("seeds", 0)
    if isinstance(seeds, bool) or not isinstance(seeds, int | np.integer) or seeds < 0:
        raise train.ConfigError(f"sweep.seeds must be an int >= 0, got {seeds!r}")
    try:
        strengths = _strength_list(sweep.get("strengths", ""))
    except (TypeError, ValueError):
        raise train.ConfigError(
            f"sweep.strengths must be comma-separated numbers, got {sweep.strengths!r}"
        ) from None
    for value in strengths:
        if not math.isfinite(value) or value < 0:
            raise train.ConfigError(f"sweep.strengths must be finite and >= 0, got {value!r}")
    if len(set(strengths)) != len(strengths):
        raise train.ConfigError(f"sweep.strengths listed twice: {strengths}")


def sweep_seeds(config: ml_collections.ConfigDict) -> list[int]:
    """The seeds of a sweep: ``s0 .. s0 + S - 1`` for ``sweep.seeds = S > 0``, else the config's.

    ``s0`` is the first config seed, which also seeds the scenario.

    Example:
        >>> from experiments.configs import default
        >>> config = default.get_config()
        >>> config.seeds, config.sweep.seeds = "3", 2
        >>> sweep_seeds(config)
        [3, 4]
    """
    seeds = train.parse_seeds(config)
    count = int(config.sweep.seeds)
    return list(range(seeds[0], seeds[0] + count)) if count else seeds


def sweep_strengths(config: ml_collections.ConfigDict, spec: train.MethodSpec) -> list[float]:
    """``sweep.strengths`` (or the method's own strength) for a regularised method, else [0]."""
    if not spec.regularized:
        return [0.0]
    return _strength_list(config.sweep.strengths) or [spec.strength]


class VmappedTrainer:
    """The functions of a :class:`experiments.train.Trainer` with a leading run axis.

    Args:
        trainer: a trainer without a mesh (the sweep splits runs, not examples).
        mesh: where the run axis is split; None: one device.
    """

    def __init__(self, trainer: train.Trainer, mesh: jax.sharding.Mesh | None = None):
        if trainer.mesh is not None:
            raise ValueError("a sweep splits runs over the mesh: build the trainer without one")
        self.trainer = trainer
        self.mesh = mesh
        self.init = jax.jit(jax.vmap(self._init, in_axes=(0, None)))
        self.reset_optimizer = jax.jit(jax.vmap(trainer.tx.init))
        self.split = jax.jit(jax.vmap(jax.random.split))
        self.train_epoch = jax.jit(self._train_epoch, static_argnames=("num_batches",))
        self.evaluate = jax.jit(jax.vmap(trainer._evaluate, in_axes=(0, None)))
        self.consolidate = jax.jit(self._consolidate, static_argnames=("spec",))

    def _init(self, key: jax.Array, example_images: jax.Array) -> tuple[Any, Any, Any]:
        params = self.trainer.init(key, example_images)
        return params, self.trainer.tx.init(params), ewc_jax.empty_state(params)

    def _train_epoch(
        self,
        params: Any,
        opt_state: Any,
        ewc_state: ewc_jax.EWCState,
        strengths: jax.Array,
        data: train.TaskData,
        num_steps: jax.Array,
        keys: jax.Array,
        *,
        num_batches: int,
    ) -> tuple[Any, Any, jax.Array]:
        epoch = lambda p, o, e, s, k: self.trainer._train_epoch(
            p, o, e, s, data, num_steps, k, num_batches=num_batches
        )
        return jax.vmap(epoch)(params, opt_state, ewc_state, strengths, keys)

    def _consolidate(
        self,
        params: Any,
        ewc_state: ewc_jax.EWCState,
        images: jax.Array | None,
        labels: jax.Array | None,
        heads: jax.Array | None,
        keys: jax.Array,
        *,
        spec: train.MethodSpec,
    ) -> ewc_jax.EWCState:
        mode = "online" if spec.name == "online_ewc" else "separate"

        def one(p, state, x, y, h, key):
            if spec.needs_fisher:
                fisher = self.trainer.fisher(p, x, y, h, spec, key)
            else:
                fisher = jax.tree.map(jnp.ones_like, p)
            return ewc_jax.consolidate(state, p, fisher, mode=mode, gamma=spec.gamma)

        axis = 0 if spec.needs_fisher else None
        return jax.vmap(one, in_axes=(0, 0, axis, axis, axis, 0))(
            params, ewc_state, images, labels, heads, keys
        )

    def place(self, tree: Any) -> Any:
        """Splits the run axis of every leaf over the mesh (no-op without one)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, train.data_sharding(self.mesh))


@dataclasses.dataclass
class SweepResult:
    """The runs of one method in a sweep.

    Attributes:
        method: the method's name.
        seeds: seed of each run.
        strengths: strength of each run.
        accuracy_matrices: ``[R, T, T]``, ``R[r, i, j]`` as in
            :attr:`experiments.train.RunRecord.accuracy_matrix`.
        diverged: per run, whether its training loss became non-finite.
        wall_time_s: seconds for all runs of the method together.
    """

    method: str
    seeds: list[int]
    strengths: list[float]
    accuracy_matrices: np.ndarray
    diverged: list[bool]
    wall_time_s: float


def run_sweep_method(
    vtrainer: VmappedTrainer,
    data: train.DeviceScenario,
    spec: train.MethodSpec,
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    strengths: Sequence[float],
) -> SweepResult:
    """Trains every (seed, strength) pair of one method side by side.

    Mirrors :func:`experiments.train.run_method` step by step, with a run axis (seed-major:
    run ``r`` is ``seeds[r // K]``, ``strengths[r % K]``).

    Args:
        vtrainer: the vmapped functions.
        data: the scenario on device.
        spec: the method (its ``strength`` is replaced by ``strengths``).
        config: needs ``epochs``, ``steps_per_task``, ``reset_optimizer``.
        seeds: the seeds.
        strengths: the strengths.

    Returns:
        The :class:`SweepResult`.
    """
    start = time.perf_counter()
    run_seeds = [s for s in seeds for _ in strengths]
    run_strengths = [float(v) for _ in seeds for v in strengths]
    num_runs = len(run_seeds)
    devices = 1 if vtrainer.mesh is None else vtrainer.mesh.devices.size
    padding = -num_runs % devices
    padded_seeds = run_seeds + run_seeds[-1:] * padding
    padded_strengths = run_strengths + run_strengths[-1:] * padding

    tasks = data.scenario.tasks
    num_tasks = len(tasks)
    keys = vtrainer.place(jax.vmap(jax.random.key)(jnp.asarray(padded_seeds, jnp.uint32)))
    init_keys, keys = _unstack(vtrainer.split(keys))
    params, opt_state, ewc_state = vtrainer.init(init_keys, data.test[0].images[:1])
    strength = vtrainer.place(jnp.asarray(padded_strengths, jnp.float32))
    fisher_rngs = {seed: np.random.default_rng(seed) for seed in seeds}
    train_sets = data.joint_train if spec.name == "joint" else data.train
    assert train_sets is not None, "put_scenario was not asked for this method's training data"

    matrices = np.zeros((num_runs, num_tasks, num_tasks))
    diverged = np.zeros(len(padded_seeds), bool)
    batch_size = vtrainer.trainer.batch_size
    for i, task in enumerate(tasks):
        if i > 0 and config.reset_optimizer:
            opt_state = vtrainer.reset_optimizer(params)
        train_data = train_sets[i]
        steps_per_epoch = -(-int(train_data.num_valid) // batch_size)
        capacity = train_data.labels.shape[0]
        num_batches = train.scan_length(steps_per_epoch, capacity, batch_size)
        total_steps = int(config.steps_per_task) or int(config.epochs) * steps_per_epoch
        done = 0
        while done < total_steps:
            steps = min(steps_per_epoch, total_steps - done)
            keys, epoch_keys = _unstack(vtrainer.split(keys))
            params, opt_state, loss = vtrainer.train_epoch(
                params,
                opt_state,
                ewc_state,
                strength,
                train_data,
                jnp.int32(steps),
                epoch_keys,
                num_batches=num_batches,
            )
            diverged |= ~np.isfinite(np.asarray(loss))
            done += steps
        accuracy = [np.asarray(vtrainer.evaluate(params, data.test[j])) for j in range(num_tasks)]
        matrices[:, i] = np.stack(accuracy, axis=1)[:num_runs]

        if spec.regularized:
            keys, fisher_keys = _unstack(vtrainer.split(keys))
            images = labels = heads = None
            if spec.needs_fisher:
                own = data.train[i]
                n = int(own.num_valid)
                chosen_by_seed = {
                    seed: np.sort(rng.choice(n, min(n, spec.fisher_samples), replace=False))
                    for seed, rng in fisher_rngs.items()
                }
                chosen = vtrainer.place(jnp.asarray([chosen_by_seed[s] for s in padded_seeds]))
                images, labels, heads = own.images[chosen], own.labels[chosen], own.heads[chosen]
            ewc_state = vtrainer.consolidate(
                params, ewc_state, images, labels, heads, fisher_keys, spec=spec
            )
        print(
            f"[sweep {spec.name}] task {i + 1}/{num_tasks} {task.name}: mean accuracy "
            f"{' '.join(f'{a:.3f}' for a in matrices[:, i, : i + 1].mean(axis=0))} over "
            f"{num_runs} runs ({done} steps each, {time.perf_counter() - start:.1f} s so far)",
            flush=True,
        )
    return SweepResult(
        method=spec.name,
        seeds=run_seeds,
        strengths=run_strengths,
        accuracy_matrices=matrices,
        diverged=diverged[:num_runs].tolist(),
        wall_time_s=time.perf_counter() - start,
    )


def _unstack(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    return pairs[:, 0], pairs[:, 1]


def summarize_sweep(results: Sequence[SweepResult]) -> dict[str, list[dict[str, Any]]]:
    """Per method and strength, mean and standard deviation (ddof=1; 0 for one seed) over seeds.

    Returns:
        ``{method: [{"strength", "num_seeds", "diverged", <metric>: {"mean", "std", "values"},
        "final_accuracy": {"mean", "std"}, "accuracy_matrix_mean"}, ...]}``, strengths in
        ascending order.
    """

    def stats(values: np.ndarray) -> dict[str, Any]:
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(values.mean()), "std": std, "values": values.tolist()}

    summary: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        strengths = np.asarray(result.strengths)
        rows = []
        for value in sorted(set(result.strengths)):
            chosen = np.flatnonzero(strengths == value)
            matrices = result.accuracy_matrices[chosen]
            per_run = [metrics.summarize(m) for m in matrices]
            entry: dict[str, Any] = {
                "strength": value,
                "num_seeds": len(chosen),
                "diverged": int(sum(result.diverged[r] for r in chosen)),
            }
            for name in SWEEP_METRICS:
                entry[name] = stats(np.asarray([m[name] for m in per_run]))
            final = matrices[:, -1]
            final_std = final.std(axis=0, ddof=1) if len(chosen) > 1 else np.zeros(final.shape[1])
            entry["final_accuracy"] = {
                "mean": final.mean(axis=0).tolist(),
                "std": final_std.tolist(),
            }
            entry["accuracy_matrix_mean"] = matrices.mean(axis=0).tolist()
            rows.append(entry)
        summary[result.method] = rows
    return summary


def format_sweep_summary(summary: dict[str, list[dict[str, Any]]]) -> str:
    """The end-of-sweep table: one row per method and strength, mean ± std over seeds."""
    header = ["method", "strength", "seeds", "avg acc", "BWT", "forgetting", "diverged"]
    rows = []
    for method, entries in summary.items():
        for entry in entries:
            rows.append(
                [
                    method,
                    f"{entry['strength']:g}",
                    str(entry["num_seeds"]),
                    *(f"{entry[m]['mean']:.3f} ± {entry[m]['std']:.3f}" for m in SWEEP_METRICS),
                    str(entry["diverged"]),
                ]
            )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _summary_csv(summary: dict[str, list[dict[str, Any]]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stat_columns = [f"{m}_{s}" for m in SWEEP_METRICS for s in ("mean", "std")]
    writer.writerow(["method", "strength", "num_seeds", *stat_columns, "diverged"])
    for method, entries in summary.items():
        for entry in entries:
            values = [entry[m][s] for m in SWEEP_METRICS for s in ("mean", "std")]
            writer.writerow(
                [
                    method,
                    f"{entry['strength']:g}",
                    entry["num_seeds"],
                    *(f"{v:.6f}" for v in values),
                    entry["diverged"],
                ]
            )
    return buffer.getvalue()


def _runs_csv(runs: list[dict[str, Any]], task_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    finals = [f"final_acc_{n}" for n in task_names]
    writer.writerow(["method", "seed", "strength", *SWEEP_METRICS, *finals, "diverged"])
    for run in runs:
        writer.writerow(
            [
                run["method"],
                run["seed"],
                f"{run['strength']:g}",
                *(f"{run['metrics'][m]:.6f}" for m in SWEEP_METRICS),
                *(f"{a:.6f}" for a in run["accuracy_matrix"][-1]),
                run["diverged"],
            ]
        )
    return buffer.getvalue()


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    overwrite: bool = False,
    load_dataset: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Runs the sweep of ``config`` and writes its results to ``workdir``.

    Workdir handling is that of :func:`experiments.train.train_and_evaluate`: ``results.json``
    is written last and atomically, and an existing one is replaced only with ``overwrite``.

    Args:
        config: an experiment config with ``sweep.seeds`` and/or ``sweep.strengths`` set.
        workdir: output directory; created if missing.
        overwrite: replace finished results already in ``workdir``.
        load_dataset: as in :func:`experiments.train.train_and_evaluate`.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: the config cannot run.
        WorkdirExistsError: ``workdir`` holds finished results and ``overwrite`` is False.
    """
    specs = train.method_specs(config)
    seeds = sweep_seeds(config)
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.exists() and not overwrite:
        raise train.WorkdirExistsError(
            f"{results_path} already holds finished results; pass --overwrite to replace them "
            "or choose another --workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    results_path.unlink(missing_ok=True)
    train._write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

    started = time.perf_counter()
    datasets = train._load_datasets(config, load_dataset)
    scenario = scenarios.build_scenario(config, datasets, seeds[0])
    mesh = train.data_mesh(config)
    vtrainer = VmappedTrainer(train.build_trainer(config, scenario), mesh)
    data = train.put_scenario(
        scenario,
        need_train=any(s.name != "joint" for s in specs),
        need_joint=any(s.name == "joint" for s in specs),
        mesh=mesh,
    )
    results = [
        run_sweep_method(vtrainer, data, spec, config, seeds, sweep_strengths(config, spec))
        for spec in specs
    ]
    summary = summarize_sweep(results)
    runs = [
        {
            "method": result.method,
            "seed": seed,
            "strength": strength,
            "accuracy_matrix": matrix.tolist(),
            "metrics": metrics.summarize(matrix),
            "diverged": diverged,
        }
        for result in results
        for seed, strength, matrix, diverged in zip(
            result.seeds, result.strengths, result.accuracy_matrices, result.diverged, strict=True
        )
    ]
    figure = plots.plot_strength_sensitivity(summary, workdir / "strength_sensitivity.png")
    train._write_atomic(workdir / "sweep_summary.csv", _summary_csv(summary))
    train._write_atomic(workdir / "sweep_runs.csv", _runs_csv(runs, scenario.task_names))
    output = {
        "schema_version": train.RESULTS_SCHEMA_VERSION,
        "finished": True,
        "sweep": True,
        "config": config.to_dict(),
        "scenario": scenario.name,
        "scenario_seed": seeds[0],
        "task_names": scenario.task_names,
        "methods": [s.name for s in specs],
        "seeds": seeds,
        "strengths": {r.method: sorted(set(r.strengths)) for r in results},
        "runs": runs,
        "summary": summary,
        "method_wall_time_s": {r.method: r.wall_time_s for r in results},
        "figures": [figure.name],
        "environment": train.environment(),
        "wall_time_s": time.perf_counter() - started,
    }
    train._write_atomic(results_path, json.dumps(output, indent=2) + "\n")
    print(format_sweep_summary(summary))
    if any(any(r.diverged) for r in results):
        print("warning: some runs diverged (non-finite loss); see the 'diverged' column")
    print(f"tasks: {', '.join(scenario.task_names)}")
    print(f"figure: {workdir / figure.name}")
    print(f"results: {results_path}")
    return output
