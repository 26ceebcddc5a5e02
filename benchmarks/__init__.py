"""Speed and memory benchmarks: ewc_jax against the PyTorch tutorial and the strongest tools.

Run ``python -m benchmarks.compare`` (speed: every Fisher estimator against plain-PyTorch hooks,
BackPACK, nngeometry, ``torch.func`` and the tutorial's loop, and the training epoch against eager
and ``torch.compile``) and ``python -m benchmarks.memory`` (peak RSS). The benchmarks import
``ewc_jax`` and the model and data of ``experiments``; the library never imports the benchmarks.
PyTorch, BackPACK and nngeometry are optional: they are imported only inside the functions of
:mod:`benchmarks.torch_tutorial` and :mod:`benchmarks.torch_fisher`.
"""
