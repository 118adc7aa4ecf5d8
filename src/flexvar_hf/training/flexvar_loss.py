"""The FlexVAR training objective: teacher-forcing inputs from the frozen VQ model, class-label dropout, the loss.

One training step (as the original trainer):

1. draw scales for the batch (`FlexVARScaleScheduler.sample_training_scales`);
2. `build_teacher_inputs`: encode the images once, quantise the latent at every scale (area-resized), and feed each
   scale but the last as its normalised code vectors resized bicubic to the next scale (exactly what
   `FlexVARPipeline.next_scale_inputs` feeds at generation time); the targets are every scale's token indices.
   Optionally (`input_token_noise`, not in the original) some input tokens are first replaced by those of other
   images at the same position (`mix_tokens_across_images`) while the targets stay true;
3. `drop_class_labels`: replace labels by the unconditional label `num_classes` with probability 0.1, which trains
   the unconditional branch of classifier-free guidance; `drop_path_factors`: the original's stochastic depth;
4. `transformer(labels, scales, teacher.scale_inputs, drop_path_factors=...).logits` and `flexvar_loss`:
   cross-entropy over all tokens of all scales, averaged per token (or with `scale_token_weights`, coarse scales
   weighted up), optionally label-smoothed; `token_accuracy` for logging.

`training_loss` does 2-4 for one batch (what `examples/train.py` and `benchmarks/bench_train.py` run per step); the
backward pass, clipping and the optimizer step follow (`flexvar_hf.training.optim.clip_and_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..scales import ScaleLike, as_hw_list, flatten_grid, resize_codes
from ..utils.transfer import to_device
from .cross_entropy import row_cross_entropy

__all__ = [
    "TeacherForcingBatch",
    "TrainingLoss",
    "build_teacher_inputs",
    "drop_class_labels",
    "drop_path_factors",
    "drop_path_rates",
    "flexvar_loss",
    "mix_tokens_across_images",
    "scale_token_weights",
    "token_accuracy",
    "training_loss",
]


@dataclass
class TeacherForcingBatch:
    """
    Attributes:
        scale_inputs (`torch.Tensor` of shape `(B, L - h_0 * w_0, code_dim)`): Transformer inputs for every scale but
            the first: the previous scale's code vectors resized bicubic to it, row-major, scales concatenated. None
            for a single scale.
        targets (`torch.LongTensor` of shape `(B, L)`): Token indices of every scale, row-major, concatenated.
        scales (`list[tuple[int, int]]`): The scales, coarse to fine.
    """

    scale_inputs: torch.Tensor | None
    targets: torch.LongTensor
    scales: list[tuple[int, int]]

    @property
    def last_scale_tokens(self) -> int:
        """Tokens of the final scale (the tail of `targets`)."""
        height, width = self.scales[-1]
        return height * width


def _draw_device(like: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where to make random draws for `like`: on `generator`'s device when one is given, so that a CPU generator gives
    the same draws whatever device the data is on (the draws are then moved to `like`'s device)."""
    return generator.device if generator is not None else like.device


