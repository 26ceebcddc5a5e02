"""The machinery the diagonal Fisher, MAS and K-FAC share, once (private: no public API here).

Layers, each importing only those above it:

* ``dtypes``: the one widening policy (float32 at least for every sum);
* ``model``: ``apply_fn`` with its params' and one example's shapes, ``params`` and logits checks;
* ``inputs``: checks of inputs, labels, token masks and chunk sizes;
* ``plan``: the per-example program traced to a jaxpr, and which parameters it taps;
* ``tapped``: the tapped forward pass and its VJP (layer inputs ``a``, output gradients ``δ``);
* ``onepass``: the one-pass squared-gradient sums ``(a²)ᵀ δ²``;
* ``targets``: each estimator's labels, and per-example gradients by ``vmap(grad)``;
* ``cost``: the cost model, the path per parameter and the one default chunk size;
* ``chunking``: the one chunked, Kahan-compensated sum over examples;
* ``kronecker``: K-FAC factors, anchors and their quadratic laid out like the layer's kernel;
* ``placement``: that sum on one device, data parallel (``shard_map``) or sharded (GSPMD).

``ewc_jax._fisher``, ``ewc_jax._mas`` and ``ewc_jax._kfac`` are thin users of these.
"""
