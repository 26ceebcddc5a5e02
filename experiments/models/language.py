"""A small causal transformer over bytes (Flax Linen) for the continual language-modelling runs.

Called like the image models, ``model.apply({"params": p}, tokens, heads)`` with int32 tokens
``[B, T]`` (``heads`` is ignored: one shared output layer), it returns next-byte logits
``[B, T, vocab_size]``; position ``t`` sees tokens ``0..t`` only. Pre-LayerNorm blocks
(Radford et al. 2019): ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of 4x width,
a final LayerNorm and an untied output layer. Positions are learned embeddings sized by the
context length of the first batch (so the data fixes ``T``).

With ``lora_rank > 0`` every attention projection (query, key, value, out) and both MLP Dense
layers carry a low-rank adapter (:mod:`experiments.models.lora`): the base parameters keep
their names and initial values, and the adapters start at ``B = 0``, so the model starts equal
to the one without them.

On a data-parallel mesh params are replicated like every model's, or split over the mesh with
``param_sharding="fsdp"`` (:func:`experiments.training.device.param_shardings`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = CausalTransformer(num_layers=1, width=16, num_heads=2)
    >>> tokens = jnp.zeros((3, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), tokens)["params"]
    >>> model.apply({"params": params}, tokens).shape
    (3, 8, 256)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models import lora

LM_MODELS = ("causal_transformer",)
"""Model names of this module (``config.model``)."""


class Block(nn.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    width: int
    num_heads: int
    lora_rank: int = 0
    lora_alpha: float = 8.0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        adapter = lora.adapter(self.lora_rank, self.lora_alpha)
        attention = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_dot_general_cls=adapter, out_dot_general_cls=adapter
        )
        h = nn.LayerNorm()(x)
        x = x + attention(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        hidden = nn.gelu(nn.Dense(4 * self.width, dot_general_cls=adapter)(h))
        return x + nn.Dense(self.width, dot_general_cls=adapter)(hidden)


class CausalTransformer(nn.Module):
    """A byte-level causal transformer language model.

    Attributes:
        num_layers: transformer blocks.
        width: model width ``d``.
        num_heads: attention heads (``d`` must divide by it).
        vocab_size: tokens (256 for bytes).
        lora_rank: rank ``r`` of the adapters of every block's Dense layers (0: none).
        lora_alpha: their scale ``α`` (the update is ``α / r · B A x``).
    """

    num_layers: int = 2
    width: int = 64
    num_heads: int = 4
    vocab_size: int = 256
    lora_rank: int = 0
    lora_alpha: float = 8.0

    @nn.compact
    def __call__(self, tokens: jax.Array, heads: jax.Array | None = None) -> jax.Array:
        del heads
        length = tokens.shape[1]
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (length, self.width), jnp.float32
        )
        x = nn.Embed(self.vocab_size, self.width)(tokens) + positions[None]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.num_layers):
            x = Block(self.width, self.num_heads, self.lora_rank, self.lora_alpha)(x, mask)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def build_lm(
    name: str,
    *,
    num_layers: int,
    width: int,
    num_heads: int,
    vocab_size: int,
    lora_rank: int = 0,
    lora_alpha: float = 8.0,
):
    """The language model a config names (one of :data:`LM_MODELS`), with rank-``lora_rank``
    adapters (0: none)."""
    if name not in LM_MODELS:
        raise ValueError(f"unknown language model {name!r}; valid: {LM_MODELS}")
    if width % num_heads:
        raise ValueError(f"the width {width} must be divisible by num_heads {num_heads}")
    return CausalTransformer(
        num_layers=num_layers,
        width=width,
        num_heads=num_heads,
        vocab_size=vocab_size,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )
