"""GroupNorm for the compiled, channels-last VQ decoder."""

from __future__ import annotations

import torch
import torch.nn as nn

# Fewest values per channel (batch x height x width) for which `ChannelsLastGroupNorm` takes its per-channel path.
# Timed on a compiled GroupNorm + SiLU of bf16 channels-last inputs on an H100, the per-channel path was faster from
# 2^20 values per channel on (the decoder's large maps at batch 64) and slower at 2^16, where too few programs share
# the work.
CHANNEL_MOMENTS_MIN_VALUES = 2**20


class ChannelsLastGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same arguments, parameters and state-dict keys) that reduces large channels-last inputs
    channel by channel.

    Inductor compiles `F.group_norm` as one reduction per (sample, group). In channels-last memory a group's values
    are a few adjacent channels in every pixel's row of all channels (4 of 128 at the VQ decoder's full resolution),
    so each reduction reads scattered short runs. Here the mean and variance of every channel come first, a
    reduction whose neighbouring channels sit side by side in memory, and each group's statistics are combined from
    its channels' (exactly: the group variance is the mean of the channel variances plus the variance of the channel
    means). Results equal `F.group_norm` up to float rounding. Contiguous inputs and inputs with fewer than
    `CHANNEL_MOMENTS_MIN_VALUES` values per channel use `F.group_norm`.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, *) -> same shape and dtype; the per-channel path for (B, C, H, W) channels-last inputs."""
        batch, channels = hidden_states.shape[:2]
        if (
            hidden_states.ndim != 4
            or not hidden_states.is_contiguous(memory_format=torch.channels_last)
            or hidden_states.numel() // channels < CHANNEL_MOMENTS_MIN_VALUES
        ):
            return super().forward(hidden_states)
        groups = self.num_groups
        channel_var, channel_mean = torch.var_mean(hidden_states.float(), dim=(2, 3), correction=0)
        channel_mean = channel_mean.view(batch, groups, -1)
        group_mean = channel_mean.mean(dim=-1, keepdim=True)
        group_var = channel_var.view(batch, groups, -1).mean(dim=-1, keepdim=True)
        group_var = group_var + (channel_mean - group_mean).square().mean(dim=-1, keepdim=True)

        def per_channel(group_values: torch.Tensor) -> torch.Tensor:  # (B, groups, 1) -> (B, C, 1, 1)
            return group_values.expand(batch, groups, channels // groups).reshape(batch, channels, 1, 1)

        mean, scale = per_channel(group_mean), per_channel(torch.rsqrt(group_var + self.eps))
        if self.affine:
            scale = scale * self.weight.float().view(channels, 1, 1)
            shift = self.bias.float().view(channels, 1, 1) - mean * scale
        else:
            shift = -mean * scale
        return (hidden_states.float() * scale + shift).to(hidden_states.dtype)


def use_channels_last_group_norms(module: nn.Module) -> None:
    """Replace every `nn.GroupNorm` under `module` by a `ChannelsLastGroupNorm` holding the same parameters."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                replacement = ChannelsLastGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                if child.affine:
                    replacement.weight, replacement.bias = child.weight, child.bias
                setattr(parent, name, replacement)
