"""Reproduces a PyTorch run of the EWC tutorial with the experiments pipeline, from one state_dict.

    python -m benchmarks.reproduce_tutorial --workdir runs/reproduce_tutorial --seeds 0,1,2
    python -m benchmarks.reproduce_tutorial --workdir runs/reproduce_full --variant full

Both sides start from the same initial weights: the tutorial's PyTorch MLP (784-256-256-256-10,
ReLU after every Linear, the logits included) as ``torch.nn.Linear`` initialises it from
``--init-seed``, saved as ``<workdir>/init.npz`` in ``state_dict`` naming and layout. Then, for
every seed and for finetune and EWC:

* JAX: ``experiments/configs/tutorial.py[:small]`` with ``--config.init=<workdir>/init.npz``,
  run by :func:`experiments.runs.experiment.train_and_evaluate` (shuffling with ``jax.random``).
* PyTorch: the tutorial's algorithm (:mod:`benchmarks.torch_tutorial`): plain SGD on
  ``cross_entropy + importance · Σ F (θ − θ*)²`` with importance = strength / 2, batches of a
  ``torch.randperm`` per epoch as ``DataLoader(shuffle=True)`` draws them (last partial batch
  kept), the Fisher of :func:`benchmarks.torch_tutorial.tutorial_fisher` (one example at a time,
  argmax labels) on ``fisher_samples`` examples chosen by ``torch.randperm``; a
  ``torch.Generator`` seeded with the seed drives it all.

Both see the same task data: the scenario the config builds for that seed (the seed also picks
the ``train_limit`` subset, the same on both sides). What differs between the sides is only the
random stream (batch order, Fisher examples) and the framework. The script prints, per method
and task, the final accuracy's mean, standard deviation and range over the seeds on each side
and the difference of the means, and writes them to ``<workdir>/reproduction.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments import data, scenarios
from experiments.config import RunSpec, read_spec
from experiments.configs import tutorial
from experiments.runs import experiment as train


def tutorial_torch_mlp(seed: int) -> Any:
    """The tutorial's MLP with PyTorch's own initialisation from ``torch.manual_seed(seed)``."""
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in ((784, 256), (256, 256), (256, 256), (256, 10)):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def save_state_dict(model: Any, path: Path) -> None:
    """Saves ``model.state_dict()`` as an ``.npz`` (keys and layout unchanged, in order)."""
    np.savez(path, **{key: value.numpy() for key, value in model.state_dict().items()})


def load_torch_mlp(path: Path) -> Any:
    """The tutorial's MLP holding the weights of an ``.npz`` state_dict."""
    import torch

    model = tutorial_torch_mlp(0)
    with np.load(path) as archive:
        model.load_state_dict({key: torch.from_numpy(archive[key]) for key in archive.files})
    return model


def torch_accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the argmax of the (ReLU'd) logits; ties go to the first class, as in JAX."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(images.reshape(len(images), -1)))
    return float((logits.argmax(1).numpy() == labels).mean())


def dead_logits(model: Any, images: np.ndarray) -> int:
    """How many logit units are ReLU'd to 0 on every one of ``images`` (their class is never
    predicted, and no gradient reaches them through the cross-entropy)."""
    import torch

    with torch.no_grad():
        pre_relu = model[:-1](torch.from_numpy(images.reshape(len(images), -1)))
    return int((pre_relu <= 0).all(0).sum())


def torch_run(
    scenario: scenarios.Scenario, init: Path, seed: int, *, importance: float, spec: RunSpec
) -> tuple[list[list[float]], list[int]]:
    """One PyTorch run of the tutorial's algorithm.

    Returns:
        The accuracy matrix ``R[i][j]`` and, after each task, :func:`dead_logits` on all test
        images.
    """
    import torch

    from benchmarks import torch_tutorial

    generator = torch.Generator().manual_seed(seed)
    model = load_torch_mlp(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.optimizer.learning_rate)
    penalties: list[tuple[dict[str, Any], dict[str, Any]]] = []
    batch_size, matrix, dead = spec.schedule.batch_size, [], []
    steps_per_task = spec.schedule.steps_per_task
    every_test = np.concatenate([t.test_images for t in scenario.tasks])
    for task in scenario.tasks:
        inputs = torch.from_numpy(task.train_images.reshape(len(task.train_images), -1))
        labels = torch.from_numpy(task.train_labels.astype(np.int64))
        steps = 0
        model.train()
        while steps < steps_per_task:
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), batch_size):
                if steps == steps_per_task:
                    break
                batch = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
                for precision, means in penalties:
                    loss = loss + importance * torch_tutorial.tutorial_penalty(
                        model, precision, means
                    )
                loss.backward()
                optimizer.step()
                steps += 1
        matrix.append([torch_accuracy(model, t.test_images, t.test_labels) for t in scenario.tasks])
        dead.append(dead_logits(model, every_test))
        if importance > 0:
            chosen = torch.randperm(len(labels), generator=generator)[
                : spec.methods[0].fisher_samples
            ]
            precision = torch_tutorial.tutorial_fisher(model, inputs[chosen])
            means = {name: p.detach().clone() for name, p in model.named_parameters()}
            penalties.append((precision, means))
    return matrix, dead


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": std,
        "min": float(array.min()),
        "max": float(array.max()),
    }


