"""One EWC training epoch: PyTorch eager and ``torch.compile`` against JAX's step loop and scan.

``epoch_examples`` examples in batches of ``batch_size``, SGD, loss = cross-entropy + EWC penalty
with a non-trivial EWC state: the anchor is the shared weights, the Fisher is their argmax Fisher
on 512 examples (``ewc_jax.fisher_diagonal``), and training starts from the anchor plus
N(0, 0.01²) noise, so the penalty and its gradient are non-zero from the first step. Every timed
epoch starts from the same parameters.

* ``torch_eager``: the tutorial's ``ewc_train`` (``loss.item()`` every step);
* ``torch_compile``: the same step with the loss and the optimizer step under ``torch.compile``,
  the loss read back once per epoch;
* ``jax_jit_step_loop``: one jitted step (``jax.value_and_grad`` + ``optax.sgd``,
  ``ewc_jax.penalty`` with strength 2 × importance) called from a Python loop;
* ``jax_scan_epoch``: the same step inside one ``jax.lax.scan`` over all batches.

Checks before timing: the first batch's loss gradient in JAX equals PyTorch's; the compiled
PyTorch epoch changes the parameters as the eager one does, and the scanned JAX epoch as the step
loop does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ewc_jax
from benchmarks import harness, torch_tutorial, workload
from benchmarks.harness import Checks, Config, Entry, Runner
from benchmarks.torch_tutorial import LayerArrays

METHODS = ("jax_scan_epoch", "jax_jit_step_loop", "torch_compile", "torch_eager")
REFERENCE = "jax_scan_epoch"


def loss_fn(strength: float) -> Callable[..., jax.Array]:
    """``loss(params, ewc_state, x, y)``: mean cross-entropy plus ``ewc_jax.penalty``."""
    apply_fn = workload.apply_fn()

    def loss(params: Any, ewc_state: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply_fn(params, x)
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return cross_entropy + ewc_jax.penalty(params, ewc_state, strength)

    return loss


def jax_train_fns(
    learning_rate: float, strength: float
) -> tuple[optax.GradientTransformation, Callable[..., Any], Callable[..., Any]]:
    """The JAX side of the epoch: the optimizer, one SGD step, and a whole scanned epoch.

    Args:
      learning_rate: SGD learning rate.
      strength: ewc_jax's penalty strength (twice the tutorial's importance).

    Returns:
      ``(optimizer, train_step, scan_epoch)``. ``train_step(params, opt_state, ewc_state, xs, ys,
      step)`` takes batch ``step`` of ``xs[steps, B, ...]`` and returns ``(params, opt_state,
      loss)``; ``scan_epoch(params, opt_state, ewc_state, xs, ys)`` runs every batch in one
      ``jax.lax.scan`` and returns ``(params, opt_state, mean_loss)``. Neither is jitted here.
    """
    optimizer = optax.sgd(learning_rate)
    loss = loss_fn(strength)

    def update(carry: tuple[Any, Any], ewc_state: Any, x: jax.Array, y: jax.Array) -> Any:
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params, ewc_state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    def train_step(
        params: Any, opt_state: Any, ewc_state: Any, xs: jax.Array, ys: jax.Array, step: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        x = jax.lax.dynamic_index_in_dim(xs, step, keepdims=False)
        y = jax.lax.dynamic_index_in_dim(ys, step, keepdims=False)
        (params, opt_state), value = update((params, opt_state), ewc_state, x, y)
        return params, opt_state, value

    def scan_epoch(
        params: Any, opt_state: Any, ewc_state: Any, xs: jax.Array, ys: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        def body(carry: tuple[Any, Any], batch: tuple[jax.Array, jax.Array]) -> Any:
            return update(carry, ewc_state, *batch)

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys))
        return params, opt_state, losses.mean()

    return optimizer, train_step, scan_epoch


def torch_layout(arrays: Sequence[LayerArrays]) -> list[np.ndarray]:
    """``(kernel, bias)`` pairs flattened to PyTorch's parameter order: ``W = kernel.T``, ``b``."""
    return [np.array(a) for kernel, bias in arrays for a in (kernel.T, bias)]


def _change(after: Sequence[LayerArrays], before: Sequence[LayerArrays]) -> list[LayerArrays]:
    return [(ka - kb, ba - bb) for (ka, ba), (kb, bb) in zip(after, before, strict=True)]


def _torch_model(
    config: Config, start: list[LayerArrays], anchor: list[LayerArrays], fisher: list[LayerArrays]
) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    """A fresh tutorial MLP at ``start``: ``(model, initial_state, precision, means, sgd)``."""
    import torch

    device = torch_tutorial.default_device()
    model = torch_tutorial.build_mlp(start, device)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    precision, means = (
        {n: torch.from_numpy(a).to(device) for n, a in zip(names, torch_layout(t), strict=True)}
        for t in (fisher, anchor)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    return model, initial_state, precision, means, optimizer


def _torch_eager_epoch(
    config: Config, parts: tuple, x: Any, y: Any, checks: Checks, jax_grads: list[LayerArrays]
) -> tuple[Callable[[], float], float | None, str]:
    """The tutorial's eager epoch, after checking its first batch's gradient against JAX's."""
    model, _, precision, means, optimizer = parts
    model.zero_grad()
    b = config.batch_size
    torch_tutorial.tutorial_loss(
        model, x[:b], y[:b], precision, means, config.importance
    ).backward()
    torch_grads = {n: p.grad for n, p in model.named_parameters()}
    examples = (len(x) // b) * b
    checks(
        "epoch: jax vs torch loss gradient, first batch",
        examples,
        jax_grads,
        torch_tutorial.to_layer_arrays(torch_grads),
        config.rtol,
    )

    def epoch() -> float:
        return torch_tutorial.tutorial_train_epoch(
            model,
            optimizer,
            x,
            y,
            precision,
            means,
            importance=config.importance,
            batch_size=config.batch_size,
        )

    return epoch, None, "loss.item() every step (tutorial)"


def _torch_compiled_epoch(
    config: Config, parts: tuple, x: Any, y: Any
) -> tuple[Callable[[], float], float | None, str]:
    """The same step with the loss and the optimiser step under ``torch.compile``."""
    model, _, precision, means, optimizer = parts
    step = torch_tutorial.compiled_train_step(
        model, optimizer, precision, means, importance=config.importance
    )
    compile_s, _ = harness.timed(lambda: step(x[: config.batch_size], y[: config.batch_size]))

    def epoch() -> float:
        return torch_tutorial.train_epoch(step, x, y, config.batch_size)

    return epoch, compile_s, "torch.compile'd loss and optimizer step, loss read once"


def _torch_runners(
    config: Config,
    start: list[LayerArrays],
    anchor: list[LayerArrays],
    fisher: list[LayerArrays],
    inputs: np.ndarray,
    labels: np.ndarray,
    checks: Checks,
    jax_grads: list[LayerArrays],
) -> list[Runner]:
    """Checks, then warms up, the eager and the compiled PyTorch epoch."""
    import torch

    device = torch_tutorial.default_device()
    x = torch.from_numpy(inputs).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    examples = (len(inputs) // config.batch_size) * config.batch_size
    runners: list[Runner] = []
    changes: dict[str, list[LayerArrays]] = {}
    for name in ("torch_eager", "torch_compile"):
        parts = _torch_model(config, start, anchor, fisher)
        model, initial_state = parts[0], parts[1]
        if name == "torch_eager":
            epoch, compile_s, note = _torch_eager_epoch(config, parts, x, y, checks, jax_grads)
        else:
            epoch, compile_s, note = _torch_compiled_epoch(config, parts, x, y)

        def run(
            model: torch.nn.Module = model,
            initial_state: dict[str, Any] = initial_state,
            epoch: Callable[[], float] = epoch,
        ) -> float:
            model.load_state_dict(initial_state)
            loss = epoch()
            torch_tutorial.synchronize(device)
            return loss

        warmup_s, _ = harness.timed(run)
        params = {n: p for n, p in model.named_parameters()}
        changes[name] = _change(torch_tutorial.to_layer_arrays(params), start)
        entry = Entry(
            name, "epoch", "torch", examples, compile_s=compile_s, warmup_s=warmup_s, note=note
        )
        runners.append((entry, run))
    # Compared on the parameter change, which is ~1e-3 of the weights: float32 cancellation in
    # (θ_after − θ_before) alone reaches ~1e-4 relative over a short epoch, hence the 10x rtol.
    checks(
        "epoch: torch_compile vs torch_eager, parameter change",
        examples,
        changes["torch_compile"],
        changes["torch_eager"],
        10 * config.rtol,
    )
    return runners


class _Workload(NamedTuple):
    """The epoch's data and EWC state, shared by every variant."""

    steps: int
    examples: int
    strength: float
    start: list[LayerArrays]
    anchor: Any
    fisher: Any
    inputs: np.ndarray
    labels: np.ndarray
    xs: jax.Array
    ys: jax.Array
    params0: Any
    ewc_state: Any


def _workload(config: Config, weights: Sequence[LayerArrays]) -> _Workload:
    """Start = anchor + N(0, 0.01²); the Fisher: argmax on 512 examples; the epoch's batches."""
    steps = config.epoch_examples // config.batch_size
    examples = steps * config.batch_size
    rng = np.random.default_rng(config.seed + 2)
    start = [
        (
            k + rng.normal(0.0, 0.01, k.shape).astype(np.float32),
            b + rng.normal(0.0, 0.01, b.shape).astype(np.float32),
        )
        for k, b in weights
    ]
    fisher_inputs, _ = workload.make_data(512, weights, data=config.data, seed=config.seed + 3)
    anchor = workload.flax_params(weights)
    fisher = ewc_jax.fisher_diagonal(
        workload.apply_fn(), anchor, jax.device_put(fisher_inputs), estimator="argmax"
    )
    inputs, labels = workload.make_data(examples, start, data=config.data, seed=config.seed + 4)
    return _Workload(
        steps=steps,
        examples=examples,
        strength=2.0 * config.importance,
        start=start,
        anchor=anchor,
        fisher=fisher,
        inputs=inputs,
        labels=labels,
        xs=jax.device_put(inputs.reshape(steps, config.batch_size, -1)),
        ys=jax.device_put(labels.reshape(steps, config.batch_size)),
        params0=workload.flax_params(start),
        ewc_state=ewc_jax.consolidate(None, anchor, fisher),
    )


def _jax_runners(config: Config, w: _Workload, checks: Checks) -> list[Runner]:
    """The scanned epoch and the jitted step loop, compiled, warmed up and checked alike."""
    optimizer, train_step, scan_epoch = jax_train_fns(config.learning_rate, w.strength)
    opt_state0 = optimizer.init(w.params0)
    args = (w.params0, opt_state0, w.ewc_state, w.xs, w.ys)
    step_compile_s, step = harness.compile_ahead(train_step, *args, 0)
    scan_compile_s, epoch = harness.compile_ahead(scan_epoch, *args)

    def jax_loop() -> Any:
        params, opt_state, losses = w.params0, opt_state0, []
        for i in range(w.steps):
            params, opt_state, loss = step(params, opt_state, w.ewc_state, w.xs, w.ys, i)
            losses.append(loss)
        return jax.block_until_ready((params, jnp.mean(jnp.stack(losses))))

    def jax_scan() -> Any:
        params, _, loss = epoch(*args)
        return jax.block_until_ready((params, loss))

    scan_warmup_s, (scan_params, _) = harness.timed(jax_scan)
    loop_warmup_s, (loop_params, _) = harness.timed(jax_loop)
    checks(
        "epoch: jax_scan_epoch vs jax_jit_step_loop, parameter change",
        w.examples,
        _change(workload.layer_arrays(scan_params), w.start),
        _change(workload.layer_arrays(loop_params), w.start),
        10 * config.rtol,
    )
    scan_entry = Entry(
        "jax_scan_epoch",
        "epoch",
        "jax",
        w.examples,
        compile_s=scan_compile_s,
        warmup_s=scan_warmup_s,
        note="one jax.lax.scan over all batches",
    )
    loop_entry = Entry(
        "jax_jit_step_loop",
        "epoch",
        "jax",
        w.examples,
        compile_s=step_compile_s,
        warmup_s=loop_warmup_s,
        note="jitted step called from a Python loop",
    )
    return [(scan_entry, jax_scan), (loop_entry, jax_loop)]


def run_epoch(config: Config, weights: Sequence[LayerArrays], checks: Checks) -> list[Entry]:
    """Checks, then times, one EWC training epoch in PyTorch (eager, compiled) and JAX.

    Args:
      config: harness settings.
      weights: the anchor, as numpy arrays.
      checks: where the agreement checks are recorded.

    Returns:
      The entries, in :data:`METHODS` order.

    Raises:
      CheckFailed: the frameworks' loss gradients disagree, or a faster variant's epoch disagrees
        with its plain one (nothing has been timed).
    """
    w = _workload(config, weights)
    print(f"training epoch, {w.examples} examples", flush=True)
    runners = _jax_runners(config, w, checks)
    entries = [entry for entry, _ in runners]
    reason = None if config.use_torch else "disabled with --no-torch"
    if reason is None and not harness.installed("torch"):
        reason = "torch is not installed (pip install 'ewc-jax[bench]')"
    if reason is None:
        grad_fn = jax.jit(jax.grad(loss_fn(w.strength)))
        jax_grads = workload.layer_arrays(grad_fn(w.params0, w.ewc_state, w.xs[0], w.ys[0]))
        torch_runners = _torch_runners(
            config,
            w.start,
            workload.layer_arrays(w.anchor),
            workload.layer_arrays(w.fisher),
            w.inputs,
            w.labels,
            checks,
            jax_grads,
        )
        runners += torch_runners
        entries += [entry for entry, _ in torch_runners]
    else:
        entries += [
            Entry(name, "epoch", "torch", w.examples, status="skipped", reason=reason)
            for name in ("torch_compile", "torch_eager")
        ]
    harness.time_round_robin(runners, config)
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(entries, key=lambda e: order[e.name])


def ratios(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Each JAX epoch against each PyTorch one, and the scan against the step loop."""
    return [
        *harness.speedups(entries, "jax_scan_epoch"),
        *harness.speedups(entries, "jax_jit_step_loop"),
        harness.within_framework(entries, "jax_scan_epoch", "jax_jit_step_loop"),
    ]
