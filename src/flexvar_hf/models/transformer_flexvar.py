"""FlexVARTransformer2DModel: the scale-wise autoregressive transformer of FlexVAR."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see FlexVARModelMixin)
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
from diffusers.utils import BaseOutput

from ..guidance import combine_guidance
from ..scales import ScaleLike, as_hw_list, flatten_grid, num_tokens
from .block_causal import (
    AttentionMask,
    attention_dtype,
    block_causal_attention,
    block_causal_mask,
    check_training_attention,
    training_attention_mask,
)
from .float8 import (
    Float8FeedForward,
    Float8Linear,
    QuantizedRows,
    modulated_layer_norm_quantize_rows,
    residual_modulated_layer_norm_quantize_rows,
)
from .modeling_utils import FlexVARModelMixin

# The per-head attention scale is exp(log_scale), clamped at exp(MAX_LOG_SCALE) = 100 as in the original.
L2_EPS = 1e-12
MAX_LOG_SCALE = math.log(100.0)
# A block's AdaLN output is six `hidden_size` chunks (see `FlexVARBlock.modulation`); these are its two gates.
ADALN_GATE_CHUNKS = (2, 5)


@dataclass
class FlexVARTransformerOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_tokens, vocab_size)`):
            Next-scale token logits for every token of the scales that were fed in, row-major per scale.
    """

    logits: torch.Tensor


class FlexVARKVCache:
    """Preallocated key/value cache for generating one scale per call.

    Each layer gets one `(batch, max_tokens, 2, heads, head_dim)` buffer of keys and values, the layout of the key
    and value heads in the attention's projection, so that a call writes its tokens' keys and values after the tokens
    already cached, and attends to everything written so far.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_tokens: int, head_dim: int, **tensor_kw):
        shape = (batch_size, max_tokens, 2, num_heads, head_dim)
        self.key_values = [torch.empty(shape, **tensor_kw) for _ in range(num_layers)]
        self.max_tokens = max_tokens
        self.length = 0
        # Per-layer AdaLN modulation of the sequence's class embedding, computed by the first call and reused by the
        # later ones: it does not depend on the scale.
        self.modulations: list[tuple[torch.Tensor, ...]] | None = None

    def update(
        self, layer: int, qkv: torch.Tensor, temperature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise this call's (B, l, 3 * H, D) projection as `normalize_queries_keys` does and write its keys and
        values for `layer` after the cached tokens. Returns the (B, l, H, D) queries and all cached (B, L, H, D) keys
        and values, these included.

        CUDA tensors take one Triton kernel for the norm and the write (`kv_cache_kernel`), which reads the projection
        once; elsewhere, and where the projection needs gradients, the norm and a copy.
        """
        end = self.length + qkv.shape[1]
        if end > self.max_tokens:
            raise ValueError(f"The KV cache holds {self.max_tokens} tokens; this call needs {end}.")
        cached = self.key_values[layer]
        fused = fused_cache_writer(qkv)
        if fused is not None:
            query = fused(qkv, temperature, cached, self.length, L2_EPS)
        else:
            query = normalize_and_copy(qkv, temperature, cached, self.length)
        return query, cached[:, :end, 0], cached[:, :end, 1]

    def advance(self, num_new_tokens: int) -> None:
        """Mark the tokens of the last call as cached (after every layer wrote them)."""
        self.length += num_new_tokens


def normalize_and_copy(qkv: torch.Tensor, temperature: torch.Tensor, cache: torch.Tensor, start: int) -> torch.Tensor:
    """What `kv_cache_kernel.normalize_and_cache` does, in PyTorch operations: `normalize_queries_keys` on the
    (B, l, 3 * H, D) projection with (1, 1, H, 1) temperatures, its keys and values copied into the
    (B, max_tokens, 2, H, D) `cache` from token `start` on. Returns the (B, l, H, D) queries (a view)."""
    normalized = normalize_queries_keys(qkv, temperature).unflatten(2, (3, -1))
    cache[:, start : start + qkv.shape[1]] = normalized[:, :, 1:]
    return normalized[:, :, 0]


