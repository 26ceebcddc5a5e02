"""The strongest PyTorch diagonal-Fisher tools, behind one signature, as ewc_jax's competitors.

Each ``*_fisher(model, inputs, estimator, labels=None, chunk_size=None)`` returns the diagonal
Fisher of :func:`benchmarks.torch_tutorial.build_mlp`'s model per named parameter (the layout of
``model.named_parameters()``), normalised as ewc_jax's: the *mean* over examples of squared
per-example gradients of ``log softmax(f(x))_y``, with ``y`` given by the estimator:

* ``"argmax"``: the model's most likely class; ``"empirical"``: ``labels``;
* ``"exact"``: the expectation over all classes under the model's own probabilities;
* ``"sampled"``: one draw per example from those probabilities (PyTorch's global RNG).

The tools:

* :func:`hooks_fisher`: plain PyTorch, one pass. Forward hooks keep each Linear layer's input
  ``a`` and output ``z``; one ``autograd.grad`` gives ``δ = ∂ℓ/∂z`` for every layer at once (no
  parameter gradient is formed), and ``F_W = (δ²)ᵀ(a²)``, ``F_b = Σ δ²``. For ``"exact"`` the
  backward is batched over the C classes (``is_grads_batched``) with seeds ``√p_c``, and
  ``Σ_c p_c δ_c²`` is summed *before* the contraction, so the contraction runs once.
* :func:`backpack_fisher`: BackPACK 1.7: ``SumGradSquared`` with the labels (argmax,
  empirical), ``DiagGGNExact`` (exact: for cross-entropy the GGN is the Fisher) and
  ``DiagGGNMC(mc_samples=1)`` (sampled). The loss uses ``reduction="sum"`` and the result is
  divided by N: with ``"mean"``, BackPACK's per-example gradients are 1/N of ours and
  ``SumGradSquared`` would be 1/N² of the sum of squares.
* :func:`nngeometry_fisher`: nngeometry 0.4's ``PMatDiag``: ``FIM(variant="classif_logits")``
  (exact, through the Cholesky factor of the softmax covariance), ``FIM_MonteCarlo(trials=1)``
  (sampled), and a ``TorchHooksJacobianBackend`` over ``log p(y | x)`` for given labels.

PyTorch, BackPACK and nngeometry are optional dependencies, imported inside these functions.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ESTIMATORS = ("argmax", "empirical", "exact", "sampled")

TorchFisher = Callable[..., "dict[str, torch.Tensor]"]
"""``fn(model, inputs, estimator, labels=None, chunk_size=None) -> {name: Fisher}``."""


def _chunks(n: int, chunk_size: int | None) -> list[slice]:
    size = n if chunk_size is None else chunk_size
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check(estimator: str, labels: torch.Tensor | None) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "empirical" and labels is None:
        raise ValueError("estimator='empirical' needs labels")


def _labels(log_probs: torch.Tensor, estimator: str, labels: torch.Tensor | None) -> torch.Tensor:
    """The class whose log-probability is differentiated, per example."""
    import torch

    if estimator == "argmax":
        return log_probs.argmax(1)
    if estimator == "sampled":
        return torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)
    assert labels is not None
    return labels


def hooks_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    estimator: str,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Plain-PyTorch one-pass diagonal Fisher with forward hooks and ``(a²)ᵀ(δ²)`` per Linear.

    Args:
      model: a network whose parameters all belong to ``torch.nn.Linear`` layers.
      inputs: ``[N, 784]`` examples.
      estimator: ``"argmax"``, ``"empirical"``, ``"exact"`` or ``"sampled"``.
      labels: ``[N]`` int64 classes, for ``"empirical"``.
      chunk_size: examples per pass; ``None``: all at once.

    Returns:
      The diagonal Fisher per named parameter.

    Raises:
      ValueError: an unknown estimator, or ``"empirical"`` without labels.
    """
    import torch

    _check(estimator, labels)
    linears = {
        module: name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    saved: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        saved[module] = (args[0].detach(), out)

    handles = [module.register_forward_hook(save) for module in linears]
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    try:
        for chunk in _chunks(inputs.shape[0], chunk_size):
            log_probs = torch.log_softmax(model(inputs[chunk]), dim=1)
            outputs = [saved[module][1] for module in linears]
            if estimator == "exact":
                num_classes = log_probs.shape[1]
                root_p = log_probs.detach().exp().sqrt()
                eye = torch.eye(num_classes, dtype=log_probs.dtype, device=log_probs.device)
                seeds = eye[:, None, :] * root_p.T[:, :, None]  # [c, n, k] = √p_nc [k = c]
                deltas = torch.autograd.grad(
                    log_probs, outputs, grad_outputs=seeds, is_grads_batched=True
                )
                squares = [(d**2).sum(0) for d in deltas]
            else:
                y = _labels(log_probs, estimator, None if labels is None else labels[chunk])
                chosen = log_probs.gather(1, y[:, None]).sum()
                squares = [d**2 for d in torch.autograd.grad(chosen, outputs)]
            with torch.no_grad():
                for (module, name), delta2 in zip(linears.items(), squares, strict=True):
                    a = saved[module][0]
                    fisher[f"{name}.weight"] += delta2.T @ (a**2)
                    fisher[f"{name}.bias"] += delta2.sum(0)
            saved.clear()
    finally:
        for handle in handles:
            handle.remove()
    for value in fisher.values():
        value /= inputs.shape[0]
    return fisher


_BACKPACK_EXTENSIONS = {
    "argmax": ("SumGradSquared", "sum_grad_squared"),
    "empirical": ("SumGradSquared", "sum_grad_squared"),
    "exact": ("DiagGGNExact", "diag_ggn_exact"),
    "sampled": ("DiagGGNMC", "diag_ggn_mc"),
}


def backpack_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` extended for BackPACK (``extend`` adds hooks to the module it gets)."""
    from backpack import extend

    return extend(copy.deepcopy(model))


def backpack_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    estimator: str,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """BackPACK's diagonal Fisher: ``SumGradSquared``, ``DiagGGNExact`` or ``DiagGGNMC``.

    Args:
      model: a model returned by :func:`backpack_model`.
      inputs: ``[N, 784]`` examples.
      estimator: ``"argmax"``, ``"empirical"``, ``"exact"`` or ``"sampled"``.
      labels: ``[N]`` int64 classes, for ``"empirical"``.
      chunk_size: examples per pass; ``None``: all at once.

    Returns:
      The diagonal Fisher per named parameter.

    Raises:
      ValueError: an unknown estimator, or ``"empirical"`` without labels.
    """
    import backpack
    import torch
    from backpack import extensions

    _check(estimator, labels)
    class_name, attribute = _BACKPACK_EXTENSIONS[estimator]
    extension = getattr(extensions, class_name)
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for chunk in _chunks(inputs.shape[0], chunk_size):
        model.zero_grad(set_to_none=True)
        logits = model(inputs[chunk])
        if estimator in ("exact", "sampled"):
            # The GGN of cross-entropy does not depend on the label: any label will do.
            y = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        else:
            y = _labels(logits, estimator, None if labels is None else labels[chunk])
        with backpack.backpack(extension()), warnings.catch_warnings():
            # BackPACK's module hooks fire on outputs only, as intended: inputs need no grad.
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            loss_fn(logits, y).backward()
        with torch.no_grad():
            for name, p in params.items():
                fisher[name] += getattr(p, attribute)
    for value in fisher.values():
        value /= inputs.shape[0]
    return fisher


def nngeometry_fisher(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    estimator: str,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """nngeometry's ``PMatDiag``: ``FIM``, ``FIM_MonteCarlo`` or the Jacobian of ``log p(y|x)``.

    Args:
      model: the network.
      inputs: ``[N, 784]`` examples.
      estimator: ``"argmax"``, ``"empirical"``, ``"exact"`` or ``"sampled"``.
      labels: ``[N]`` int64 classes, for ``"empirical"``.
      chunk_size: examples per DataLoader batch; ``None``: all at once.

    Returns:
      The diagonal Fisher per named parameter.

    Raises:
      ValueError: an unknown estimator, or ``"empirical"`` without labels.
    """
    import torch
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag

    _check(estimator, labels)
    tensors = (inputs,) if labels is None else (inputs, labels)
    dataset = torch.utils.data.TensorDataset(*tensors)
    loader = torch.utils.data.DataLoader(dataset, batch_size=chunk_size or inputs.shape[0])
    # FIM moves each batch to ``device`` (default "cpu") before calling the model.
    device = str(inputs.device)
    if estimator == "exact":
        diag = FIM(model, loader, PMatDiag, variant="classif_logits", device=device).get_diag()
    elif estimator == "sampled":
        fim = FIM_MonteCarlo(model, loader, PMatDiag, variant="classif_logits", device=device)
        diag = fim.get_diag()
    else:

        def log_likelihood(x: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
            log_probs = torch.log_softmax(model(x), dim=1)
            chosen = _labels(log_probs, estimator, y[0] if y else None)
            return log_probs.gather(1, chosen[:, None])

        backend = TorchHooksJacobianBackend(
            layer_collection=LayerCollection.from_model(model),
            model=model,
            function=log_likelihood,
        )
        diag = PMatDiag(generator=backend, examples=loader).get_diag()
    # PMatDiag is one flat vector, each Linear's weight (row-major) then its bias, in module
    # order: the order of named_parameters() for these models.
    fisher, start = {}, 0
    for name, p in model.named_parameters():
        fisher[name] = diag[start : start + p.numel()].view_as(p).detach()
        start += p.numel()
    return fisher
