"""The PyTorch EWC tutorial's algorithm, re-implemented faithfully as the speed baseline.

The tutorial (moskomule/ewc.pytorch, the "well-liked tutorial" this project started from) trains
an MLP 784-256-256-256-10 with a ReLU after *every* Linear layer, the logits layer included. Its
diagonal Fisher is a Python loop over single examples, each labelled with the model's own most
likely class:

    for x in data:                      # one example at a time
        model.zero_grad()
        out = model(x[None])
        label = out.argmax(1)
        F.nll_loss(F.log_softmax(out, 1), label).backward()
        F_p += p.grad ** 2 / N          # for every parameter p

and its EWC loss is ``importance * Σ F_p (p − p_old)²`` (no ½: importance 1000 is ewc_jax's strength
2000), trained with SGD, learning rate 1e-3, batch 32.

Besides that loop this module has the idiomatic vectorised PyTorch alternative,
:func:`functorch_fisher` (``torch.func.vmap(grad)`` in chunks), so that ewc_jax is compared both
with what the tutorial does and with the best plain PyTorch can do.

Weights come in and Fisher values go out in ewc_jax's layout: a list of ``(kernel[in, out],
bias[out])`` numpy pairs, one per Dense layer, so both frameworks run on identical numbers.
PyTorch is an optional dependency, imported only inside these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LayerArrays = tuple[np.ndarray, np.ndarray]
"""One Dense layer as numpy arrays: ``(kernel[in, out], bias[out])``."""


def default_device() -> str:
    """Returns ``"cuda"`` when PyTorch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so that a timer read afterwards measures it; no-op on CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_mlp(weights: Sequence[LayerArrays], device: str = "cpu") -> torch.nn.Sequential:
    """Builds the tutorial's MLP (ReLU after every Linear, logits included) from numpy weights.

    Args:
      weights: ``(kernel[in, out], bias[out])`` per layer, ewc_jax's layout; PyTorch stores the
        transposed kernel.
      device: PyTorch device for the parameters.

    Returns:
      ``Sequential(Linear, ReLU, ..., Linear, ReLU)`` in float32.

    Example:
      >>> model = build_mlp([(np.ones((3, 2), np.float32), np.zeros(2, np.float32))])
      >>> tuple(model[0].weight.shape)
      (2, 3)
    """
    import torch

    layers: list[torch.nn.Module] = []
    for kernel, bias in weights:
        linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T, np.float32)))
            linear.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).to(device)


def to_layer_arrays(tensors: dict[str, torch.Tensor]) -> list[LayerArrays]:
    """Converts ``{"0.weight": W, "0.bias": b, ...}`` back to ewc_jax's ``(kernel, bias)`` layout.

    Args:
      tensors: per-parameter tensors keyed like ``model.named_parameters()`` of :func:`build_mlp`.

    Returns:
      ``(W.T, b)`` as float32 numpy arrays, one pair per Linear layer, in layer order.
    """
    prefixes = sorted({name.split(".")[0] for name in tensors}, key=int)
    return [
        (
            tensors[f"{p}.weight"].detach().cpu().numpy().T.astype(np.float32),
            tensors[f"{p}.bias"].detach().cpu().numpy().astype(np.float32),
        )
        for p in prefixes
    ]