def mix_tokens_across_images(
    indices: torch.LongTensor, prob: float, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """
    Replace each token of `indices` (B, ...) with probability `prob` in [0, 1] by the token at the same position of
    another image of the batch (drawn uniformly from the other B - 1; B >= 2). The draws come from `generator` when
    given (on its device). Returns a new tensor.

    Every replaced token is a likely one for its position, but the tokens of a scale no longer come from one image:
    what independent per-token sampling produces where the model's distribution for each position is broad.
    """
    if not 0 <= prob <= 1:
        raise ValueError(f"`prob` must be in [0, 1], got {prob!r}.")
    batch = indices.shape[0]
    if batch < 2:
        raise ValueError(f"Mixing tokens across images needs a batch of at least 2 images, got {batch}.")
    if prob == 0:
        return indices.clone()
    device = _draw_device(indices, generator)
    replace = to_device(torch.rand(indices.shape, generator=generator, device=device) < prob, indices.device)
    offsets = to_device(torch.randint(1, batch, indices.shape, generator=generator, device=device), indices.device)
    own = torch.arange(batch, device=indices.device).view(-1, *[1] * (indices.ndim - 1))
    donors = indices.gather(0, (own + offsets) % batch)
    return torch.where(replace, donors, indices)


@torch.no_grad()
def build_teacher_inputs(
    vqvae,
    scales: Sequence[ScaleLike],
    pixels: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    input_token_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> TeacherForcingBatch:
    """
    Token targets and teacher-forcing inputs of a batch at the given scales, from a frozen `FlexVQModel`.

    Pass `pixels` (B, 3, H, W) in [-1, 1] (encoded in the VQ model's dtype) or already encoded `latents`. The
    latents are quantised at every scale in float32 (`quantize_multiscale`), so the tokens do not depend on a reduced
    precision encoder dtype beyond the encoder itself; code vectors are the normalised codebook rows
    (`indices_to_codes`) and scale `i`'s input is scale `i - 1`'s code map resized bicubic to scale `i`.

    `input_token_noise` > 0 (not in the original) replaces that fraction of the tokens fed as inputs by the tokens of
    other images of the batch at the same positions (`mix_tokens_across_images`, drawing from `generator`); the
    targets stay the true tokens. At generation time every scale is fed the model's own draws, made independently
    per token, which need not fit together where each position's distribution is broad (the coarse scales); trained
    this way the model learns to correct such inputs instead of building on them.

    Returns:
        `TeacherForcingBatch` with `scale_inputs` in float32.
    """
    scales = as_hw_list(scales)
    if (pixels is None) == (latents is None):
        raise ValueError("Pass exactly one of `pixels` and `latents`.")
    if latents is None:
        encoder_dtype = vqvae.encoder.conv_in.weight.dtype
        latents = vqvae.encode(pixels.to(encoder_dtype)).latents
    latents = latents.float()
    indices = vqvae.quantize_multiscale(latents, scales)
    input_indices = indices[:-1]
    if input_token_noise:
        input_indices = [mix_tokens_across_images(grid, input_token_noise, generator) for grid in input_indices]
    scale_inputs = None
    if input_indices:
        # One codebook lookup for all scales (a gather: the same numbers as one per scale, in fewer kernel launches).
        codes = vqvae.indices_to_codes(torch.cat([grid.flatten(1) for grid in input_indices], dim=1)[:, None]).float()
        lengths = [grid[0].numel() for grid in input_indices]
        inputs = [
            flatten_grid(resize_codes(scale_codes.unflatten(-1, grid.shape[1:]), next_scale))
            for scale_codes, grid, next_scale in zip(codes[:, :, 0].split(lengths, dim=-1), input_indices, scales[1:])
        ]
        scale_inputs = torch.cat(inputs, dim=1)
    targets = torch.cat([scale_indices.flatten(1) for scale_indices in indices], dim=1)
    return TeacherForcingBatch(scale_inputs=scale_inputs, targets=targets, scales=scales)


def drop_class_labels(
    labels: torch.LongTensor,
    num_classes: int,
    dropout_prob: float,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Replace each label by the unconditional label `num_classes` with probability `dropout_prob`.

    The uniform draws come from `generator` when given (on the generator's device, then moved to the labels'), so a
    CPU generator gives the same dropout on any device. Returns a new tensor; `dropout_prob` 0 returns a copy.
    """
    if not 0 <= dropout_prob <= 1:
        raise ValueError(f"`dropout_prob` must be in [0, 1], got {dropout_prob}.")
    if dropout_prob == 0:
        return labels.clone()
    draw = torch.rand(labels.shape, generator=generator, device=_draw_device(labels, generator))
    draw = to_device(draw, labels.device)
    return torch.where(draw < dropout_prob, torch.full_like(labels, num_classes), labels)


def drop_path_rates(num_layers: int, drop_path_rate: float) -> torch.Tensor:
    """(num_layers,) float64 stochastic-depth rates: linearly from 0 at the first block to `drop_path_rate` at the
    last, the original's rule (its published models use `0.1 * depth / 24`)."""
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"`drop_path_rate` must be in [0, 1), got {drop_path_rate!r}.")
    return torch.linspace(0, drop_path_rate, num_layers, dtype=torch.float64)


def drop_path_factors(
    num_layers: int,
    batch_size: int,
    drop_path_rate: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """
    Stochastic depth as the original's `DropPath` (timm's, `scale_by_keep=True`): for every block, its attention and
    its feed-forward update of each sample are dropped independently with the block's rate `p`
    (`drop_path_rates`) and kept updates are scaled by `1 / (1 - p)`.

    Returns (num_layers, 2, batch_size) float32 factors on `device` (0 or `1 / (1 - p)`; exactly 1 where `p` is 0),
    for `FlexVARTransformer2DModel.forward(drop_path_factors=...)`, or None when `drop_path_rate` is 0. The uniform
    draws come from `generator` when given (on its device), so a CPU generator gives the same factors on any device.
    """
    rates = drop_path_rates(num_layers, drop_path_rate)
    if drop_path_rate == 0:
        return None
    draw_device = generator.device if generator is not None else device
    draws = torch.rand(num_layers, 2, batch_size, generator=generator, device=draw_device, dtype=torch.float64)
    keep = 1 - rates.to(draws.device).view(-1, 1, 1)
    return to_device(torch.where(draws < keep, 1 / keep, 0.0).float(), device)


def scale_token_weights(scales: Sequence[ScaleLike], power: float) -> torch.Tensor:
    """
    Per-token loss weights (L,) for `scales`, row-major and concatenated like the targets: each token of a scale of
    `n` tokens gets `n ** -power`, normalised to a mean of 1 over the L tokens.

    `power` 0 weights every token alike (the original's per-token mean); 1 gives every scale the same total weight,
    so the 1x1 scale counts as much as the last one; values between move weight from the fine to the coarse scales.
    """
    if not power >= 0:
        raise ValueError(f"`power` must be a number >= 0, got {power!r}.")
    sizes = [height * width for height, width in as_hw_list(scales)]
    weights = torch.cat([torch.full((size,), float(size) ** -power) for size in sizes])
    return weights / weights.mean()


def flexvar_loss(
    logits: torch.Tensor,
    targets: torch.LongTensor,
    label_smoothing: float = 0.0,
    token_weights: torch.Tensor | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Cross-entropy of `logits` (B, L, V) against `targets` (B, L), in float32, averaged over all B * L tokens.

    The mean over every token of every scale is what the original computes (a 1/L weight per token, then the mean
    over the batch). `token_weights` (L,) with mean 1 (`scale_token_weights`) weights the tokens' terms instead. With
    `label_smoothing` eps the target distribution is `(1 - eps) * onehot + eps / V`, so the minimum of the loss is
    that distribution's entropy, not 0. `compiled`: the cross-entropy through `torch.compile`
    (`row_cross_entropy(compiled=True)`), the same numbers to float32 rounding.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `targets` {tuple(targets.shape)} do not match.")
    if token_weights is not None and token_weights.shape != targets.shape[1:]:
        raise ValueError(f"`token_weights` must have shape ({targets.shape[1]},), got {tuple(token_weights.shape)}.")
    # `row_cross_entropy` is `F.cross_entropy(logits.float(), ..., reduction="none")` without float32 copies of the
    # logits kept for the backward pass, which is when a training step's memory peaks.
    loss = row_cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing, compiled)
    if token_weights is None:
        return loss.mean()
    return (loss.view_as(targets) * to_device(token_weights, loss.device)).mean()


@torch.no_grad()
def token_accuracy(
    logits: torch.Tensor, targets: torch.LongTensor, last_scale_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of tokens whose argmax is the target: over all tokens, and over the last `last_scale_tokens` (the
    final scale). Returns two 0-d float32 tensors in [0, 1]."""
    correct = (logits.argmax(dim=-1) == targets).float()
    return correct.mean(), correct[:, -last_scale_tokens:].mean()


def _unwrap(model):
    """The model inside DDP / accelerate / `torch.compile` wrappers (which keep it as `.module` or `._orig_mod`)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@dataclass
class TrainingLoss:
    """
    Attributes:
        loss (`torch.Tensor`): 0-d float32 loss of the batch (`flexvar_loss`), attached to the graph.
        logits (`torch.Tensor` of shape `(B, L, vocab_size)`): The transformer's logits.
        teacher (`TeacherForcingBatch`): Targets, teacher-forcing inputs and scales of the batch.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    teacher: TeacherForcingBatch


def training_loss(
    transformer,
    vqvae,
    scales: Sequence[ScaleLike],
    pixels: torch.Tensor | None,
    labels: torch.LongTensor,
    num_classes: int,
    class_dropout_prob: float = 0.1,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    scale_weight_power: float = 0.0,
    input_token_noise: float = 0.0,
    latents: torch.Tensor | None = None,
    drop_path_rate: float = 0.0,
    compile_loss: bool = False,
) -> TrainingLoss:
    """
    The forward half of one training step: tokenise `pixels` (or already encoded `latents`, e.g. from a
    `LatentCache`) at `scales` with the frozen `vqvae` (`build_teacher_inputs`, with `input_token_noise`), drop
    `labels` to the unconditional label `num_classes` with probability `class_dropout_prob` (`drop_class_labels`),
    draw stochastic depth with `drop_path_rate` (`drop_path_factors`; all three draw from `generator`, in this
    order), run `transformer` with teacher forcing and take `flexvar_loss`, with
    `scale_token_weights(scales, scale_weight_power)` unless the power is 0 (compiled with `compile_loss`, as
    train.py's `--torch_compile` does).

    `transformer` may be wrapped (DDP, an accelerate-prepared module): it is only called. Call `.backward()` on the
    returned loss (or `accelerator.backward`), then step the optimizer.
    """
    teacher = build_teacher_inputs(
        vqvae, scales, pixels=pixels, latents=latents, input_token_noise=input_token_noise, generator=generator
    )
    class_labels = drop_class_labels(labels, num_classes, class_dropout_prob, generator=generator)
    factors = None
    if drop_path_rate:
        num_layers = _unwrap(transformer).config.num_layers
        factors = drop_path_factors(num_layers, labels.shape[0], drop_path_rate, generator, labels.device)
    logits = transformer(class_labels, teacher.scales, teacher.scale_inputs, drop_path_factors=factors).logits
    weights = scale_token_weights(teacher.scales, scale_weight_power) if scale_weight_power else None
    loss = flexvar_loss(logits, teacher.targets, label_smoothing, weights, compiled=compile_loss)
    return TrainingLoss(loss=loss, logits=logits, teacher=teacher)
