"""Copies of a transformer for further training: same config, or deeper with the same outputs (depth growth)."""

from __future__ import annotations

import torch
from diffusers import ModelMixin

from ..models import FlexVARTransformer2DModel
from ..models.transformer_flexvar import ADALN_GATE_CHUNKS


def init_config(model: ModelMixin) -> dict:
    """`model`'s constructor arguments as a plain dict, for `from_config`. Not `model.config` itself: `from_config`
    resets the keys listed in its `_use_default_values` to their defaults, undoing later `register_to_config` calls
    (such as train.py's `sample_size`)."""
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


def old_block_positions(old_layers: int, new_layers: int) -> list[int]:
    """Where each of `old_layers` blocks goes among `new_layers`, spread evenly: 8 -> 12 gives 0, 1, 3, 4, 6, 7, 9,
    10 (a new block after every second old one); the other positions get new blocks."""
    return [index * new_layers // old_layers for index in range(old_layers)]


@torch.no_grad()
def grow_depth(transformer: FlexVARTransformer2DModel, num_layers: int) -> FlexVARTransformer2DModel:
    """
    A deeper copy of `transformer` that computes the same logits: its blocks in order, with new blocks spread evenly
    between them (`old_block_positions`). A new block has a fresh initialisation except for its AdaLN-Zero gates,
    which are zero (weights and biases), so it adds nothing to the residual stream until training opens its gates.
    Every other weight is copied. Progressive depth growth, in the spirit of the original's AdaLN-Zero
    initialisation: train a small model, grow it, train on.

    Args:
        transformer: The model to grow (unchanged).
        num_layers: Depth of the copy; more than `transformer.config.num_layers`.

    Returns:
        A new `FlexVARTransformer2DModel` in float32 on the CPU, config equal but for `num_layers`.
    """
    old_layers = transformer.config.num_layers
    if not isinstance(num_layers, int) or num_layers <= old_layers:
        raise ValueError(f"Growing needs more than the model's {old_layers} layers, got num_layers={num_layers!r}.")
    grown = FlexVARTransformer2DModel.from_config({**init_config(transformer), "num_layers": num_layers})
    old_state = {name: tensor.float().cpu() for name, tensor in transformer.state_dict().items()}
    new_state = grown.state_dict()
    positions = old_block_positions(old_layers, num_layers)
    for name, tensor in old_state.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            name = f"blocks.{positions[int(index)]}.{rest}"
        new_state[name] = tensor
    grown.load_state_dict(new_state, strict=True)
    width = transformer.config.hidden_size
    for index in sorted(set(range(num_layers)) - set(positions)):
        linear = grown.blocks[index].norm1.linear
        for chunk in ADALN_GATE_CHUNKS:
            linear.weight.view(6, width, width)[chunk].zero_()
            linear.bias.view(6, width)[chunk].zero_()
    return grown
