"""The jobs of an experiment: each is one call of the loop, on one scenario.

Single runs: one job per seed and method, seed-major; each seed builds its own scenario. A sweep:
one job per method, its seeds x strengths side by side (seed-major: run ``r`` is
``seeds[r // K]`` with ``strengths[r % K]``) on the scenario of the first seed.
"""

from __future__ import annotations

import dataclasses

from experiments.config import RunSpec
from experiments.training.methods import MethodSpec


@dataclasses.dataclass(frozen=True)
class Job:
    """One call of the loop: a method's run (or, in a sweep, its runs side by side).

    Attributes:
        method: the method.
        scenario_seed: the seed the scenario is built from.
        seeds: the seed of every run.
        strengths: the strength of every run.
        vmapped: whether the runs carry a leading run axis (a sweep).
        label: prefix of every printed line.
        checkpoint_name: the run's directory under ``<workdir>/checkpoints``.
    """

    method: MethodSpec
    scenario_seed: int
    seeds: tuple[int, ...]
    strengths: tuple[float, ...]
    vmapped: bool
    label: str
    checkpoint_name: str


def jobs(spec: RunSpec) -> list[Job]:
    """The jobs of ``spec``: seed-major single runs, or one vmapped job per method (a sweep)."""
    if not spec.sweep.requested:
        return [
            Job(
                m,
                seed,
                (seed,),
                (m.strength,),
                False,
                f"[{m.name} seed {seed}]",
                f"{m.name}-seed{seed}",
            )
            for seed in spec.seeds
            for m in spec.methods
        ]
    result = []
    for m in spec.methods:
        strengths = spec.sweep_strengths(m)
        seeds = tuple(s for s in spec.seeds for _ in strengths)
        values = tuple(float(v) for _ in spec.seeds for v in strengths)
        result.append(
            Job(m, spec.seeds[0], seeds, values, True, f"[sweep {m.name}]", f"sweep-{m.name}")
        )
    return result
