"""K-FAC's cost: the factors against one forward+backward, the penalty step against a plain one.

Run::

    python -m benchmarks.kfac --out KFAC.json
    python -m benchmarks.kfac --quick            # tiny sizes, seconds: the smoke test

Two models, at the sizes of their experiment configs, on random inputs (timing does not depend
on the data):

* ``lm``: the language model of ``experiments/configs/fortunes_lm.py``
  (:class:`experiments.models.language.CausalTransformer`, 2 layers, width 64, 4 heads, 64-byte
  context, 256-byte vocabulary), ``--lm-sequences`` random byte sequences (N x 64 tokens);
* ``mlp``: the demo's MLP (``experiments/configs/demo.py``, 784-100-100-10),
  ``--mlp-examples`` random inputs.

For each model it prints:

* the time of :func:`ewc_jax.kfac.kfac_fisher` over the N examples, per estimator (sampled,
  empirical, and exact where the classes are few: the MLP), divided by the time of one jitted
  forward+backward (``jax.value_and_grad`` of the mean cross-entropy, the training loss) over the
  same examples in one batch. The target for the sampled estimator is at most 1.5.
  ``kfac_fisher`` is called eagerly, as a user calls it, and compiles on its first call: the
  first call is reported apart (``first call``) and the median is over the later calls. As
  called, ``kfac_fisher`` also computes, in the factors' own pass, the diagonal Fisher (as
  ``fisher_diagonal`` would, same estimator and labels) of the parameters without a Kronecker
  block, and of those only: the transformer's token and position embeddings and its
  LayerNorms (attention's q/k/v/output projections are factored); none for the MLP. Its time
  is included, as it is for a user; ``fisher_diagonal`` alone over all parameters is timed
  beside it for reference.
  Beside each time ratio, the ratio of the FLOPs XLA counts in the same jitted computations
  (``GFLOP`` and ``FLOPs /``): what the time ratio would be if both ran at the same FLOP rate.
  The factors add ``ā āᵀ`` and ``δ δᵀ`` of every layer (``in²`` and ``out²`` per token, against
  the layer's ``in · out`` per token in each of the forward's and the backward's products): on
  the MLP's 784-wide first layer that alone is several forward+backward passes;
* the penalty step's overhead: a jitted Adam train step (``--steps`` steps per timed call in one
  ``lax.scan``, batches of ``--batch-size``) with ``optax.chain(ewc_jax.add_ewc_penalty(λ),
  optax.adam(lr))`` holding a K-FAC state (``ewc_jax.consolidate(None, params, kfac_fisher,
  mode="online")``, sampled estimator), over the plain ``optax.adam`` step; and the same for the
  diagonal EWC state (``fisher_diagonal``, sampled);
* kfac-jax's curvature estimator (``kfac_jax.BlockDiagonalCurvature`` with its automatic layer
  tagging and ``kfac_jax.register_softmax_cross_entropy_loss``): one jitted
  ``update_curvature_matrix_estimate`` over the same N examples (``fisher_gradients``: one
  sampled label per case, as our sampled estimator; ``fisher_empirical``; ``fisher_exact``
  for the MLP), beside ours. kfac-jax is optional (``pip install kfac-jax``): where it is not
  installed, or fails, its rows are skipped with the reason. kfac-jax 0.0.8 (the newest on PyPI
  when this was written) imports under jax 0.10.2 but fails when it traces a model
  (``ValueError: too many values to unpack`` in ``kfac_jax/_src/tag_graph_matcher.py``
  ``eval_jaxpr_eqn``: it expects ``Primitive.get_bind_params`` to return ``(subfuns, params)``,
  which newer jax returns as one dict), so it is not in the ``bench`` extra: it needs an older
  jax than the one this project is tested with. Under jax 0.6.2 (flax 0.10.7, optax 0.2.5) it
  runs on the MLP, but ewc_jax does not (``jax.extend.core.DropVar`` is newer): there,
  ``--only-kfac-jax`` times the forward+backward and kfac-jax's rows alone, for the ratio.

Each workload's entries are timed round-robin (one call of each per round, as
:func:`benchmarks.harness.time_round_robin` does) so that load from other processes falls on all
alike; every call ends in ``jax.block_until_ready``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from benchmarks import harness, roofline
from experiments.configs import demo, fortunes_lm
from experiments.models.images import MLP
from experiments.models.language import CausalTransformer

SCHEMA_VERSION = 1
SAMPLED_TARGET = 1.5
"""The sampled estimator's factors over N tokens may take at most this many forward+backward
passes over the same tokens (issue 19, item 4)."""

KFAC_JAX_MODES = {
    "sampled": "fisher_gradients",
    "empirical": "fisher_empirical",
    "exact": "fisher_exact",
}
"""Our estimator -> the kfac-jax estimation mode that computes the same expectation."""

QUICK_OVERRIDES: dict[str, Any] = {
    "lm_sequences": 4,
    "lm_layers": 1,
    "lm_width": 8,
    "lm_heads": 2,
    "lm_context": 4,
    "lm_vocab": 8,
    "mlp_examples": 8,
    "mlp_hidden": (8,),
    "mlp_inputs": 16,
    "batch_size": 4,
    "steps": 2,
    "repeats": 2,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings; the model sizes default to the experiment configs' (see module doc)."""

    lm_sequences: int = 256
    lm_layers: int = fortunes_lm.get_config().transformer.num_layers
    lm_width: int = fortunes_lm.get_config().transformer.width
    lm_heads: int = fortunes_lm.get_config().transformer.num_heads
    lm_context: int = 64  # the fortunes windows' length (experiments/data/text.py)
    lm_vocab: int = 256  # bytes
    mlp_examples: int = demo.get_config().fisher_samples
    mlp_hidden: tuple[int, ...] = tuple(demo.get_config().hidden_sizes)
    mlp_inputs: int = 784
    batch_size: int = 32  # both configs' batch size
    steps: int = 20
    repeats: int = 5
    strength: float = 1.0
    learning_rate: float = 1e-3
    seed: int = 0
    models: tuple[str, ...] = ("lm", "mlp")
    estimators: tuple[str, ...] = ("sampled", "empirical", "exact")
    kfac_jax: bool = True
    only_kfac_jax: bool = False
    quick: bool = False
    out: str | None = None


