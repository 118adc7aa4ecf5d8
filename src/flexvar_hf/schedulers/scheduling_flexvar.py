"""Scale scheduler for FlexVAR: scale schedules, classifier-free guidance schedules and token sampling.

FlexVAR (arXiv 2502.20313) generates an image as a sequence of token grids ("scales"), coarse to fine; each step
predicts every token of one scale. This scheduler takes the place of a noise scheduler: `set_timesteps` picks the
scales, and `step` turns the transformer's logits for the current scale into token indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..guidance import combine_guidance
from ..scales import as_hw, num_tokens, round_half_up_ratio
from ..utils.validation import check_agreement, check_choice, check_int, check_number, is_int

GUIDANCE_SCHEDULES = ("linear", "constant")

# Long-side schedules published with FlexVAR, keyed by (final side in tokens, number of steps).
PUBLISHED_SCHEDULES: dict[tuple[int, int], tuple[int, ...]] = {
    (16, 10): (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    (16, 13): (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16),
    (32, 15): (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32),
}

# The original trainer's random schedule at side 16: [1, 2] + 5 sides from 3..10 + 2 from 11..15 + [16].
TRAINING_PREFIX = (1, 2)
TRAINING_NUM_LOW, TRAINING_NUM_HIGH = 5, 2
TRAINING_SPLIT = (10, 16)  # low sides end at 10/16 of the final side
TRAINING_FIXED_PROB = 0.05  # probability of the default schedule instead of a random one
TRAINING_DROP_THRESHOLDS = (0.9, 0.95, 0.98, 0.99)  # one inner scale dropped per threshold a uniform draw exceeds
TRAINING_CAP_WINDOW = 4  # over the token cap, drop one of the last four scales until under it


def check_guidance_schedule(guidance_schedule: str | None, allow_none: bool = False) -> None:
    """Raise ValueError unless `guidance_schedule` is one of `GUIDANCE_SCHEDULES` (or None, with `allow_none`)."""
    check_choice("guidance_schedule", guidance_schedule, GUIDANCE_SCHEDULES + ((None,) if allow_none else ()))


@dataclass
class FlexVARSchedulerOutput(BaseOutput):
    """
    Output of [`FlexVARScaleScheduler.step`].

    Args:
        indices (`torch.LongTensor` of shape `(batch_size, height, width)`):
            Token indices chosen for the current scale, in `[0, vocab_size)`.
    """

    indices: torch.LongTensor


def _ratio_progression(num_steps: int, ratio: float) -> list[int]:
    """Sides `s_0 = 1`, `s_{i+1} = max(s_i + 1, round(s_i * ratio))`: dense while `ratio * s < s + 1`."""
    sides = [1]
    for _ in range(num_steps - 1):
        sides.append(max(sides[-1] + 1, math.floor(sides[-1] * ratio + 0.5)))
    return sides


def progressive_sides(num_steps: int, final_side: int) -> list[int]:
    """
    `num_steps` strictly increasing sides from 1 to `final_side` (both in tokens, `1 <= num_steps <= final_side`).

    The sides follow `s_{i+1} = max(s_i + 1, round(r * s_i))` from `s_0 = 1` with the smallest ratio `r` that reaches
    `final_side` in `num_steps` steps: every side while `r * s < s + 1`, then geometric. The last side is set to
    `final_side` and earlier ones lowered where needed to keep them distinct. At side 16 this gives the published
    10- and 13-step schedules, e.g. `progressive_sides(10, 16) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]`.
    """
    if num_steps == 1:
        return [final_side]
    low, high = 1.0, float(final_side)  # ratio 1 gives 1..num_steps (too short), ratio final_side overshoots
    for _ in range(64):
        middle = (low + high) / 2
        if _ratio_progression(num_steps, middle)[-1] >= final_side:
            high = middle
        else:
            low = middle
    sides = _ratio_progression(num_steps, high)
    sides[-1] = final_side
    for i in range(num_steps - 2, -1, -1):
        sides[i] = min(sides[i], sides[i + 1] - 1)
    return sides


def default_num_steps(final_side: int) -> int:
    """
    Default number of scales for a final long side (in tokens), growing with `log2(final_side)`.

    Every side up to 4; `4 + 3 * log2(side / 4)` up to 16 (10 steps at 16); `10 + 5 * log2(side / 16)` beyond
    (15 at 32, 20 at 64); rounded, within `[1, final_side]`. E.g. 1, 2, 3, 4, 5, 6, 6, 7 steps for sides 1 to 8.
    """
    if final_side <= 4:
        steps = final_side
    elif final_side <= 16:
        steps = 4 + 3 * math.log2(final_side / 4)
    else:
        steps = 10 + 5 * math.log2(final_side / 16)
    return min(max(math.floor(steps + 0.5), 1), final_side)


def top_k_top_p_candidates(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The tokens that top-k and then top-p keep, with their probabilities.

    Top-k runs first (0 or >= vocabulary: off), so top-p sorts only the `k` kept logits, which `topk` already
    returns sorted. Top-p (`top_p` in (0, 1), else off) is the original FlexVAR rule over the kept tokens: with the
    tokens sorted by descending logit, a token is kept while the probability of the tokens before it is `< top_p`,
    so the best token is always kept (equivalently, the original removes a token when the inclusive cumulative
    probability in ascending order is `<= 1 - top_p`). Of tokens tied at the k-th logit, `topk` keeps as many as fit.

    Args:
        logits (`torch.Tensor` of shape `(..., vocab_size)`): Float logits.

    Returns:
        `(probs, token_ids)`, both `(..., k)`: the probabilities of the kept tokens after `temperature` (softmax over
        the top-k, then zero where top-p removes a token, not renormalised: a sample is proportional to them) and
        the token ids they belong to.
    """
    vocab_size = logits.shape[-1]
    num_kept = vocab_size if top_k <= 0 else min(top_k, vocab_size)
    values, token_ids = logits.topk(num_kept, dim=-1)
    probs = (values / temperature).softmax(dim=-1)
    if 0 < top_p < 1:
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return probs, token_ids


GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def check_generator(generator: GeneratorLike, batch_size: int | None = None) -> None:
    """
    Raise unless `generator` is None, one `torch.Generator`, or a list of `batch_size` of them (one per image, the
    diffusers convention): TypeError for anything else or a list holding a non-generator, ValueError for a list of
    another length. `batch_size` None checks the types alone (before the batch size is known).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(
            f"`generator` must be None, a torch.Generator or a list of them (one per image), got "
            f"{type(generator).__name__}."
        )
    wrong = sorted({type(item).__name__ for item in generator if not isinstance(item, torch.Generator)})
    if wrong:
        raise TypeError(f"A `generator` list must hold only torch.Generator objects, got {', '.join(wrong)}.")
    if batch_size is not None and len(generator) != batch_size:
        raise ValueError(
            f"A `generator` list needs one generator per image: {batch_size} (class labels times "
            f"num_images_per_prompt), got {len(generator)}."
        )


def exponential_noise(
    shape: Sequence[int],
    generator: GeneratorLike,
    device: torch.device | str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exp(1) float32 noise of `shape` on `device`, drawn on the generator's device (so a CPU generator gives the
    same numbers whatever the device). With `out` (float32, `shape`, on `device`) the noise is written there, drawn
    in place when the generator is on that device.

    A list of generators (`check_generator`: one per row of the first dimension) draws row `i` from `generator[i]`
    alone, as `shape[1:]` noise: the numbers an image drawn alone with that generator gets, whatever else is in the
    batch."""
    if isinstance(generator, (list, tuple)):
        check_generator(generator, shape[0])
        if out is None:
            out = torch.empty(tuple(shape), device=device)
        for row, row_generator in zip(out, generator):
            exponential_noise(row.shape, row_generator, device, out=row)
        return out
    device = torch.device(device)
    source = generator.device if generator is not None else device
    if out is not None and source == out.device:
        return out.exponential_(generator=generator)
    noise = torch.empty(tuple(shape), device=source).exponential_(generator=generator).to(device)
    return noise if out is None else out.copy_(noise)


