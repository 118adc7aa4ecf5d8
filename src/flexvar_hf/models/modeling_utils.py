"""The `ModelMixin` of flexvar-hf's models: diffusers' own, with a dtype cast that logs no false warning."""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.models.modeling_utils import ModelMixin


class FlexVARModelMixin(ModelMixin):
    """
    diffusers' [`ModelMixin`] for models that keep no module in float32.

    diffusers' `ModelMixin.to` logs "There are modules in ... that should be kept in float32: []" on every dtype cast
    of a model whose `_keep_in_fp32_modules` is unset or empty (its guard compares the empty list with None), so
    `pipe.to(torch.bfloat16)` and `from_pipe` would print it once per model although nothing is kept in float32.
    Here a cast of such a model is `torch.nn.Module.to`; quantised and group-offloaded models, and models that do
    keep float32 modules, still take diffusers' `to` and its checks.

    A module that defines a subclass also imports `ModelMixin` itself: diffusers' pipeline loader looks a
    component's loadable base classes up by name in the module that `model_index.json` names.
    """

    def to(self, *args, **kwargs):
        if self._keep_in_fp32_modules or getattr(self, "is_quantized", False) or _is_group_offload_enabled(self):
            return super().to(*args, **kwargs)
        return nn.Module.to(self, *args, **kwargs)