@dataclasses.dataclass
class Workload:
    """One model and its N examples: ``apply_fn(params, inputs) -> logits``."""

    name: str
    apply_fn: Callable[[Any, jax.Array], jax.Array]
    params: Any
    inputs: jax.Array
    labels: jax.Array
    estimators: tuple[str, ...]

    @property
    def n(self) -> int:
        return self.inputs.shape[0]

    @property
    def tokens(self) -> int:
        return self.labels.size


def _language_model(config: Config, rng: np.random.Generator, key: jax.Array) -> Workload:
    model = CausalTransformer(
        num_layers=config.lm_layers,
        width=config.lm_width,
        num_heads=config.lm_heads,
        vocab_size=config.lm_vocab,
    )
    shape = (config.lm_sequences, config.lm_context)
    tokens = jnp.asarray(rng.integers(0, config.lm_vocab, shape), jnp.int32)
    targets = jnp.asarray(rng.integers(0, config.lm_vocab, shape), jnp.int32)
    return Workload(
        "lm",
        lambda p, t: model.apply({"params": p}, t),
        jax.jit(model.init)(key, tokens[:1])["params"],  # one compile, not one per op
        tokens,
        targets,
        ("sampled", "empirical"),  # exact: 64 x 256 backward passes per sequence
    )


def _mlp(config: Config, rng: np.random.Generator, key: jax.Array) -> Workload:
    model = MLP(hidden_sizes=config.mlp_hidden, num_outputs=10)
    x = jnp.asarray(rng.standard_normal((config.mlp_examples, config.mlp_inputs)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, config.mlp_examples), jnp.int32)
    return Workload(
        "mlp",
        lambda p, v: model.apply({"params": p}, v),
        jax.jit(model.init)(key, x[:1])["params"],
        x,
        y,
        ("sampled", "empirical", "exact"),
    )


MODELS = {"lm": _language_model, "mlp": _mlp}


def workloads(config: Config) -> list[Workload]:
    """The models ``config.models`` names, with random inputs and labels (see the module doc)."""
    chosen = []
    for name in config.models:
        workload = MODELS[name](config, np.random.default_rng(config.seed), jax.random.key(0))
        workload.estimators = tuple(e for e in workload.estimators if e in config.estimators)
        chosen.append(workload)
    return chosen