class FlexVARScaleScheduler(SchedulerMixin, ConfigMixin):
    """
    Scheduler for FlexVAR scale-wise autoregressive generation; replaces a noise scheduler.

    It owns the scale schedule (`set_timesteps`), the classifier-free guidance schedule (`guidance_scale_at`), token
    sampling from logits (`step`) and the training-time random schedule (`sample_training_scales`). A scale is the
    `(height, width)` of a token grid; a timestep is the index of a scale in `self.scales`.

    Args:
        vae_scale_factor (`int`, defaults to 16): Pixels per token along each side.
        trained_sides (`tuple[int, ...]`): Sides at which the original samples; see `greedy_untrained_scales`.
        max_sampled_side (`int`, defaults to 16): Largest side sampled from; above it the original takes the best
            token, and the "linear" guidance schedule uses the full guidance scale.
        greedy_untrained_scales (`bool`, defaults to True): The original's policy: at a scale with a side above
            `max_sampled_side` or a side not in `trained_sides`, take the most likely token (argmax) instead of
            sampling, whatever `top_k`/`top_p`/`temperature` say. False samples at every scale.
        guidance_ramp_steps (`int`, defaults to 9): Steps over which the "linear" guidance schedule ramps to the full
            guidance scale (the original's `min(n - 1, 9)`).
        train_side (`int`, defaults to 16): Final side, in tokens, of the training schedule.
        train_max_tokens (`int`, defaults to 680): Token budget of a training schedule at `train_side`; scaled with the
            final area for other sizes.
        guidance_schedule (`str`, defaults to "linear"): The model's guidance schedule, used wherever a call passes
            `guidance_schedule=None` (the pipelines' default): "linear", the paper's, or "constant"; see
            `guidance_scale_at`.
        max_tokens_per_image (`int`, defaults to 32768): Size budget of an inference schedule: the tokens of one
            image over all its scales. Each scale's tokens stay in the key/value cache and every later scale attends
            to them, so memory and time grow with this count; `set_timesteps` (and `token_grid`, for the final grid
            alone) refuses larger schedules at once instead of running out of memory or for hours. The default
            admits 1024x1024 pixels at 16 per token with up to about 30 steps (the default 20: 15155 tokens) and
            refuses 2048x2048 (59412 tokens with its default 25 steps). Raise it for larger images:
            `FlexVARScaleScheduler.from_config(pipe.scheduler.config, max_tokens_per_image=...)`.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        vae_scale_factor: int = 16,
        trained_sides: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32),
        max_sampled_side: int = 16,
        greedy_untrained_scales: bool = True,
        guidance_ramp_steps: int = 9,
        train_side: int = 16,
        train_max_tokens: int = 680,
        guidance_schedule: str = "linear",
        max_tokens_per_image: int = 32768,
    ):
        for name, value in (
            ("vae_scale_factor", vae_scale_factor),
            ("max_sampled_side", max_sampled_side),
            ("guidance_ramp_steps", guidance_ramp_steps),
            ("train_side", train_side),
            ("train_max_tokens", train_max_tokens),
            ("max_tokens_per_image", max_tokens_per_image),
        ):
            check_int(name, value, minimum=1)
        if not all(is_int(side) and side > 0 for side in trained_sides):
            raise ValueError(f"`trained_sides` must be positive ints, got {trained_sides!r}.")
        check_guidance_schedule(guidance_schedule)
        self.scales: list[tuple[int, int]] | None = None
        self.timesteps: torch.LongTensor | None = None
        self.num_inference_steps: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Scale schedules

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Image size in pixels -> final token grid `(height, width) // vae_scale_factor`; checks the size, and that
        the final grid alone fits `max_tokens_per_image`."""
        factor = self.config.vae_scale_factor
        if not (is_int(height) and is_int(width) and height > 0 and width > 0) or height % factor or width % factor:
            raise ValueError(
                f"`height` and `width` must each be a positive multiple of {factor} (pixels per token), "
                f"got {height!r}x{width!r}."
            )
        grid = (int(height) // factor, int(width) // factor)
        self.check_token_budget([grid])
        return grid

    def check_token_budget(self, scales: Sequence[tuple[int, int]]) -> None:
        """ValueError, saying why, when `scales` hold more tokens per image than `max_tokens_per_image`."""
        budget = self.config.max_tokens_per_image
        tokens = num_tokens(scales)
        if tokens > budget:
            factor = self.config.vae_scale_factor
            height, width = scales[-1]
            counted = f"its {len(scales)} scales hold" if len(scales) > 1 else "its final token grid alone holds"
            raise ValueError(
                f"An image of {height * factor}x{width * factor} pixels ({height}x{width} tokens): {counted} "
                f"{tokens} tokens, more than the scheduler's size budget `max_tokens_per_image` = {budget}: "
                "every scale's tokens stay in the key/value cache and every later scale attends to them, "
                "so memory and time grow with this count. Pass a smaller `height` / `width` (or fewer "
                "`num_inference_steps`), or raise the budget with `pipe.scheduler = FlexVARScaleScheduler.from_config("
                "pipe.scheduler.config, max_tokens_per_image=...)`."
            )

    @staticmethod
    def long_sides_to_scales(long_sides: Sequence[int], grid: tuple[int, int]) -> list[tuple[int, int]]:
        """
        Map long-side values to `(h, w)` scales with the aspect ratio of the final `grid`.

        The short side is `max(1, round(long * short_final / long_final))` (halves rounded up); a long side equal to
        the final one gives `grid` exactly.
        """
        grid_h, grid_w = grid
        long_final, short_final = max(grid), min(grid)
        scales = []
        for long_side in long_sides:
            short_side = max(1, round_half_up_ratio(long_side * short_final, long_final))
            scales.append((long_side, short_side) if grid_h >= grid_w else (short_side, long_side))
        return scales

    def get_long_sides(self, num_inference_steps: int | None, final_side: int) -> list[int]:
        """
        Long sides (tokens) of an `num_inference_steps`-step schedule ending at `final_side`.

        A published schedule where one exists (10 or 13 steps at 16, 15 at 32), else `progressive_sides`. None picks
        10 steps at 16, 15 at 32 and `default_num_steps` elsewhere.
        """
        if num_inference_steps is None:
            num_inference_steps = default_num_steps(final_side)
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1, hint=" or None")
        if num_inference_steps > final_side:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} is more steps than distinct scales: the maximum is "
                f"{final_side} steps for a long side of {final_side} tokens."
            )
        published = PUBLISHED_SCHEDULES.get((final_side, num_inference_steps))
        if published is not None:
            return list(published)
        return progressive_sides(num_inference_steps, final_side)

    def get_scales(self, num_inference_steps: int | None, height: int, width: int) -> list[tuple[int, int]]:
        """
        Scales `[(h, w), ...]` of an inference schedule for an image of `height` x `width` pixels.

        The schedule is planned on the long side (`get_long_sides`) and the short side follows the aspect ratio
        (`long_sides_to_scales`); scales are distinct, non-decreasing and end at `(height, width) // 16`.

        Args:
            num_inference_steps (`int`, *optional*): Number of scales, in `[1, long side in tokens]`; None picks the
                published or default count.
            height (`int`), width (`int`): Image size in pixels, positive multiples of `vae_scale_factor` (16).
        """
        grid = self.token_grid(height, width)
        return self.long_sides_to_scales(self.get_long_sides(num_inference_steps, max(grid)), grid)

    @staticmethod
    def check_scales(scales: Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
        """
        Normalise explicit scales to `[(h, w), ...]`.

        Accepts a non-empty list of positive int sides (square) or `(h, w)` pairs of positive ints, with each side
        non-decreasing and no two consecutive scales equal; raises ValueError otherwise.
        """
        accepted = (
            "`scales` must be a non-empty list of positive int sides or (h, w) pairs, each side non-decreasing and "
            "no two consecutive scales equal"
        )
        if isinstance(scales, (torch.Tensor, np.ndarray)):
            scales = scales.tolist()
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(f"{accepted}; got {scales!r}.")
        normalised = []
        for scale in scales:
            try:
                normalised.append(as_hw(scale))
            except ValueError:
                raise ValueError(f"{accepted}; got scale {scale!r}.") from None
        for previous, current in zip(normalised, normalised[1:]):
            if current[0] < previous[0] or current[1] < previous[1] or current == previous:
                raise ValueError(f"{accepted}; got {previous} followed by {current}.")
        return normalised

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scales: Sequence[int | Sequence[int]] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """
        Set the scales to generate (`self.scales`) and `self.timesteps = arange(n)`, the step indices.

        Args:
            num_inference_steps (`int`, *optional*): Number of scales; None picks the default for the size.
            height (`int`, *optional*), width (`int`, *optional*): Image size in pixels, positive multiples of
                `vae_scale_factor`; 256 each when left out (and no `scales` are given).
            scales (`list`, *optional*): Explicit scales (int sides or `(h, w)` token-grid pairs, see `check_scales`).
                They set the number of steps and the image size (the last scale times `vae_scale_factor`), so
                `num_inference_steps`, `height` and `width` must then be left out or agree with them (ValueError
                otherwise).
            device (`str` or `torch.device`, *optional*): Device of `self.timesteps`.

        Raises ValueError for a schedule over the size budget `max_tokens_per_image`.
        """
        if scales is None:
            height, width = (256 if side is None else side for side in (height, width))
            scales = self.get_scales(num_inference_steps, height, width)
        else:
            scales = self.check_scales(scales)
            factor = self.config.vae_scale_factor
            implied = {"height": scales[-1][0] * factor, "width": scales[-1][1] * factor}
            check_agreement("scales", implied | {"num_inference_steps": len(scales)},
                            {"height": height, "width": width, "num_inference_steps": num_inference_steps})
        self.check_token_budget(scales)
        self.scales = scales
        self.num_inference_steps = len(self.scales)
        self.timesteps = torch.arange(self.num_inference_steps, dtype=torch.long, device=device)

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        if self.scales is None:
            raise ValueError("No scales set: call `set_timesteps` before `step` or `guidance_scale_at`.")
        if isinstance(timestep, torch.Tensor):
            timestep = int(timestep)  # pass the int step index to avoid a device sync
        if not is_int(timestep) or not 0 <= timestep < len(self.scales):
            raise ValueError(f"`timestep` must be a step index in [0, {len(self.scales)}), got {timestep!r}.")
        return int(timestep)

    # ------------------------------------------------------------------------------------------------------------
    # Guidance

    @staticmethod
    def check_sampling_args(
        guidance_scale: float = 1.0,
        guidance_schedule: str | None = None,
        top_k: int = 0,
        top_p: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        """Raise ValueError unless `guidance_scale >= 0`, the schedule is known (or None: the config's),
        `top_k >= 0`, `top_p` in [0, 1] and `temperature > 0`."""
        check_number("guidance_scale", guidance_scale, minimum=0, hint=" (1 disables guidance)")
        check_guidance_schedule(guidance_schedule, allow_none=True)
        check_int("top_k", top_k, minimum=0, hint=" (0 disables it)")
        check_number("top_p", top_p, 0, 1, hint=" (0 or 1 disables it)")
        check_number("temperature", temperature, minimum=0, open_minimum=True)

    def guidance_scale_at(self, step_index: int, guidance_scale: float, guidance_schedule: str | None = None) -> float:
        """
        Guidance scale `g_s` for step `step_index` of the current schedule, used as `uncond + g_s * (cond - uncond)`.

        `guidance_schedule` None is the config's (`self.config.guidance_schedule`). "constant":
        `g_s = guidance_scale`. "linear" (the original's evaluation schedule, its cfg being `guidance_scale - 1`):
        `g_s = 1 + (guidance_scale - 1) * s / min(n - 1, guidance_ramp_steps)` at step `s` of `n`, so 1 at the first
        step, `guidance_scale` at step `guidance_ramp_steps` and beyond that larger, as in the original; scales with a
        side above `max_sampled_side` use `guidance_scale`, and so does a 1-step schedule (its only scale is the
        final one).
        """
        step_index = self._step_index(step_index)
        check_guidance_schedule(guidance_schedule, allow_none=True)
        if guidance_schedule is None:
            guidance_schedule = self.config.guidance_schedule
        num_steps = len(self.scales)
        if (
            guidance_schedule == "constant"
            or max(self.scales[step_index]) > self.config.max_sampled_side
            or num_steps == 1
        ):
            return float(guidance_scale)
        ramp = step_index / min(num_steps - 1, self.config.guidance_ramp_steps)
        return 1.0 + (guidance_scale - 1.0) * ramp

    def apply_guidance(
        self,
        model_output: torch.Tensor,
        step_index: int,
        guidance_scale: float,
        guidance_schedule: str | None = None,
    ) -> torch.Tensor:
        """
        Float32 logits `(B, L, V)` to sample from at step `step_index`.

        With `guidance_scale != 1`, `model_output` is `cat([cond, uncond])` `(2B, L, V)` and the result is
        `uncond + g * (cond - uncond)` with `g = guidance_scale_at(step_index, ...)` (just `cond` where `g == 1`);
        otherwise `model_output` `(B, L, V)` itself.
        """
        if guidance_scale == 1:
            return model_output.float()
        return combine_guidance(model_output, self.guidance_scale_at(step_index, guidance_scale, guidance_schedule))

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    def is_greedy_scale(self, scale: tuple[int, int]) -> bool:
        """Whether `greedy_untrained_scales` makes `step` take the best token at `scale` instead of sampling."""
        if not self.config.greedy_untrained_scales:
            return False
        trained = set(self.config.trained_sides)
        return any(side > self.config.max_sampled_side or side not in trained for side in scale)

    def sampling_noise_shape(
        self, timestep: int | torch.Tensor, batch_size: int, vocab_size: int, top_k: int = 0
    ) -> tuple[int, int, int] | None:
        """Shape of the Exp(1) noise that `step` draws at `timestep` for `batch_size` images (after guidance), or
        None where it takes the best token and draws nothing."""
        step_index = self._step_index(timestep)
        height, width = self.scales[step_index]
        if top_k == 1 or self.is_greedy_scale((height, width)):
            return None
        num_kept = vocab_size if top_k <= 0 else min(top_k, vocab_size)
        return (batch_size, height * width, num_kept)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        guidance_scale: float = 1.0,
        guidance_schedule: str | None = None,
        top_k: int = 0,
        top_p: float = 0.0,
        temperature: float = 1.0,
        generator: GeneratorLike = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlexVARSchedulerOutput | tuple:
        """
        Choose the tokens of the current scale `self.scales[timestep]` from the transformer's logits.

        Guidance (if `guidance_scale != 1`) combines `uncond + g * (cond - uncond)` with `g` from `guidance_scale_at`.
        (`FlexVARPipeline` has the transformer combine the features before its head instead, the same up to
        rounding with half the head's work, and passes already guided logits here.) Then, in float32: the best
        token when `top_k == 1` or the scale is greedy (`is_greedy_scale`); otherwise the top-k / top-p candidates
        at `temperature` (`top_k_top_p_candidates`) and one draw from them, made as `argmax(probs / noise)` with
        Exp(1) noise (an exact sample, with no host synchronisation, so the whole step can run inside a CUDA graph);
        the noise is laid over the candidates in token-id order, so that rounding which swaps the rank of two
        near-equal logits does not change the draw.

        Args:
            model_output (`torch.Tensor`): Logits `(B, h * w, vocab_size)` for the scale's tokens in row-major order,
                or `(2B, h * w, vocab_size)` = `cat([cond, uncond])` when `guidance_scale != 1`.
            timestep (`int` or 0-d `torch.Tensor`): Step index in `[0, len(self.scales))`.
            guidance_scale (`float`, defaults to 1.0): Classifier-free guidance scale, >= 0; 1 disables guidance.
            guidance_schedule (`str`, *optional*): "linear" or "constant", see `guidance_scale_at`; None: the
                config's `guidance_schedule`.
            top_k (`int`, defaults to 0): Keep the `top_k` best tokens; 0 disables, 1 is greedy.
            top_p (`float`, defaults to 0.0): Nucleus sampling threshold in [0, 1]; 0 or 1 disables it.
            temperature (`float`, defaults to 1.0): Softmax temperature, > 0.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Source of the sampling noise (any
                device); a list holds one generator per image (`B`), each image's noise drawn from its own.
            noise (`torch.Tensor`, *optional*): Exp(1) noise of shape `sampling_noise_shape(...)` to use instead of
                drawing it from `generator`; lets a caller draw it ahead (e.g. outside a CUDA graph).
            return_dict (`bool`, defaults to True): Return a [`FlexVARSchedulerOutput`] instead of a tuple.

        Returns:
            [`FlexVARSchedulerOutput`] or `(indices,)`, with `indices` a LongTensor `(B, h, w)`.
        """
        step_index = self._step_index(timestep)
        self.check_sampling_args(guidance_scale, guidance_schedule, top_k, top_p, temperature)
        height, width = self.scales[step_index]
        guided = guidance_scale != 1
        self._check_logits_shape(model_output, height * width, guided)

        logits = self.apply_guidance(model_output, step_index, guidance_scale, guidance_schedule)
        if top_k == 1 or self.is_greedy_scale((height, width)):
            indices = logits.argmax(dim=-1)
        else:
            probs, token_ids = top_k_top_p_candidates(logits, top_k, top_p, temperature)
            # The noise goes to the candidates in token-id order, not in the order of their logits: tokens with
            # near-equal logits, whose order rounding decides (it differs between batch sizes and kernels), then
            # still get the same noise, so an image drawn with its own generator does not depend on its batch.
            token_ids, order = token_ids.sort(dim=-1)
            probs = probs.gather(-1, order)
            if noise is None:
                noise = exponential_noise(probs.shape, generator, probs.device)
            elif noise.shape != probs.shape:
                raise ValueError(f"`noise` must have shape {tuple(probs.shape)}, got {tuple(noise.shape)}.")
            choice = (probs / noise).argmax(dim=-1, keepdim=True)
            indices = token_ids.gather(-1, choice).squeeze(-1)
        indices = indices.view(-1, height, width)

        if not return_dict:
            return (indices,)
        return FlexVARSchedulerOutput(indices=indices)

    @staticmethod
    def _check_logits_shape(model_output: torch.Tensor, num_tokens: int, guided: bool) -> None:
        if model_output.ndim != 3 or model_output.shape[1] != num_tokens:
            raise ValueError(
                f"`model_output` must be logits (batch, {num_tokens}, vocab_size) for the current scale, "
                f"got shape {tuple(model_output.shape)}."
            )
        if guided and model_output.shape[0] % 2:
            raise ValueError(
                "With `guidance_scale != 1`, `model_output` must stack conditional and unconditional logits "
                f"(2B, {num_tokens}, vocab_size), got an odd batch of {model_output.shape[0]}."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Training schedules

    def sample_training_scales(
        self,
        height: int = 256,
        width: int = 256,
        generator: torch.Generator | None = None,
        keep_final_scale: bool = True,
    ) -> list[tuple[int, int]]:
        """
        Draw a random training schedule, as the original trainer's `gen_curr_patch_nums`.

        On the long side `L` (tokens): with probability 0.05 the default inference schedule (at `L = 16` the published
        10-step one), else `[1, 2]` + 5 sorted distinct sides from `3..floor(10 L / 16)` + 2 from
        `floor(10 L / 16) + 1..L - 1` + `[L]` (at 16: 3..10 and 11..15, the original's ranges). Then one uniform draw
        `u` drops 1, 2, 3 or 4 random inner scales (never the first two or the last) for `u` above 0.9, 0.95, 0.98,
        0.99; then, while the schedule has more tokens than `train_max_tokens * area / train_side**2`, one of its
        last four scales is dropped (one of the three before the last with `keep_final_scale`). Long sides map to
        `(h, w)` as in `long_sides_to_scales`.

        Args:
            height (`int`, defaults to 256), width (`int`, defaults to 256): Training image size in pixels.
            generator (`torch.Generator`, *optional*): Source of randomness; a seeded one gives the same schedule.
            keep_final_scale (`bool`, defaults to True): Never drop the last scale for the token cap, so the schedule
                always ends at `(height, width) // 16`. False is the original exactly: its token cap also drops the
                final scale, in about a third of the draws at 256 x 256 (they then end at a side of 11 to 15).

        Returns:
            `list[tuple[int, int]]`: Distinct, non-decreasing scales starting at `(1, 1)`.
        """
        grid = self.token_grid(height, width)
        final_side = max(grid)
        rng = _TorchRandom(generator)

        if rng.uniform() < TRAINING_FIXED_PROB:
            sides = self.get_long_sides(None, final_side)
        else:
            sides = self._random_training_sides(final_side, rng)

        drop_draw = rng.uniform()
        num_drops = sum(drop_draw > threshold for threshold in TRAINING_DROP_THRESHOLDS)
        for _ in range(num_drops):
            candidates = range(len(TRAINING_PREFIX), len(sides) - 1)
            if len(candidates) == 0:
                break
            sides.pop(candidates[rng.index(len(candidates))])

        max_tokens = self.config.train_max_tokens * grid[0] * grid[1]  # compared with tokens * train_side**2
        while self._num_tokens(sides, grid) * self.config.train_side**2 > max_tokens:
            end = len(sides) - 1 if keep_final_scale else len(sides)
            candidates = range(max(1, len(sides) - TRAINING_CAP_WINDOW), end)
            if len(candidates) == 0:
                break
            sides.pop(candidates[rng.index(len(candidates))])
        return self.long_sides_to_scales(sides, grid)

    @staticmethod
    def _random_training_sides(final_side: int, rng: _TorchRandom) -> list[int]:
        """`[1, 2]` + up to 5 sides from the low range + up to 2 from the high range + `[final_side]`, sorted."""
        prefix = [side for side in TRAINING_PREFIX if side < final_side]
        split = final_side * TRAINING_SPLIT[0] // TRAINING_SPLIT[1]
        low = list(range(TRAINING_PREFIX[-1] + 1, split + 1))
        high = list(range(max(split, TRAINING_PREFIX[-1]) + 1, final_side))
        middle = rng.sample(low, min(TRAINING_NUM_LOW, len(low))) + rng.sample(high, min(TRAINING_NUM_HIGH, len(high)))
        return prefix + sorted(middle) + [final_side]

    def _num_tokens(self, long_sides: Sequence[int], grid: tuple[int, int]) -> int:
        return sum(h * w for h, w in self.long_sides_to_scales(long_sides, grid))


class _TorchRandom:
    """The few draws `sample_training_scales` needs, from a torch generator (CPU or on its own device)."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")

    def uniform(self) -> float:
        """A float in [0, 1)."""
        return torch.rand(1, generator=self.generator, device=self.device).item()

    def index(self, size: int) -> int:
        """An int in [0, size)."""
        return int(torch.randint(size, (1,), generator=self.generator, device=self.device).item())

    def sample(self, values: Sequence[int], count: int) -> list[int]:
        """`count` distinct elements of `values`, uniformly at random."""
        order = torch.randperm(len(values), generator=self.generator, device=self.device)[:count].tolist()
        return [values[i] for i in order]
