"""XLA flags of the test run: the CPU backend compiles at LLVM's ``-O0``.

The suite's programs are small, so compiling them, not running them, takes most of its time,
and most of a compile is LLVM's optimisation of the generated CPU code. At
``--xla_backend_optimization_level=0`` the same HLO passes run (SPMD partitioning, fusion, the
collectives the sharding tests inspect) and only the machine code is less optimised: on this
project's 2-core CI machine a vmapped sweep test took half the time. Numerics stay within every
tolerance the tests state, and runs compared bit for bit (a resumed run against an
uninterrupted one) are compiled with the same flags. ``EWC_JAX_TEST_XLA_OPTIMIZE=1`` runs the
suite with XLA's default optimisation instead; an ``XLA_FLAGS`` that sets the level itself is
left as it is.
"""

from __future__ import annotations

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def run_flags() -> str:
    """The ``XLA_FLAGS`` of the test run: the environment's, plus :data:`FAST_COMPILE`."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("EWC_JAX_TEST_XLA_OPTIMIZE") == "1" or "optimization_level" in flags:
        return flags
    return f"{flags} {FAST_COMPILE}".strip()


def xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a subprocess of a test: the run's flags followed by ``extra``."""
    return " ".join([run_flags(), *extra]).strip()