def _mean_cross_entropy(apply_fn, params, inputs, labels) -> jax.Array:
    logits = apply_fn(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _row(workload: Workload, name: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": workload.name,
        "name": name,
        "n": workload.n,
        "tokens": workload.tokens,
        "status": "ok",
        "reason": None,
        "first_call_s": None,
        "median_s": None,
        "samples_s": [],
        **fields,
    }


def _time_round_robin(runners: Sequence[tuple[dict[str, Any], Callable[[], Any]]], repeats: int):
    """First call of each (compilation: ``first_call_s``), then ``repeats`` rounds; medians."""
    for row, call in runners:
        if row["first_call_s"] is None:
            row["first_call_s"] = harness.timed(call)[0]
    print(f"  timing {', '.join(r['name'] for r, _ in runners)} round-robin ...", flush=True)
    for _ in range(repeats):
        for row, call in runners:
            row["samples_s"].append(harness.timed(call)[0])
    for row, _ in runners:
        row["median_s"] = statistics.median(row["samples_s"])


def _fisher_runners(workload: Workload, key: jax.Array) -> list[tuple[dict[str, Any], Callable]]:
    """One forward+backward, ``kfac_fisher`` per estimator, and ``fisher_diagonal`` (sampled)."""
    apply_fn, params, x, y = workload.apply_fn, workload.params, workload.inputs, workload.labels
    grad_fn = jax.jit(jax.value_and_grad(_mean_cross_entropy, argnums=1), static_argnums=0)
    row = _row(
        workload, "forward+backward", gflop=_gflop(lambda p: grad_fn(apply_fn, p, x, y), params)
    )
    runners = [(row, lambda: jax.block_until_ready(grad_fn(apply_fn, params, x, y)))]
    for estimator in workload.estimators:
        labels = y if estimator == "empirical" else None

        def fisher(p, e=estimator, labels=labels):
            return ewc_jax.kfac.kfac_fisher(apply_fn, p, x, labels, estimator=e, key=key)

        row = _row(workload, f"kfac_fisher {estimator}", estimator=estimator)
        row["gflop"] = _gflop(fisher, params)
        runners.append((row, lambda f=fisher: jax.block_until_ready(f(params))))

    def diagonal(p):
        return ewc_jax.fisher_diagonal(apply_fn, p, x, estimator="sampled", key=key)

    row = _row(workload, "fisher_diagonal sampled", estimator="sampled")
    row["gflop"] = _gflop(diagonal, params)
    runners.append((row, lambda: jax.block_until_ready(diagonal(params))))
    return runners


def _gflop(fn: Callable[[Any], Any], params: Any) -> float | None:
    """The GFLOPs XLA's cost analysis counts in ``jax.jit(fn)(params)`` (a chunk loop by its
    trip count: :func:`benchmarks.roofline.program_flops`), what the timed call computes."""
    return roofline.program_flops(fn, params)["flops"] / 1e9


def _kfac_jax_runners(workload: Workload, key: jax.Array, rows: list[dict[str, Any]]):
    """kfac-jax's factor update per estimator; appends a skipped row per estimator on failure."""
    names = [f"kfac-jax {KFAC_JAX_MODES[e]}" for e in workload.estimators]
    if not harness.installed("kfac_jax"):
        reason = "kfac_jax not installed (pip install kfac-jax)"
        rows += [_row(workload, name, status="skipped", reason=reason) for name in names]
        return []
    import kfac_jax

    apply_fn, params, x, y = workload.apply_fn, workload.params, workload.inputs, workload.labels

    def loss_fn(p, batch):
        inputs, labels = batch
        logits = apply_fn(p, inputs)
        flat = logits.reshape(-1, logits.shape[-1])
        kfac_jax.register_softmax_cross_entropy_loss(flat, labels.reshape(-1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    runners = []
    for estimator, name in zip(workload.estimators, names, strict=True):
        row = _row(workload, name, estimator=estimator)
        try:
            curvature = kfac_jax.BlockDiagonalCurvature(loss_fn)
            state = curvature.init(key, (params, (x, y)), None, None)
            update = jax.jit(
                lambda s, p, b, k, c=curvature, m=KFAC_JAX_MODES[estimator]: (
                    c.update_curvature_matrix_estimate(s, 0.0, 1.0, 0.0, x.shape[0], k, (p, b), m)
                )
            )
            call = lambda u=update, s=state: jax.block_until_ready(u(s, params, (x, y), key))
            # The first call fails here, if at all (tracing), before it joins the round.
            row["first_call_s"] = harness.timed(call)[0]
        except Exception as error:  # an optional third-party tool: report, do not stop
            rows.append(dict(row, status="skipped", reason=f"{type(error).__name__}: {error}"))
            continue
        runners.append((row, call))
    return runners


def _train_steps(apply_fn, tx, params, opt_state, inputs, labels):
    """``len(inputs)`` Adam steps, one per batch, in one scan; returns the final params."""

    def step(carry, batch):
        p, s = carry
        grads = jax.grad(_mean_cross_entropy, argnums=1)(apply_fn, p, *batch)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), (inputs, labels))
    return params


def _step_runners(workload: Workload, config: Config, key: jax.Array):
    """The plain Adam step, with the diagonal EWC penalty, and with the K-FAC penalty."""
    apply_fn, params, x, y = workload.apply_fn, workload.params, workload.inputs, workload.labels
    diagonal = ewc_jax.fisher_diagonal(apply_fn, params, x, estimator="sampled", key=key)
    kfac = ewc_jax.kfac.kfac_fisher(apply_fn, params, x, estimator="sampled", key=key)
    # Jitted: one compile each instead of one per eager operation on every leaf.
    consolidate = jax.jit(lambda p, f: ewc_jax.consolidate(None, p, f, mode="online"))
    states = {"EWC (diagonal)": consolidate(params, diagonal), "K-FAC": consolidate(params, kfac)}
    steps, batch = config.steps, config.batch_size
    index = jax.random.randint(key, (steps, batch), 0, workload.n)
    inputs, labels = x[index], y[index]
    adam = optax.adam(config.learning_rate)
    variants = [("plain", adam, adam.init(params))]
    for name, state in states.items():
        tx = optax.chain(ewc_jax.add_ewc_penalty(config.strength), adam)
        variants.append((f"{name} penalty", tx, ewc_jax.set_ewc_state(tx.init(params), state)))
    runners = []
    for name, tx, opt_state in variants:
        run = jax.jit(lambda p, s, a, b, t=tx: _train_steps(apply_fn, t, p, s, a, b))
        call = lambda r=run, s=opt_state: jax.block_until_ready(r(params, s, inputs, labels))
        row = _row(workload, f"{name} step", steps=steps, batch_size=batch)
        row["n"], row["tokens"] = batch, labels[0].size
        runners.append((row, call))
    return runners


def _ratio(row: dict[str, Any], reference: dict[str, Any], target: float | None = None):
    value = flops = None
    if row["median_s"] and reference["median_s"]:
        value = row["median_s"] / reference["median_s"]
    if row.get("gflop") and reference.get("gflop"):
        flops = row["gflop"] / reference["gflop"]
    return {
        "model": row["model"],
        "name": f"{row['name']} / {reference['name']}",
        "value": value,
        "flop_value": flops,
        "target": target,
    }


def run(config: Config, command: str = "python -m benchmarks.kfac") -> dict[str, Any]:
    """Times every entry of ``config`` and returns the report (also written to ``config.out``).

    Returns:
      The JSON-serialisable report: ``schema_version``, ``command``, ``config``, ``machine``,
      ``versions``, ``fisher`` and ``steps`` (rows: model, name, N, tokens, status, reason,
      first call, samples, median) and ``ratios`` (model, name, value, target).
    """
    if config.quick:
        config = dataclasses.replace(config, **QUICK_OVERRIDES)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "config": dataclasses.asdict(config),
        "machine": _machine(),
        "versions": _versions(),
        "fisher": [],
        "steps": [],
        "ratios": [],
    }
    key = jax.random.key(config.seed + 1)
    for workload in workloads(config):
        print(f"{workload.name}: N = {workload.n} ({workload.tokens} tokens) ...", flush=True)
        rows: list[dict[str, Any]] = []
        runners = _fisher_runners(workload, key)
        if config.only_kfac_jax:
            runners = runners[:1]
        if config.kfac_jax:
            runners += _kfac_jax_runners(workload, key, rows)
        _time_round_robin(runners, config.repeats)
        rows = [r for r, _ in runners] + rows
        reference = rows[0]
        for row in rows[1:]:
            target = SAMPLED_TARGET if row["name"] == "kfac_fisher sampled" else None
            report["ratios"].append(_ratio(row, reference, target))
        report["fisher"] += rows
        if config.only_kfac_jax:
            continue
        steps = _step_runners(workload, config, key)
        _time_round_robin(steps, config.repeats)
        report["steps"] += [r for r, _ in steps]
        report["ratios"] += [_ratio(r, steps[0][0]) for r, _ in steps[1:]]
    return harness.finish_report(report, config.out)


