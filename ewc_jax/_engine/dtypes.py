"""The one dtype policy: sums, precisions and penalties run in float32 at least.

bfloat16/float16 squares under- and overflow, so every accumulation (Fisher sums, Kronecker
factors, consolidated precisions, the penalty) is widened to float32; wider inputs keep their own
dtype.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def accumulate_dtype(dtype: Any) -> np.dtype:
    """Sums run in float32 at least (bfloat16/float16 squares would lose most digits)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def result_dtype(leaf: Any, dtype: Any) -> np.dtype:
    if dtype is None:
        return accumulate_dtype(jnp.result_type(leaf))
    dtype = np.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
    return dtype


def widest(*arrays: Any) -> np.dtype:
    """The widest dtype of the arrays, float32 at least: precisions and penalty sums of
    bfloat16/float16 parameters are kept in float32 (their squares under- and overflow)."""
    return accumulate_dtype(
        max((np.dtype(jnp.result_type(a)) for a in arrays), key=lambda d: d.itemsize)
    )
