"""Depth growth (`flexvar_hf.training.growth`): a deeper copy with the same outputs, and configs copied whole."""

from __future__ import annotations

import pytest
import torch

from flexvar_hf import FlexVARTransformer2DModel
from flexvar_hf.training.growth import grow_depth, init_config, old_block_positions


def trained_like_model(num_layers: int = 3) -> FlexVARTransformer2DModel:
    """A tiny model whose every weight is perturbed, so that every block (gates included) changes the logits."""
    torch.manual_seed(0)
    model = FlexVARTransformer2DModel(
        num_classes=5, vocab_size=40, code_dim=8, num_layers=num_layers, hidden_size=32, num_attention_heads=2,
        pos_grid_size=4,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    model.register_to_config(sample_size=6)  # as train.py records the training size
    return model.eval()


def logits(model, labels, scales, inputs):
    with torch.no_grad():
        return model(labels, scales, inputs).logits


def test_old_blocks_are_spread_evenly():
    assert old_block_positions(8, 12) == [0, 1, 3, 4, 6, 7, 9, 10]
    assert old_block_positions(3, 4) == [0, 1, 2]
    assert old_block_positions(2, 6) == [0, 3]


def test_grown_model_computes_the_same_logits_and_keeps_the_config():
    model = trained_like_model()
    scales = [(1, 1), (2, 2), (3, 2)]
    labels = torch.tensor([0, 3, 5])  # 5 is the unconditional label
    inputs = torch.randn(3, 4 + 6, 8)
    grown = grow_depth(model, 5)

    assert grown.config.num_layers == 5 and len(grown.blocks) == 5
    assert {**init_config(grown), "num_layers": 3} == init_config(model)
    assert grown.config.sample_size == 6  # from_config(model.config) would have reset it to 16
    expected = logits(model, labels, scales, inputs)
    # Exactly: a zero gate adds exactly nothing (a fresh block's gates are near zero, not zero).
    assert torch.equal(logits(grown, labels, scales, inputs), expected)

    # The new blocks are the identity only through their zero gates: open them and the logits change.
    positions = old_block_positions(3, 5)
    new_index = next(i for i in range(5) if i not in positions)
    for index, old_index in zip(positions, range(3)):
        assert torch.equal(grown.blocks[index].ff.net[2].weight, model.blocks[old_index].ff.net[2].weight)
    with torch.no_grad():
        grown.blocks[new_index].norm1.linear.bias.add_(0.5)
    assert (logits(grown, labels, scales, inputs) - expected).abs().max() > 1e-3


def test_growing_needs_more_layers():
    model = trained_like_model()
    for num_layers in (3, 2, 4.0):
        with pytest.raises(ValueError, match="more than the model's 3 layers"):
            grow_depth(model, num_layers)