def _machine() -> dict[str, Any]:
    """Device, CPU and load (no PyTorch import, unlike :func:`benchmarks.harness.machine_info`)."""
    flags = roofline.cpu_flags()
    return {
        "jax_devices": [str(d) for d in jax.devices()],
        "cpu_model": harness.cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_flags_summary": roofline.flags_summary(flags),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": harness.load_average(),
    }


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("ewc-jax", "jax", "jaxlib", "flax", "optax", "numpy", "kfac-jax"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: machine and load, the Fisher rows with their ratio to one
    forward+backward, then the train steps with their ratio to the plain step."""
    machine = report["machine"]
    load = lambda v: "-" if v is None else "/".join(f"{x:.1f}" for x in v)
    lines = [
        f"device: jax {machine['jax_devices']}, CPU {machine['cpu_model']}"
        f" ({machine['cpus_usable']} usable cores), flags {machine['cpu_flags_summary']},"
        f" load average {load(machine['loadavg_start'])} at start,"
        f" {load(machine.get('loadavg_end'))} at end",
        "",
        f"{'model':<5} {'entry':<30} {'N':>5} {'tokens':>7} {'median':>10} {'first call':>10}"
        f" {'reps':>4} {'/ fwd+bwd':>9} {'target':>7} {'GFLOP':>7} {'FLOPs /':>7}",
    ]
    ratios = {(r["model"], r["name"]): r for r in report["ratios"]}
    for section, reference in (("fisher", "forward+backward"), ("steps", "plain step")):
        if section == "steps" and report["steps"]:
            lines += [
                "",
                f"{'model':<5} {'train step (Adam, scanned)':<30} {'batch':>5} {'steps':>7}"
                f" {'median':>10} {'first call':>10} {'reps':>4} {'/ plain':>9}",
            ]
        for row in report[section]:
            size = (row["n"], row["tokens"]) if section == "fisher" else (row["n"], row["steps"])
            head = f"{row['model']:<5} {row['name']:<30} {size[0]:>5} {size[1]:>7}"
            if row["status"] != "ok":
                lines.append(f"{head} {'skipped':>10}  {_shorten(row['reason'])}")
                continue
            ratio = ratios.get((row["model"], f"{row['name']} / {reference}"))
            value = "-" if not ratio or ratio["value"] is None else f"{ratio['value']:.2f}x"
            target = f"<= {ratio['target']}" if ratio and ratio["target"] else ""
            flops = ratio.get("flop_value") if ratio else None
            work = "" if row.get("gflop") is None else f"{row['gflop']:7.2f}"
            work += "" if flops is None else f" {flops:6.2f}x"
            lines.append(
                f"{head} {_fmt_s(row['median_s']):>10} {_fmt_s(row['first_call_s']):>10}"
                f" {len(row['samples_s']):>4} {value:>9} {target:>7} {work}".rstrip()
            )
    lines += [
        "",
        "kfac_fisher includes the diagonal Fisher of the parameters without a Kronecker block "
        "(the LM's embeddings, positions, LayerNorms); first call: compilation included.",
        "GFLOP: XLA's count of the same jitted computation (chunk loops by their trip count);"
        " 'FLOPs /': its ratio to the forward+backward's (the time ratio at equal FLOP rates).",
    ]
    return "\n".join(lines)


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def _shorten(reason: str | None, limit: int = 110) -> str:
    reason = (reason or "").splitlines()[0] if reason else ""
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command-line options, one per :class:`Config` field."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kfac", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--lm-sequences", type=int, default=defaults.lm_sequences)
    parser.add_argument("--mlp-examples", type=int, default=defaults.mlp_examples)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="per timed call")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--strength", type=float, default=defaults.strength)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    names = lambda s: tuple(v for v in s.split(",") if v)
    parser.add_argument("--models", type=names, default=defaults.models, help="lm,mlp")
    parser.add_argument(
        "--estimators", type=names, default=defaults.estimators, help="sampled,empirical,exact"
    )
    parser.add_argument("--no-kfac-jax", dest="kfac_jax", action="store_false")
    parser.add_argument(
        "--only-kfac-jax",
        action="store_true",
        help="forward+backward and kfac-jax only (for a venv with the older jax kfac-jax needs)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    config = dataclasses.replace(defaults, **vars(parser.parse_args(argv)))
    if set(config.models) - set(MODELS) or not config.models:
        parser.error(f"--models: choose from lm,mlp, not {','.join(config.models)}")
    if "sampled" not in config.estimators or set(config.estimators) - set(KFAC_JAX_MODES):
        parser.error("--estimators: sampled (the penalty steps use it) and any of empirical,exact")
    return config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the benchmark, prints the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.kfac", *argv])
    start = time.perf_counter()
    report = run(parse_args(argv), command)
    print()
    print(format_table(report))
    print(f"({time.perf_counter() - start:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
