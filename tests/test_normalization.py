"""ChannelsLastGroupNorm: the VQ decoder's GroupNorm, reduced channel by channel for large channels-last inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder

from flexvar_hf import FlexVQModel
from flexvar_hf.models import normalization
from flexvar_hf.models.normalization import ChannelsLastGroupNorm, use_channels_last_group_norms


def channels_last_norm(affine: bool = True, channels: int = 16, groups: int = 4) -> ChannelsLastGroupNorm:
    torch.manual_seed(0)
    norm = ChannelsLastGroupNorm(groups, channels, eps=1e-6, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    return norm


def channels_last_input(dtype=torch.float32) -> torch.Tensor:
    # An offset mean per channel, so that the group statistics differ from the channels' own.
    torch.manual_seed(1)
    inputs = torch.randn(3, 16, 7, 9) * 2 + torch.linspace(-3, 3, 16).view(1, 16, 1, 1)
    return inputs.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("affine", [True, False])
def test_channel_by_channel_path_equals_group_norm(monkeypatch, affine):
    norm = channels_last_norm(affine)
    inputs = channels_last_input()
    expected = F.group_norm(inputs, norm.num_groups, norm.weight, norm.bias, norm.eps)
    monkeypatch.setattr(normalization, "CHANNEL_MOMENTS_MIN_VALUES", 1)
    # The per-channel path must not fall back to nn.GroupNorm's forward.
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda *args: pytest.fail("fell back to F.group_norm"))
    result = norm(inputs)
    assert result.dtype == inputs.dtype and result.shape == inputs.shape
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_channel_by_channel_path_in_bfloat16_rounds_like_group_norm(monkeypatch):
    norm = channels_last_norm().to(torch.bfloat16)
    inputs = channels_last_input(torch.bfloat16)
    expected = F.group_norm(inputs.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    monkeypatch.setattr(normalization, "CHANNEL_MOMENTS_MIN_VALUES", 1)
    result = norm(inputs)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float(), expected, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("memory_format, lower_limit", [(torch.contiguous_format, True), (torch.channels_last, False)])
def test_contiguous_and_small_inputs_take_group_norm(monkeypatch, memory_format, lower_limit):
    norm = channels_last_norm()
    inputs = channels_last_input().contiguous(memory_format=memory_format)
    if lower_limit:
        monkeypatch.setattr(normalization, "CHANNEL_MOMENTS_MIN_VALUES", 1)
    calls = []
    group_norm_forward = nn.GroupNorm.forward
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda self, x: calls.append(x) or group_norm_forward(self, x))
    result = norm(inputs)
    assert len(calls) == 1
    assert torch.equal(result, F.group_norm(inputs, norm.num_groups, norm.weight, norm.bias, norm.eps))


def test_vq_decoder_norms_are_replaced_with_the_same_parameters_and_keys():
    vq = FlexVQModel(base_channels=32, channel_multipliers=(1, 2), z_channels=16, num_codes=30, code_dim=8)
    norms = [module for module in vq.decoder.modules() if isinstance(module, nn.GroupNorm)]
    assert norms and all(type(module) is ChannelsLastGroupNorm for module in norms)
    assert all(type(module) is nn.GroupNorm for module in vq.encoder.modules() if isinstance(module, nn.GroupNorm))

    decoder = Decoder(
        in_channels=16,
        out_channels=3,
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    weights = {name: tensor.clone() for name, tensor in decoder.state_dict().items()}
    conv_norm_out_weight = decoder.conv_norm_out.weight
    use_channels_last_group_norms(decoder)
    assert type(decoder.conv_norm_out) is ChannelsLastGroupNorm
    assert decoder.conv_norm_out.weight is conv_norm_out_weight
    assert decoder.state_dict().keys() == weights.keys()
    assert all(torch.equal(decoder.state_dict()[name], tensor) for name, tensor in weights.items())


def test_channels_last_decoding_equals_contiguous_decoding(monkeypatch):
    torch.manual_seed(0)
    vq = FlexVQModel(base_channels=32, channel_multipliers=(1, 2), z_channels=16, num_codes=30, code_dim=8).eval()
    for module in vq.decoder.modules():  # non-trivial affine parameters
        if isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias, std=0.5)
    indices = torch.randint(0, 30, (2, 4, 5))
    with torch.no_grad():
        expected = vq.decode_indices(indices).sample
        monkeypatch.setattr(normalization, "CHANNEL_MOMENTS_MIN_VALUES", 1)
        for module in (vq.post_quant_conv, vq.decoder):
            module.to(memory_format=torch.channels_last)
        norm_inputs, group_norm_inputs = [], []
        for module in vq.decoder.modules():
            if isinstance(module, nn.GroupNorm):
                module.register_forward_pre_hook(lambda module, args: norm_inputs.append(args[0].ndim))
        group_norm_forward = nn.GroupNorm.forward
        monkeypatch.setattr(
            nn.GroupNorm, "forward", lambda self, x: group_norm_inputs.append(x.ndim) or group_norm_forward(self, x)
        )
        result = vq.decode_indices(indices).sample
    # Every 4-D norm took the per-channel path; only the attention's norm over (B, C, tokens) fell back.
    assert norm_inputs.count(4) > 0 and group_norm_inputs == [3] * norm_inputs.count(3)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_compiled_channel_by_channel_norm_has_no_graph_break(monkeypatch):
    """The per-channel path is what Inductor compiles in fast sampling; it must trace as one graph."""
    norm = channels_last_norm()
    inputs = channels_last_input()
    monkeypatch.setattr(normalization, "CHANNEL_MOMENTS_MIN_VALUES", 1)
    expected = F.group_norm(inputs, norm.num_groups, norm.weight, norm.bias, norm.eps)
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda *args: pytest.fail("fell back to F.group_norm"))
    torch._dynamo.reset()
    compiled = torch.compile(norm, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), expected, rtol=1e-5, atol=1e-5)