@functools.cache
def _triton_cache_writer() -> Callable | None:
    """`kv_cache_kernel.normalize_and_cache`, or None where Triton is not installed (imported at the first use)."""
    try:
        from .kv_cache_kernel import normalize_and_cache
    except ImportError:
        return None
    return normalize_and_cache


def fused_cache_writer(qkv: torch.Tensor) -> Callable | None:
    """The fused norm-and-write kernel for this projection, or None: it runs on CUDA and has no autograd formula."""
    if not qkv.is_cuda or (qkv.requires_grad and torch.is_grad_enabled()):
        return None
    return _triton_cache_writer()


def modulated_layer_norm(
    norm: nn.LayerNorm, hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """AdaLN: `shift + norm(hidden_states) * scale` for a LayerNorm without affine parameters; (B, L, D) with
    (B, 1, D) terms.

    The width comes from `norm` (a Python int), not from the input's shape: in blocks compiled with `dynamic=True`
    every input dimension is symbolic, and a LayerNorm over a symbolic width compiled to a looped kernel, since
    Inductor can only make a reduction of known size persistent (a LayerNorm over a symbolic width measured about
    three times slower than one whose width followed from a weight).
    """
    return torch.addcmul(shift, norm(hidden_states), scale)


def linear_gelu(projection: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """`gelu(projection(hidden_states))` as one `torch._addmm_activation` call, (..., in) -> (..., out), for a
    projection with a bias. On CUDA the GELU is the tanh approximation, applied by cuBLASLt to the float32
    accumulator before the result is rounded to the weights' dtype; on the CPU it is the exact GELU."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    activated = torch._addmm_activation(projection.bias, rows, projection.weight.t(), use_gelu=True)
    return activated.view(*hidden_states.shape[:-1], -1)


def feed_forward(ff: FeedForward | Float8FeedForward, hidden_states: torch.Tensor | QuantizedRows) -> torch.Tensor:
    """diffusers' `FeedForward` with a tanh GELU and no dropout, (..., dim) -> (..., dim).

    In CUDA inference the first projection, its bias and the GELU run as one matrix product with a GELU epilogue
    (`linear_gelu`), so the 4x-wide activations are written once instead of being written, read and written again
    by a separate GELU kernel (a large part of a compiled generation's elementwise work). Outputs in low precision
    differ from the module's by rounding. The op has no autograd formula, is not cast by autocast, and on the CPU
    applies the exact GELU, so training, autocast and CPU runs take the module.
    """
    # A float8 feed-forward fuses its GELU with its quantisation itself (checked first: `QuantizedRows` have no
    # `is_cuda`).
    float8 = isinstance(ff, Float8FeedForward)
    if float8 or torch.is_grad_enabled() or torch.is_autocast_enabled() or not hidden_states.is_cuda:
        return ff(hidden_states)
    return ff.net[2](linear_gelu(ff.net[0].proj, hidden_states))


def normalize_queries_keys(qkv: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """
    Queries to unit vectors times their head's temperature, keys to unit vectors, values unchanged.

    Args:
        qkv (`torch.Tensor` of shape `(B, L, 3 * H, D)`): The projection, heads of queries, keys, then values.
        temperature (`torch.Tensor` of shape `(1, 1, H, 1)`): Per-head factor of the queries.

    The norms are taken over every head, values included, so that the reduction and the product cover the same
    rows and `torch.compile` can fuse them into one kernel (a norm over only the query and key heads compiled into a
    reduction of its own, the largest kernel after the matrix products).
    F.normalize's eps, so the numbers are the original's; value rows are multiplied by exactly 1.
    """
    heads = temperature.shape[2]
    norms = torch.linalg.vector_norm(qkv, dim=-1, keepdim=True).clamp_min(L2_EPS)
    numerators = torch.cat((temperature, temperature.new_ones(1, 1, 2 * heads, 1)), dim=2)
    is_value = torch.arange(3 * heads, device=qkv.device).view(1, 1, -1, 1) >= 2 * heads
    factors = torch.where(is_value, 1.0, numerators / norms)
    return qkv * factors


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: AttentionMask
) -> torch.Tensor:
    """Attention of (B, l, H, D) queries over (B, L, H, D) keys and values -> (B, H, l, D). The queries already carry
    the head temperatures, so the dot products are not scaled again. `attention_mask`: a boolean tensor (True where a
    token may attend), None, or a training mask of another backend (`block_causal.training_attention_mask`)."""
    return block_causal_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)


@torch.compiler.disable
def cached_attention(
    qkv: torch.Tensor,
    temperature: torch.Tensor,
    attention_mask: AttentionMask,
    kv_cache: FlexVARKVCache,
    layer_index: int,
) -> torch.Tensor:
    """Normalise this call's (B, l, 3 * H, D) projection, append its keys and values to `kv_cache` and attend with
    its queries over everything cached: (B, H, l, D).

    Kept out of `torch.compile` graphs: the cache's length and the layer index differ per call, and a compiled block
    would be specialised (recompiled) on them; around this call a compiled block stays one graph for every scale and
    layer, with no per-scale recompilation. The query/key norm is done here, with the write (`FlexVARKVCache.update`),
    not in the compiled block: Inductor made a fused norm and write into two kernels that read the projection
    twice.
    """
    query, key, value = kv_cache.update(layer_index, qkv, temperature)
    return attention(query, key, value, attention_mask)


class FlexVARAttention(nn.Module):
    """Self-attention on L2-normalised queries and keys with a learnable per-head temperature.

    The projection has a bias for queries and values but none for keys, as in VAR.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.to_out = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor:
        """(3 * dim,) bias of the projection: the query bias, zeros for the keys, the value bias."""
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def project(self, hidden_states: torch.Tensor | QuantizedRows) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) -> the (B, L, 3 * H, D) projection (heads of queries, keys, then values) and the (1, 1, H, 1)
        query temperatures in its dtype. `QuantizedRows` (float8 inference) go to the float8 projection."""
        batch, length, _ = hidden_states.shape
        if isinstance(self.to_qkv, Float8Linear):  # its bias is `qkv_bias()`, taken when it was made
            qkv = self.to_qkv(hidden_states)
        else:
            qkv = F.linear(hidden_states, self.to_qkv.weight, self.qkv_bias())
        qkv = qkv.view(batch, length, 3 * self.num_heads, self.head_dim)
        temperature = self.log_scale.clamp_max(MAX_LOG_SCALE).exp().view(1, 1, self.num_heads, 1).to(qkv.dtype)
        return qkv, temperature

    def project_out(self, attended: torch.Tensor) -> torch.Tensor:
        """The (B, H, L, D) attention output -> (B, L, dim)."""
        batch, _, length, _ = attended.shape
        return self.to_out(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def forward(self, hidden_states: torch.Tensor, attention_mask: AttentionMask = None) -> torch.Tensor:
        """Attention over the (B, L, dim) input itself, without a cache; `attention_mask` is (L, L) boolean, True
        where a token may attend. Generation's cached attention is composed by `FlexVARBlock`."""
        qkv, temperature = self.project(hidden_states)
        query, key, value = normalize_queries_keys(qkv, temperature).unflatten(2, (3, self.num_heads)).unbind(2)
        return self.project_out(attention(query, key, value, attention_mask))


class ResidualUpdate(NamedTuple):
    """An update of the residual stream, `gate * values`: a (B, 1, dim) AdaLN-Zero gate and (B, L, dim) values laid
    out as the stream."""

    gate: torch.Tensor
    values: torch.Tensor

    def apply(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states + gate * values`."""
        return torch.addcmul(hidden_states, self.gate, self.values)


class FlexVARBlock(nn.Module):
    """Transformer block with AdaLN-Zero conditioning on the class embedding."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = FlexVARAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=round(dim * mlp_ratio), activation_fn="gelu-approximate")

    def modulation(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, dim) class embedding -> six (B, 1, dim) AdaLN-Zero terms: shift, 1 + scale and gate for attention,
        then for the feed-forward. The same computation as diffusers' `AdaLayerNormZero`, split off so that
        generation computes it once per sequence instead of once per scale."""
        terms = self.norm1.linear(self.norm1.silu(conditioning)).unsqueeze(1).chunk(6, dim=-1)
        shift_attn, scale_attn, gate_attn, shift_ff, scale_ff, gate_ff = terms
        return shift_attn, 1 + scale_attn, gate_attn, shift_ff, 1 + scale_ff, gate_ff

    def forward(
        self,
        hidden_states: torch.Tensor,
        modulation: tuple[torch.Tensor, ...] | torch.Tensor,
        attention_mask: AttentionMask = None,
        kv_cache: FlexVARKVCache | None = None,
        layer_index: int = 0,
        update: ResidualUpdate | None = None,
        drop_path_factors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ResidualUpdate]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, L, dim)`): The residual stream, without `update`.
            modulation: `self.modulation(class_embedding)`, or the (B, dim) class embedding itself, from which
                the block computes it. Teacher forcing passes the embedding, so that every use of a block's
                weights happens inside its `forward` (what FSDP, which gathers a block's sharded weights
                around that call, needs); generation passes the terms it computed once per sequence.
            update (`ResidualUpdate`, *optional*): The previous block's feed-forward update of the stream, added in
                the pass of this block's first norm.
            drop_path_factors (`torch.Tensor` of shape `(2, B)`, *optional*): Stochastic-depth factors of this
                block's attention and feed-forward updates (training); they scale the two AdaLN gates.

        Returns:
            The stream after this block's attention, and this block's feed-forward update of it, for the next block
            (or `ResidualUpdate.apply`). Deferring the update lets it join the next LayerNorm's pass: added at the
            end of the block it is a pass of its own over the stream. The sums are the same operations in the same
            order, so the numbers do not change.
        """
        if isinstance(modulation, torch.Tensor):
            modulation = self.modulation(modulation)
        if drop_path_factors is not None:
            modulation = scale_gates(modulation, drop_path_factors)
        shift_attn, scale_attn, gate_attn, shift_ff, scale_ff, gate_ff = modulation
        hidden_states, normed = self.residual_and_norm(self.norm1.norm, hidden_states, update, shift_attn, scale_attn)
        if kv_cache is None:
            attended = self.attn(normed, attention_mask)
        else:
            # Composed here, not inside `self.attn`: `torch.compile` splits a graph at a nested call that breaks
            # it, which put this LayerNorm, the projection and the output projection into three graphs (kernels
            # that could not fuse, such as float8's LayerNorm and quantisation). This way a compiled
            # block is two graphs, split only by `cached_attention`.
            qkv, temperature = self.attn.project(normed)
            attended = self.attn.project_out(cached_attention(qkv, temperature, attention_mask, kv_cache, layer_index))
        attention_update = ResidualUpdate(gate_attn, attended)
        hidden_states, normed = self.residual_and_norm(self.norm2, hidden_states, attention_update, shift_ff, scale_ff)
        return hidden_states, ResidualUpdate(gate_ff, feed_forward(self.ff, normed))

    @property
    def float8_inference(self) -> bool:
        """Whether `FlexVARTransformer2DModel.enable_float8_inference` replaced this block's linear layers."""
        return isinstance(self.attn.to_out, Float8Linear)

    def residual_and_norm(
        self,
        norm: nn.LayerNorm,
        hidden_states: torch.Tensor,
        update: ResidualUpdate | None,
        shift: torch.Tensor,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | QuantizedRows]:
        """The residual stream with `update` applied (if any) and `modulated_layer_norm(norm, ...)` of it, the input
        of a product. After `enable_float8_inference` the rows come out quantised for that product, in the same pass
        as the norm and the residual (`float8.(residual_)modulated_layer_norm_quantize_rows`): Inductor fuses the
        residual into its LayerNorm kernel, which a separate quantising norm would undo."""
        if self.float8_inference:
            if update is None:
                return hidden_states, modulated_layer_norm_quantize_rows(norm, hidden_states, shift, scale)
            return residual_modulated_layer_norm_quantize_rows(norm, hidden_states, *update, shift, scale)
        if update is not None:
            hidden_states = update.apply(hidden_states)
        return hidden_states, modulated_layer_norm(norm, hidden_states, shift, scale)


def sincos_position_grid(dim: int, size: int) -> torch.Tensor:
    """The original's initial position grid (1, dim, size, size): sin of the row on even and cos of the column on
    odd channels."""
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    coords = torch.arange(size, dtype=torch.float32)
    grid = torch.empty(size, size, dim)
    grid[..., 0::2] = torch.sin(coords[:, None, None] * frequencies)
    grid[..., 1::2] = torch.cos(coords[None, :, None] * frequencies)
    return grid.permute(2, 0, 1).unsqueeze(0).contiguous()  # FSDP shards contiguous parameters only


def scale_gates(modulation: tuple[torch.Tensor, ...], factors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A block's six AdaLN terms with its two gates (B, 1, dim) multiplied by its (2, B) stochastic-depth
    `factors` (in the gates' dtype)."""
    terms = list(modulation)
    for chunk, factor in zip(ADALN_GATE_CHUNKS, factors):
        terms[chunk] = terms[chunk] * factor.to(terms[chunk].dtype).view(-1, 1, 1)
    return tuple(terms)


class FlexVARTransformer2DModel(FlexVARModelMixin, ConfigMixin):
    r"""
    The FlexVAR transformer. It predicts the complete token map of each scale from all coarser scales, each given as
    the normalised code vectors of the previous scale's tokens resized (bicubic) to the next scale. Position
    embeddings are one learned 2D grid area-resized to every scale, so any sequence of scales of any aspect ratio
    works; there are no step embeddings.

    Args:
        num_classes (`int`, defaults to 1000): Class labels; label `num_classes` is the unconditional one.
        vocab_size (`int`, defaults to 8912): Codebook size of the tokenizer.
        code_dim (`int`, defaults to 32): Code vector size of the tokenizer.
        num_layers (`int`, defaults to 16): Depth.
        hidden_size (`int`, defaults to 1024): Width (64 * depth in the released models).
        num_attention_heads (`int`, defaults to 16): Heads (= depth in the released models).
        mlp_ratio (`float`, defaults to 4.0): Feed-forward width relative to `hidden_size`.
        pos_grid_size (`int`, defaults to 32): Side of the stored position grid.
        sample_size (`int`, defaults to 16): Side, in tokens, of the images the model was (last) trained at. Only
            the pipeline's default image size reads it: `sample_size * vae_scale_factor`, 256 for the released
            models; `examples/train.py` sets it to the training resolution.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlexVARBlock"]
    # `compile_repeated_blocks(dynamic=True)` compiles the block once for every layer and scale (regional compilation).
    _repeated_blocks = ["FlexVARBlock"]

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        vocab_size: int = 8912,
        code_dim: int = 32,
        num_layers: int = 16,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        pos_grid_size: int = 32,
        sample_size: int = 16,
    ):
        super().__init__()
        if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 1:
            raise ValueError(f"`sample_size` must be a positive int (tokens per side), got {sample_size!r}.")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_attention_heads {num_attention_heads}."
            )
        self.code_embed = nn.Linear(code_dim, hidden_size)
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size)
        self.start_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_grid = nn.Parameter(sincos_position_grid(hidden_size, pos_grid_size))
        self.blocks = nn.ModuleList(
            [FlexVARBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(hidden_size, hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(hidden_size, vocab_size)
        self.gradient_checkpointing = False
        # How teacher-forced calls (no cache, several scales) attend block-causally; see `set_training_attention`.
        self.training_attention = "sdpa"
        self.initialize_weights()

    def set_training_attention(self, backend: str) -> None:
        """
        Choose how calls without a cache (teacher forcing: training, `FlexVARPipeline`'s scoring) compute the
        block-causal attention over several scales. All give the same function; they differ in speed and where they
        run (`flexvar_hf.models.block_causal`).

        Args:
            backend (`str`): "sdpa" (default: one scaled-dot-product call with a boolean mask), "flex" (FlexAttention
                with a block mask that skips masked blocks; compiled on CUDA, eager and slow on the CPU) or
                "per_scale" (one unmasked call per scale over the prefix of the sequence it may see).
        """
        self.training_attention = check_training_attention(backend)

    @torch.no_grad()
    def initialize_weights(self, adaln_gate_gain: float = 1e-5) -> None:
        """FlexVAR's initialisation for training from scratch (VAR's `init_weights`, `init_std=-1`).

        Args:
            adaln_gate_gain (`float`, defaults to 1e-5): Factor of the AdaLN-Zero gate rows' initial weights (the
                original's `--alng`; its published commands use 1e-3 for depths 16 and 20, 1e-4 for 24). The other
                AdaLN rows get 0.5, as in the original.
        """
        dim, depth = self.config.hidden_size, self.config.num_layers
        std = math.sqrt(1 / dim / 3)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.start_token, std=std)
        self.proj_out.weight.mul_(0.02)
        self.norm_out.linear.weight.mul_(0.5)
        for block in self.blocks:
            block.attn.to_out.weight.div_(math.sqrt(2 * depth))
            block.ff.net[2].weight.div_(math.sqrt(2 * depth))
            # AdaLN-Zero rows: shift, scale, gate for attention, then for the feed-forward; gates start near zero.
            rows = block.norm1.linear.weight.view(6, dim, dim)
            for chunk in range(6):
                rows[chunk].mul_(adaln_gate_gain if chunk in ADALN_GATE_CHUNKS else 0.5)

    @property
    def float8_inference(self) -> bool:
        """Whether `enable_float8_inference` replaced the blocks' linear layers."""
        return self.blocks[0].float8_inference

    @torch.no_grad()
    def enable_float8_inference(self, fast_accumulation: bool = False) -> None:
        """
        Run the blocks' four linear layers (attention in and out, feed-forward in and out) as `Float8Linear`:
        float8 weights (replacing these layers' weights in place, which halves their memory) and activations
        quantised per row at every call. The class embedding's modulations and the output head keep their dtype.

        For large batches on GPUs with float8 matrix units (compute capability 8.9 and up), in bfloat16, with
        `pipe.enable_fast_sampling(torch_compile=True)`. On CUDA the feed-forward's inputs are quantised by the
        kernels that make them (its AdaLN and its GELU, `float8_kernel`); `torch.compile` folds the attention's
        quantisations into the kernels around them; eager, those are passes of their own. It pays at large batches
        of the larger models (d24 at batch 64, with `fast_accumulation=True`), gives nothing at d16 and makes batch 1
        slower: docs/performance.md has the current numbers.
        The products' error is about 20 times bfloat16's (the converted parity model's logits move by about 1%), so
        images differ from the unquantised model's. Call it after moving and casting the model (a later `.to(dtype)`
        would cast the float8 weights too). Irreversible for this object (load the model again to undo); a quantised
        model cannot be trained or saved.

        Args:
            fast_accumulation (`bool`, defaults to False): `torch._scaled_mm`'s faster, lower-precision
                accumulation, for products of at least `float8.FAST_ACCUMULATION_MIN_ROWS` rows.
        """
        if self.float8_inference:
            raise ValueError("Float8 inference is already enabled on this model.")
        for block in self.blocks:
            attn = block.attn
            attn.to_qkv = Float8Linear(attn.to_qkv, bias=attn.qkv_bias(), fast_accumulation=fast_accumulation)
            attn.to_out = Float8Linear(attn.to_out, fast_accumulation=fast_accumulation)
            block.ff = Float8FeedForward(block.ff, fast_accumulation=fast_accumulation)

    def save_pretrained(self, *args, **kwargs):
        """diffusers' `save_pretrained`, refused after `enable_float8_inference` (float8 layers are no saved
        format of this model)."""
        if self.float8_inference:
            raise ValueError(
                "This model's linear layers were quantised by `enable_float8_inference`, which cannot be saved or "
                "loaded; save the model before quantising it."
            )
        return super().save_pretrained(*args, **kwargs)

    def modulations(self, conditioning: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """AdaLN terms of every block, then `(1 + scale, shift)` of the head's norm (as diffusers'
        `AdaLayerNormContinuous`), for a (B, hidden) class embedding; each tensor is (B, 1, hidden)."""
        head = self.norm_out.linear(self.norm_out.silu(conditioning)).unsqueeze(1)
        scale_out, shift_out = head.chunk(2, dim=-1)
        return [block.modulation(conditioning) for block in self.blocks] + [(1 + scale_out, shift_out)]

    def position_embeddings(self, scales: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(1, sum(h*w), hidden) position embeddings: the grid area-resized to each scale, row-major."""
        return torch.cat([flatten_grid(F.interpolate(self.pos_grid, size=hw, mode="area")) for hw in scales], dim=1)

    def init_kv_cache(self, batch_size: int, max_tokens: int) -> FlexVARKVCache:
        """An empty cache for `batch_size` sequences of up to `max_tokens` tokens, in the model's dtype and device."""
        first = self.blocks[0].attn
        return FlexVARKVCache(
            len(self.blocks),
            batch_size,
            first.num_heads,
            max_tokens,
            first.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        modulations: Sequence,
        attention_mask: AttentionMask,
        kv_cache: FlexVARKVCache | None = None,
        drop_path_factors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        The residual stream (B, L, hidden) through every block: `modulations[i]` is block `i`'s class embedding or
        AdaLN terms, `drop_path_factors` (num_layers, 2, B) or None; the last block's feed-forward update is applied.
        One method so that the whole stack can be compiled as one graph (`torch.compile(model.run_blocks)`), which
        launches each layer's kernels without the per-call host work (guards, wrappers) of compiling the block alone.
        """
        update = None
        for index, block in enumerate(self.blocks):
            block_drop_path = None if drop_path_factors is None else drop_path_factors[index]
            block_inputs = (
                hidden_states, modulations[index], attention_mask, kv_cache, index, update, block_drop_path
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, update = self._gradient_checkpointing_func(block, *block_inputs)
            else:
                hidden_states, update = block(*block_inputs)
        return update.apply(hidden_states)

    def forward(
        self,
        class_labels: torch.LongTensor,
        scales: Sequence[ScaleLike],
        scale_inputs: torch.Tensor | None = None,
        kv_cache: FlexVARKVCache | None = None,
        guidance_scale: float | None = None,
        return_dict: bool = True,
        drop_path_factors: torch.Tensor | None = None,
    ) -> FlexVARTransformerOutput | tuple[torch.Tensor]:
        """
        Args:
            class_labels (`torch.LongTensor` of shape `(B,)`): Labels in [0, num_classes]; `num_classes` is the
                unconditional label. No label dropout happens here (training applies it).
            scales: The scales fed in this call (int sides or (h, w) pairs). Without a cache (teacher forcing) these
                are all scales of the sequence; with a cache, the scales that follow the cached ones.
            scale_inputs (`torch.Tensor` of shape `(B, n, code_dim)`): Code vectors of every fed scale except the
                first scale of the sequence (which takes the start token): each scale's input is the previous
                scale's code map resized bicubic to it, flattened row-major. None when only the first scale is fed.
            kv_cache (`FlexVARKVCache`, *optional*): Cache from `init_kv_cache` for incremental generation; the
                tokens of this call are appended to it.
            guidance_scale (`float`, *optional*): Classifier-free guidance `g` for a batch stacked as
                `cat([cond, uncond])`: the logits are `uncond + g * (cond - uncond)`, one row per conditional row.
                They are computed as the head of the combined features: the head is linear (and the combination's
                weights sum to 1, so its bias is kept), so this equals combining the two rows' logits up to
                rounding, while the head runs on half the rows and the combination moves hidden-size instead of
                vocabulary-size rows (a 6x smaller tensor at the released sizes). The combination is taken in
                float32 and rounded once to the head's dtype; in bfloat16 that is closer to exact than combining
                logits that were each rounded and then amplified by `g`. None: logits of every row.
            drop_path_factors (`torch.Tensor` of shape `(num_layers, 2, B)`, *optional*): Stochastic depth in
                training: factors of every block's attention and feed-forward updates of the residual stream, per
                sample (0 for a dropped update, 1 / keep probability for a kept one;
                `flexvar_hf.training.flexvar_loss.drop_path_factors`). They scale the AdaLN gates, which is the
                original's `DropPath` on the gated update. Only without a cache. None: no stochastic depth.

        Returns:
            `FlexVARTransformerOutput` with `logits` of shape `(B, tokens of the fed scales, vocab_size)`, or
            `(B / 2, ...)` with `guidance_scale`.
        """
        scales = as_hw_list(scales)
        num_cached = 0 if kv_cache is None else kv_cache.length
        starts_sequence = num_cached == 0
        conditioning = self.class_embed(class_labels)
        batch = conditioning.shape[0]
        expected = num_tokens(scales) - (scales[0][0] * scales[0][1] if starts_sequence else 0)
        if expected and (scale_inputs is None or scale_inputs.shape[:2] != (batch, expected)):
            got = None if scale_inputs is None else tuple(scale_inputs.shape)
            raise ValueError(
                f"`scale_inputs` must have shape ({batch}, {expected}, code_dim) for these scales, got {got}."
            )

        pieces = []
        if starts_sequence:
            first_tokens = scales[0][0] * scales[0][1]
            pieces.append((conditioning[:, None] + self.start_token).expand(batch, first_tokens, -1))
        if expected:
            pieces.append(self.code_embed(scale_inputs.to(self.code_embed.weight.dtype)))
        hidden_states = torch.cat(pieces, dim=1) + self.position_embeddings(scales)
        if drop_path_factors is not None:
            if kv_cache is not None:
                raise ValueError("`drop_path_factors` (stochastic depth) is for training only: pass no `kv_cache`.")
            if tuple(drop_path_factors.shape) != (len(self.blocks), 2, batch):
                raise ValueError(
                    f"`drop_path_factors` must have shape (num_layers, 2, batch) = ({len(self.blocks)}, 2, {batch}), "
                    f"got {tuple(drop_path_factors.shape)}."
                )
        if kv_cache is None:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            attention_mask = training_attention_mask(
                scales, self.training_attention, hidden_states.device, head_dim, attention_dtype(hidden_states)
            )
        else:
            attention_mask = block_causal_mask(scales, num_cached, hidden_states.device)

        if kv_cache is None:
            # Teacher forcing: every module computes its AdaLN terms from the embedding inside its own forward, so
            # that FSDP (which gathers a module's sharded weights around its forward) can wrap the blocks and the
            # head's norm. Generation computes them once per sequence and keeps them in the cache.
            modulations = [conditioning] * len(self.blocks)
        else:
            if kv_cache.modulations is None:
                kv_cache.modulations = self.modulations(conditioning)
            modulations = kv_cache.modulations

        hidden_states = self.run_blocks(hidden_states, modulations, attention_mask, kv_cache, drop_path_factors)
        if kv_cache is not None:
            kv_cache.advance(hidden_states.shape[1])

        if kv_cache is None:
            normed = self.norm_out(hidden_states, conditioning)
        else:
            scale_out, shift_out = modulations[-1]
            normed = modulated_layer_norm(self.norm_out.norm, hidden_states, shift_out, scale_out)
        if guidance_scale is not None:
            normed = combine_guidance(normed, guidance_scale).to(normed.dtype)
        logits = self.proj_out(normed)
        if not return_dict:
            return (logits,)
        return FlexVARTransformerOutput(logits=logits)
