"""The models: image classifiers (:mod:`.images`) and a byte-level language model
(:mod:`.language`).

:func:`build` turns a :class:`experiments.spec.ModelSpec` into a Flax module sized for a scenario.
"""

from __future__ import annotations

import flax.linen as nn

from experiments.models.images import (
    INITS,
    MLP,
    MODELS,
    MultiHeadMLP,
    SmallCNN,
    build_model,
    init_params,
    num_layers,
    read_state_dict,
    tutorial_mlp,
)
from experiments.models.language import LM_MODELS, CausalTransformer, build_lm
from experiments.spec import ModelSpec

__all__ = [
    "INITS",
    "LM_MODELS",
    "MLP",
    "MODELS",
    "CausalTransformer",
    "MultiHeadMLP",
    "SmallCNN",
    "build",
    "build_lm",
    "build_model",
    "init_params",
    "num_layers",
    "read_state_dict",
    "tutorial_mlp",
]


def build(spec: ModelSpec, *, num_heads: int, num_outputs: int) -> nn.Module:
    """The module ``spec`` names, with ``num_heads`` heads of ``num_outputs`` logits (a language
    model: a vocabulary of ``num_outputs``)."""
    if spec.name in LM_MODELS:
        return build_lm(
            spec.name,
            num_layers=spec.num_layers,
            width=spec.width,
            num_heads=spec.num_heads,
            vocab_size=num_outputs,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
        )
    return build_model(
        spec.name,
        num_heads=num_heads,
        num_outputs=num_outputs,
        hidden_sizes=spec.hidden_sizes,
        relu_on_logits=spec.relu_on_logits,
    )