def tutorial_fisher(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tutorial's diagonal Fisher: one forward/backward per example, argmax labels.

    ``F_p = 1/N Σ_n (∂/∂p log softmax(f(x_n))[ŷ_n])²`` with ``ŷ_n = argmax f(x_n)``, or with
    ``ŷ_n`` the given label (the empirical Fisher; the tutorial itself uses argmax).

    Args:
      model: the network; ``model(x[None])`` returns (ReLU'd) logits ``[1, C]``.
      inputs: ``[N, ...]`` examples on the model's device.
      labels: ``[N]`` int64 classes, or ``None`` for the argmax.

    Returns:
      The diagonal Fisher per named parameter, same shapes as the parameters.
    """
    import torch
    import torch.nn.functional as F

    n = inputs.shape[0]
    params = dict(model.named_parameters())
    precision = {name: torch.zeros_like(p) for name, p in params.items()}
    model.eval()
    for i, x in enumerate(inputs):
        model.zero_grad()
        out = model(x[None])
        label = out.argmax(1) if labels is None else labels[i : i + 1]
        F.nll_loss(F.log_softmax(out, dim=1), label).backward()
        with torch.no_grad():
            for name, p in params.items():
                precision[name] += p.grad**2 / n
    return precision


def functorch_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    chunk_size: int = 512,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The same Fisher as :func:`tutorial_fisher`, with ``torch.func.vmap(grad)`` over chunks.

    Args:
      model: the network; ``model(x[None])`` returns (ReLU'd) logits ``[1, C]``.
      inputs: ``[N, ...]`` examples on the model's device.
      chunk_size: examples per vectorised chunk; memory holds ``chunk_size`` copies of the gradient.
      labels: ``[N]`` int64 classes, or ``None`` for the argmax.

    Returns:
      The diagonal Fisher per named parameter, same shapes as the parameters.
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def neg_log_likelihood(
        params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        out = functional_call(model, params, (x[None],))
        return F.nll_loss(F.log_softmax(out, dim=1), out.argmax(1) if y is None else y[None])

    in_dims = (None, 0, None if labels is None else 0)
    per_example_grads = vmap(grad(neg_log_likelihood), in_dims=in_dims)
    precision = {name: torch.zeros_like(p) for name, p in params.items()}
    with torch.no_grad():
        for start in range(0, inputs.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            grads = per_example_grads(
                params, inputs[chunk], None if labels is None else labels[chunk]
            )
            for name, g in grads.items():
                precision[name] += (g**2).sum(0)
        for value in precision.values():
            value /= inputs.shape[0]
    return precision


def tutorial_penalty(
    model: torch.nn.Module, precision: dict[str, torch.Tensor], means: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The tutorial's EWC penalty ``Σ_p F_p (p − p_old)²`` (no ½, no importance factor).

    Args:
      model: the network being trained.
      precision: diagonal Fisher per named parameter.
      means: anchor (old task's parameters) per named parameter.

    Returns:
      A scalar tensor, differentiable with respect to the model's parameters.
    """
    loss = 0.0
    for name, p in model.named_parameters():
        loss = loss + (precision[name] * (p - means[name]) ** 2).sum()
    return loss  # type: ignore[return-value]


def tutorial_loss(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    precision: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    importance: float,
) -> torch.Tensor:
    """The tutorial's training loss: ``cross_entropy + importance * Σ_p F_p (p − p_old)²``.

    Args:
      model: the network being trained.
      inputs: ``[B, 784]`` batch.
      labels: ``[B]`` integer classes.
      precision: diagonal Fisher per named parameter.
      means: anchor per named parameter.
      importance: the tutorial's penalty factor (ewc_jax's strength is twice this).

    Returns:
      A scalar tensor.
    """
    import torch.nn.functional as F

    return F.cross_entropy(model(inputs), labels) + importance * tutorial_penalty(
        model, precision, means
    )


def tutorial_train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    precision: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    *,
    importance: float,
    batch_size: int = 32,
) -> float:
    """One epoch of the tutorial's ``ewc_train``: cross-entropy + ``importance`` × penalty, SGD.

    Batches are consecutive slices of tensors already on the device (no DataLoader, no shuffling),
    and a trailing partial batch is dropped, so that the JAX epochs see exactly the same batches.
    As in the tutorial, the loss is read back with ``.item()`` every step.

    Args:
      model: the network, updated in place.
      optimizer: e.g. ``torch.optim.SGD(model.parameters(), lr=1e-3)``.
      inputs: ``[N, 784]`` examples.
      labels: ``[N]`` integer classes.
      precision: diagonal Fisher per named parameter.
      means: anchor per named parameter.
      importance: the tutorial's penalty factor (ewc_jax's strength is twice this).
      batch_size: examples per SGD step.

    Returns:
      The mean loss over the epoch's steps.
    """
    model.train()
    steps = inputs.shape[0] // batch_size
    epoch_loss = 0.0
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        optimizer.zero_grad()
        loss = tutorial_loss(model, inputs[batch], labels[batch], precision, means, importance)
        epoch_loss += loss.item()
        loss.backward()
        optimizer.step()
    return epoch_loss / steps


def compiled_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    *,
    importance: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The tutorial's SGD step under ``torch.compile``: the fastest epoch PyTorch offers.

    The loss (forward, cross-entropy and EWC penalty) is compiled, so its backward is the
    compiled AOTAutograd graph; the optimizer step is compiled separately, as PyTorch's
    "compiled optimizer" recipe does. Compilation happens on the first call.

    Args:
      model: the network, updated in place.
      optimizer: e.g. ``torch.optim.SGD(model.parameters(), lr=1e-3)``.
      precision: diagonal Fisher per named parameter.
      means: anchor per named parameter.
      importance: the tutorial's penalty factor (ewc_jax's strength is twice this).

    Returns:
      ``step(inputs, labels) -> loss`` (a detached scalar tensor; nothing is read back).
    """
    import torch

    def loss(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return tutorial_loss(model, inputs, labels, precision, means, importance)

    compiled_loss = torch.compile(loss)
    compiled_update = torch.compile(optimizer.step)

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        value = compiled_loss(inputs, labels)
        value.backward()
        compiled_update()
        return value.detach()

    return step


def train_epoch(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 32,
) -> float:
    """One epoch of ``step`` over consecutive batches; the mean loss is read back once, at the end.

    Args:
      step: e.g. :func:`compiled_train_step`'s result.
      inputs: ``[N, 784]`` examples.
      labels: ``[N]`` integer classes.
      batch_size: examples per step; a trailing partial batch is dropped.

    Returns:
      The mean loss over the epoch's steps.
    """
    steps = inputs.shape[0] // batch_size
    total = inputs.new_zeros(())
    for i in range(steps):
        batch = slice(i * batch_size, (i + 1) * batch_size)
        total += step(inputs[batch], labels[batch])
    return float(total) / steps
