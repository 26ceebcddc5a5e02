"""What EWC adds per device for a sharded model, and what its Fisher costs per token.

Run::

    python -m benchmarks.sizing --seq-len 2048 --vocab 32000

Memory: EWC keeps one anchor and one precision per parameter (``ewc_jax.EWCState``). Sharded
like the params (FSDP over D devices, or any sharding that splits every leaf D ways), each
device holds ``N / D`` of each: ``N (b_anchor + b_precision) / D`` bytes, with ``b`` the storage
bytes per element (4 for float32, 2 for bfloat16). While ``fisher_diagonal`` runs, it also
holds a float32 running sum and its Kahan compensation, sharded the same way (``8 N / D``
bytes), freed when it returns. Measured in ``tests/test_subsets.py`` (``nbytes`` of bfloat16
vs float32 state) and ``tests/test_sharding.py`` (states keep the params' shardings).

Compute, in units of one forward pass (F) and one backward pass (B) over the same tokens, i.e.
of a training step's F + B, for a causal LM with sequence length T and vocabulary V (a sequence
is one example; ``fisher_diagonal``'s docstring derives the estimators):

* ``exact``: one backward pass per (token, class) pair of every sequence: F + T·V·B. Shown to
  say why it is not offered for language models.
* ``sampled`` / ``empirical`` / ``argmax``: one label per token, one backward pass per
  sequence, plus the squares of per-sequence gradients. One-pass path: each Dense layer's
  per-sequence weight gradient is one more contraction of the layer's size (≈ the weight half
  of B again): about F + 1.5 B. General path (``vmap(grad)``): F + (F + B) = 2F + B.
* ``batched``: the mean gradient of a mini-batch, squared: F + B, a training step.
"""

from __future__ import annotations

import argparse

MODELS = {"125M": 125e6, "1B": 1e9, "7B": 7e9}
DEVICES = (8, 64, 256)
STORAGE = {
    "float32 anchor + float32 precision": 8,
    "bfloat16 anchor + float32 precision": 6,
    "bfloat16 anchor + bfloat16 precision": 4,
}


def bytes_per_device(num_params: float, bytes_per_param: int, devices: int) -> float:
    """Anchor + precision bytes on each device when every leaf is split ``devices`` ways."""
    return num_params * bytes_per_param / devices


def fisher_passes(seq_len: int, vocab: int) -> dict[str, tuple[str, float, float]]:
    """``{estimator: (path, forward passes, backward passes)}`` per token, as above."""
    return {
        "exact": ("either", 1.0, float(seq_len * vocab)),
        "sampled / empirical / argmax": ("one_pass", 1.0, 1.5),
        "sampled / empirical / argmax ": ("general", 2.0, 1.0),
        "batched": ("either", 1.0, 1.0),
    }


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def table(seq_len: int, vocab: int) -> str:
    lines = [
        "| model | storage | " + " | ".join(f"FSDP over {d}" for d in DEVICES) + " |",
        "|---|---|" + "---:|" * len(DEVICES),
    ]
    for name, n in MODELS.items():
        for storage, b in STORAGE.items():
            cells = " | ".join(_size(bytes_per_device(n, b, d)) for d in DEVICES)
            lines.append(f"| {name} | {storage} | {cells} |")
        cells = " | ".join(_size(bytes_per_device(n, 8, d)) for d in DEVICES)
        lines.append(
            f"| {name} | while computing the Fisher: + float32 sum and compensation | {cells} |"
        )
    lines += [
        "",
        f"Fisher cost per token (T = {seq_len}, V = {vocab}; a training step is 1 F + 1 B):",
        "",
        "| estimator | path | forward passes | backward passes |",
        "|---|---|---:|---:|",
    ]
    for estimator, (path, f, b) in fisher_passes(seq_len, vocab).items():
        lines.append(f"| {estimator.strip()} | {path} | {f:g} | {b:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    print(table(args.seq_len, args.vocab))


if __name__ == "__main__":
    main()