def compare(jax_runs: dict[tuple[str, int], list[list[float]]], torch_runs: dict) -> list[dict]:
    """Per method and task: final accuracy statistics over seeds on each side, and the gap."""
    rows = []
    for method in dict.fromkeys(method for method, _ in jax_runs):
        seeds = [seed for m, seed in jax_runs if m == method]
        num_tasks = len(jax_runs[method, seeds[0]])
        for task in range(num_tasks):
            j = _stats([jax_runs[method, s][-1][task] for s in seeds])
            t = _stats([torch_runs[method, s][-1][task] for s in seeds])
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "jax": j,
                    "torch": t,
                    "difference": j["mean"] - t["mean"],
                    "per_seed": {
                        str(s): [jax_runs[method, s][-1][task], torch_runs[method, s][-1][task]]
                        for s in seeds
                    },
                }
            )
    return rows


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--variant", choices=("small", "full"), default="small")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated shuffling seeds")
    parser.add_argument("--init-seed", type=int, default=0, help="torch.manual_seed of the init")
    parser.add_argument("--steps", type=int, default=0, help="SGD steps per task (0: config's)")
    parser.add_argument("--train-limit", type=int, default=-1, help="(-1: the config's)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads (several threads spin and crawl on a busy machine)",
    )
    return parser.parse_args()


def _config(args: argparse.Namespace, init: Path) -> Any:
    """The tutorial config of ``args``, initialised from the PyTorch state_dict ``init``."""
    config = tutorial.get_config("small" if args.variant == "small" else "")
    config.init = str(init.resolve())
    config.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.steps:
        config.steps_per_task = args.steps
    if args.train_limit >= 0:
        config.train_limit = args.train_limit
    config.eval_every_steps = config.steps_per_task
    return config


def _torch_runs(spec: RunSpec, init: Path) -> tuple[dict, dict, int]:
    """Every method and seed of ``spec`` in PyTorch: matrices, dead logits, dead at init."""
    datasets = data.load_datasets(spec.data.datasets, data_dir=spec.data.data_dir)
    torch_runs, torch_dead = {}, {}
    first = scenarios.build_scenario(spec.data, datasets, spec.seeds[0])
    dead_at_init = dead_logits(
        load_torch_mlp(init), np.concatenate([t.test_images for t in first.tasks])
    )
    print(f"[torch] dead logit units at init: {dead_at_init} of 10", flush=True)
    for seed in spec.seeds:
        scenario = scenarios.build_scenario(spec.data, datasets, seed)
        for method in spec.methods:
            # The tutorial's importance is λ/2: its penalty has no 1/2.
            importance = method.strength / 2
            matrix, dead = torch_run(scenario, init, seed, importance=importance, spec=spec)
            torch_runs[method.name, seed], torch_dead[f"{method.name} {seed}"] = matrix, dead
            print(
                f"[torch {method.name} seed {seed}] final accuracy {matrix[-1]}, dead logit "
                f"units after each task {dead}",
                flush=True,
            )
    return torch_runs, torch_dead, dead_at_init


def _print_table(rows: list[dict], names: list[str]) -> None:
    print(f"{'method':9} {'task':14} {'JAX mean±std [min, max]':28} {'PyTorch':28} diff")
    for row in rows:
        cells = [
            f"{s['mean']:.3f}±{s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
            for s in (row["jax"], row["torch"])
        ]
        print(
            f"{row['method']:9} {names[row['task']]:14} {cells[0]:28} {cells[1]:28} "
            f"{row['difference']:+.3f}"
        )


def main() -> None:
    """Runs both pipelines and prints the comparison table."""
    args = _arguments()
    import torch

    torch.set_num_threads(args.torch_threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    init = args.workdir / "init.npz"
    save_state_dict(tutorial_torch_mlp(args.init_seed), init)
    config = _config(args, init)
    spec = read_spec(config)

    started = time.perf_counter()
    document = train.train_and_evaluate(config, args.workdir / "jax", overwrite=True)
    jax_s = time.perf_counter() - started
    jax_runs = {(r["method"], r["seed"]): r["accuracy_matrix"] for r in document["runs"]}

    started = time.perf_counter()
    torch_runs, torch_dead, dead_at_init = _torch_runs(spec, init)
    torch_s = time.perf_counter() - started

    rows = compare(jax_runs, torch_runs)
    names = document["task_names"]
    steps = spec.schedule.steps_per_task
    print(f"\n{args.variant}: {steps} steps/task, seeds {list(spec.seeds)}")
    _print_table(rows, names)
    print(f"wall time: JAX {jax_s:.0f} s, PyTorch {torch_s:.0f} s")
    summary = {
        "variant": args.variant,
        "steps_per_task": steps,
        "train_limit": spec.data.train_limit,
        "seeds": list(spec.seeds),
        "init_seed": args.init_seed,
        "task_names": names,
        "rows": rows,
        "torch_dead_logits_at_init": dead_at_init,
        "torch_dead_logits_after_each_task": torch_dead,
        "accuracy_matrices": {
            f"{method} {seed}": {"jax": jax_runs[method, seed], "torch": torch_runs[method, seed]}
            for method, seed in jax_runs
        },
        "wall_time_s": {"jax": jax_s, "torch": torch_s},
    }
    (args.workdir / "reproduction.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
