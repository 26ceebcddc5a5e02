"""Speed and memory benchmarks: ewc_jax against the PyTorch tutorial it replaces.

Run ``python -m benchmarks.compare`` (speed) and ``python -m benchmarks.memory`` (peak RSS). The
benchmarks import ``ewc_jax``; the library never imports the benchmarks. PyTorch is optional: it is
imported only inside the functions of :mod:`benchmarks.torch_tutorial`.
"""
