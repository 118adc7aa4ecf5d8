"""FlexVARImg2ImgPipeline: regenerate the finer scales of an image and keep its coarse ones, with no extra training.

FlexVAR predicts the whole image's tokens at every scale, so an input image tokenised at every scale of the schedule
can stand in for the first steps of generation. This module also holds what the image-conditioned pipelines share:
reading images (`pixel_values`, then diffusers' `VaeImageProcessor`, pixels in [-1, 1]), the output-size rule and
batch pairing.

Image values, the same for all three editing pipelines (`pixel_values`): PIL images as diffusers reads them (0..255);
numpy arrays and tensors of dtype uint8 as 0..255 (`np.asarray(pil_image)`); float arrays and tensors in [0, 1], or
in [-1, 1] when their minimum is negative (diffusers' convention); values up to 1e-3 outside those ranges (resampling
overshoot) are clamped. Anything else is refused with a ValueError instead of being clipped: floats in 0..255, NaN or
infinite values, and other integer dtypes (uint16, int64, bool), whose range is ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..models import FlexVARTransformer2DModel, FlexVQModel
from ..scales import ScaleLike
from ..schedulers import FlexVARScaleScheduler
from ..schedulers.scheduling_flexvar import GeneratorLike
from ..utils.validation import check_flag, check_number
from .pipeline_flexvar import FlexVARPipeline

# Float values up to this far outside [0, 1] (or [-1, 1]), as resampling overshoots, count as inside and are clamped.
UNIT_RANGE_TOLERANCE = 1e-3


def nearest_multiple(size: int, factor: int = 16) -> int:
    """Nearest multiple of `factor` to `size`, halves rounded up, at least `factor`: 250 -> 256, 72 -> 80, 7 -> 16."""
    return max(factor, (size + factor // 2) // factor * factor)


def pixel_values(values: np.ndarray | torch.Tensor, name: str = "image", mask: bool = False) -> torch.Tensor:
    """
    The values of a numpy or tensor image (or mask) input as a float32 tensor in [0, 1], the same shape; the one
    rule for image values (see the module docstring).

    uint8 is 0..255 and divided by 255. Floats in [0, 1] stay; for images (not masks) floats with a negative minimum
    within [-1, 1] are read as [-1, 1] and mapped to [0, 1]; values within `UNIT_RANGE_TOLERANCE` of the range are
    clamped into it. Masks also take bools (0 / 1). Anything else is a ValueError naming `name`, the range found and
    what is accepted.
    """
    accepted = "uint8 values in 0..255 or floats in [0, 1]" + (" (or bools)" if mask else " (or [-1, 1])")
    given_dtype = values.dtype
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            raise ValueError(f"`{name}` has values of dtype {given_dtype}; pass {accepted}.")
        values = torch.from_numpy(np.array(values, dtype=np.float32 if values.dtype.kind == "f" else values.dtype))
    if values.dtype == torch.uint8:
        return values.float() / 255
    if mask and values.dtype == torch.bool:
        return values.float()
    if not values.dtype.is_floating_point:
        raise ValueError(f"`{name}` has values of dtype {given_dtype}, whose range is ambiguous; pass {accepted}.")
    values = values.float()
    if values.numel() == 0:
        return values
    low, high = values.min().item(), values.max().item()  # NaN if there is any
    tolerance = UNIT_RANGE_TOLERANCE
    if -tolerance <= low and high <= 1 + tolerance:
        return values.clamp(0, 1)
    if not mask and -1 - tolerance <= low and high <= 1 + tolerance:
        return (values.clamp(-1, 1) + 1) / 2
    hint = " (values in 0..255: divide by 255 or pass uint8)" if math.isfinite(high) and high > 1 + tolerance else ""
    raise ValueError(f"`{name}` has values in [{low:g}, {high:g}]; pass {accepted}{hint}.")


def image_as_tensor(image: PIL.Image.Image | np.ndarray | torch.Tensor) -> PIL.Image.Image | torch.Tensor:
    """One image item with numpy or tensor values as a float32 tensor in [0, 1] (`pixel_values`), arrays moved to
    channels first; a PIL image as it is."""
    if isinstance(image, np.ndarray):
        return pixel_values(image).movedim(-1, -3)
    if isinstance(image, torch.Tensor):
        return pixel_values(image)
    return image


def image_batch_and_size(image: PipelineImageInput) -> tuple[int, int, int]:
    """
    `(number of images, height, width)` of an image input, the size being the first image's; raises ValueError for
    an empty or malformed input.

    Accepted: a PIL image (any mode, converted to RGB), a numpy array `(H, W, 3)` or `(B, H, W, 3)`, a tensor
    `(3, H, W)` or `(B, 3, H, W)`, or a list of items of one of these kinds; values as `pixel_values` reads them.
    """
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("`image` is an empty list.")
        kinds = {type(item) for item in image}
        if len(kinds) > 1:
            names = sorted(kind.__name__ for kind in kinds)
            raise ValueError(f"The items of an `image` list must be of one kind (PIL, numpy or tensor), got {names}.")
        sizes = [image_batch_and_size(item) for item in image]
        return sum(batch for batch, _, _ in sizes), sizes[0][1], sizes[0][2]
    if isinstance(image, PIL.Image.Image):
        batch, (width, height) = 1, image.size
    elif isinstance(image, np.ndarray) and image.ndim in (3, 4) and image.shape[-1] == 3:
        batch = image.shape[0] if image.ndim == 4 else 1
        height, width = image.shape[-3:-1]
    elif isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] == 3:
        batch = image.shape[0] if image.ndim == 4 else 1
        height, width = image.shape[-2:]
    else:
        shape = f" of shape {tuple(image.shape)}" if isinstance(image, (np.ndarray, torch.Tensor)) else ""
        raise ValueError(
            "`image` must be a PIL image, an RGB numpy array (H, W, 3) / (B, H, W, 3), an RGB tensor (3, H, W) / "
            f"(B, 3, H, W), or a list of them; got {type(image).__name__}{shape}."
        )
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"`image` is empty: {batch} image(s) of {height}x{width} pixels.")
    return int(batch), int(height), int(width)


class FlexVARImg2ImgPipeline(FlexVARPipeline):
    r"""
    Image-to-image with FlexVAR (refinement): the input image is tokenised at every scale of the schedule, its tokens
    are kept for the first scales and the model generates the rest. No extra training is needed.

    `strength` in [0, 1] sets how much is regenerated. With `n` scales, the number kept is

        kept = n - floor(strength * n)

    (diffusers' img2img rule for denoising steps): strength 0 keeps all `n` scales and returns the VQ reconstruction
    of the input; strength 1 keeps none and generates a new image of the class; at 256x256 (10 scales, sides 1, 2, 3,
    4, 5, 6, 8, 10, 13, 16) strength 0.6 keeps the four coarsest scales (layout and colours) and generates six.

    Output size: `height` / `width` (positive multiples of 16) when given, the image being resized to them; otherwise
    the input's size, each side rounded to the nearest multiple of 16 (halves up, at least 16: 250x375 -> 256x368)
    when `round_to_multiple=True`. With `round_to_multiple=False` and no `height` / `width`, an input whose sides are
    not multiples of 16 is refused (ValueError) instead of resized.

    Args:
        transformer ([`FlexVARTransformer2DModel`]): Predicts the tokens of each scale.
        vqvae ([`FlexVQModel`]): Tokenises the input image and turns the final token grid into pixels.
        scheduler ([`FlexVARScaleScheduler`]): Owns the scale schedule, guidance schedule and token sampling.
        id2label (`dict[int, str]`, *optional*): Class names, as for [`FlexVARPipeline`].
    """

    def __init__(
        self,
        transformer: FlexVARTransformer2DModel,
        vqvae: FlexVQModel,
        scheduler: FlexVARScaleScheduler,
        id2label: dict | None = None,
    ):
        super().__init__(transformer=transformer, vqvae=vqvae, scheduler=scheduler, id2label=id2label)
        # Inputs: any PIL mode to RGB, resized (lanczos for PIL) to the output size, [0, 1] -> [-1, 1].
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_resize=True, do_convert_rgb=True
        )

    # ------------------------------------------------------------------------------------------------------------
    # Image inputs (shared with the in-painting and out-painting pipelines)

    def output_size(
        self,
        image_height: int,
        image_width: int,
        height: int | None = None,
        width: int | None = None,
        round_to_multiple: bool = True,
    ) -> tuple[int, int]:
        """
        Output size in pixels: `height` / `width` where given (checked to be positive multiples of 16), else the
        input's side, rounded to the nearest multiple of 16 if `round_to_multiple`, else refused unless a multiple.
        """
        factor = self.vae_scale_factor
        round_to_multiple = check_flag("round_to_multiple", round_to_multiple)
        sides = []
        for name, given, side in (("height", height, image_height), ("width", width, image_width)):
            if given is None:
                if side % factor and not round_to_multiple:
                    raise ValueError(
                        f"The image is {image_height}x{image_width} pixels; its {name} is not a multiple of {factor}. "
                        f"Pass `{name}` to resize it, or `round_to_multiple=True` to resize it to "
                        f"{nearest_multiple(side, factor)}."
                    )
                given = nearest_multiple(side, factor) if side % factor else side
            sides.append(given)
        self.scheduler.token_grid(*sides)  # positive multiples of 16, else ValueError
        return sides[0], sides[1]

    def prepare_image(
        self,
        image: PipelineImageInput,
        height: int | None = None,
        width: int | None = None,
        round_to_multiple: bool = True,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """
        Image input -> float32 pixels `(B, 3, H, W)` in [-1, 1] on `device` (default: the execution device), resized
        to the output size (`output_size`). Images of a list may differ in size: each is resized to the size chosen
        from the first. Values are read by `pixel_values` (uint8 as 0..255; floats in [0, 1] or [-1, 1]).
        """
        batch, image_height, image_width = image_batch_and_size(image)
        height, width = self.output_size(image_height, image_width, height, width, round_to_multiple)
        items = image if isinstance(image, (list, tuple)) else [image]
        pixels = torch.cat([self.image_processor.preprocess(image_as_tensor(item), height, width) for item in items])
        if tuple(pixels.shape) != (batch, 3, height, width):
            expected = (batch, 3, height, width)
            raise ValueError(f"`image` became pixels of shape {tuple(pixels.shape)}, expected {expected}.")
        return pixels.to(device=self._execution_device if device is None else device, dtype=torch.float32)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in [-1, 1] -> VQ encoder latents `(B, code_dim, H / 16, W / 16)` (not quantised)."""
        return self.vqvae.encode(pixels.to(self.vqvae.dtype)).latents

    def image_tokens(self, latents: torch.Tensor, scales: Sequence[ScaleLike]) -> list[torch.LongTensor]:
        """The image's token grid `(B, h, w)` at every scale: latents area-resized to the scale and quantised."""
        return self.vqvae.quantize_multiscale(latents, scales)

    def pair_images_with_labels(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_images: int,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """
        Pair input images with class labels: as many labels as images pair up in order; one image goes with every
        label; one label goes with every image. Anything else is a ValueError. The labels go to `device` (default:
        the execution device).

        Returns:
            `(labels, image_index)`: LongTensors of length `batch * num_images_per_prompt`; `image_index[i]` is the
            input image of output `i`.
        """
        labels = self.prepare_class_labels(class_labels, num_images_per_prompt, device)[::num_images_per_prompt]
        num_labels = len(labels)
        if num_images == num_labels:
            image_index = torch.arange(num_images)
        elif num_images == 1:
            image_index = torch.zeros(num_labels, dtype=torch.long)
        elif num_labels == 1:
            labels, image_index = labels.expand(num_images), torch.arange(num_images)
        else:
            raise ValueError(
                f"Got {num_images} images and {num_labels} class labels (`image`, `class_labels`): pass one label per "
                "image, one label for all images, or one image for all labels."
            )
        image_index = image_index.to(labels.device)
        return labels.repeat_interleave(num_images_per_prompt), image_index.repeat_interleave(num_images_per_prompt)

    def prepare_outputs(
        self,
        image: PipelineImageInput,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_images_per_prompt: int,
        height: int | None,
        width: int | None,
        num_inference_steps: int | None,
        guidance_scale: float,
        top_k: int,
        round_to_multiple: bool,
    ) -> tuple[torch.LongTensor, torch.LongTensor, tuple[int, int], torch.device]:
        """
        Everything that needs no pixels, before any image work: the output size (`output_size` of the input's size
        and `height` / `width`), the input images paired with the labels (`pair_images_with_labels`), the scales of
        that size (the size budget) and the memory budget of the outputs.

        Returns:
            `(labels, image_index, (height, width), device)`, the labels on the execution device `device` (read
            once: each read walks every module).
        """
        num_images, image_height, image_width = image_batch_and_size(image)
        size = self.output_size(image_height, image_width, height, width, round_to_multiple)
        device = self._execution_device
        labels, image_index = self.pair_images_with_labels(class_labels, num_images, num_images_per_prompt, device)
        self.scheduler.set_timesteps(num_inference_steps, height=size[0], width=size[1], device=device)
        self.check_memory_budget(len(labels), guidance_scale != 1, top_k, device)
        return labels, image_index, size, device

    # ------------------------------------------------------------------------------------------------------------
    # Strength

    @staticmethod
    def num_kept_scales(strength: float, num_scales: int) -> int:
        """`num_scales - floor(strength * num_scales)`: scales of the input kept; strength 0 keeps all, 1 none."""
        strength = check_number("strength", strength, 0, 1)
        return num_scales - min(num_scales, math.floor(strength * num_scales + 1e-9))

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        strength: float = 0.6,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.5,
        guidance_schedule: str | None = None,
        top_k: int = 900,
        top_p: float = 0.95,
        temperature: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: GeneratorLike = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("indices",),
        round_to_multiple: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerate the finer scales of `image` as the given classes.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The input: PIL image(s), numpy `(H, W, 3)` / `(B, H, W, 3)` or tensor `(3, H, W)` / `(B, 3, H, W)`:
                uint8 in 0..255 or floats in [0, 1] (or [-1, 1]); other ranges are refused (see `pixel_values`).
            class_labels (`int`, `str`, `list[int | str]` or `torch.LongTensor`):
                Class ids or names; one per image, one for all images, or several for one image.
            strength (`float`, defaults to 0.6): In [0, 1]; the last `floor(strength * n)` of the `n` scales are
                generated, the others are the input's tokens. 0 returns the VQ reconstruction, 1 a new image.
            height (`int`, *optional*):
                Output height in pixels (a multiple of 16); the image is resized to it. Default: the input's height,
                see `round_to_multiple`.
            width (`int`, *optional*):
                Output width in pixels, as `height`.
            num_inference_steps (`int`, *optional*): Number of scales; None picks the default for the output size.
            guidance_scale, guidance_schedule, top_k, top_p, temperature, generator: Sampling, as in
                [`FlexVARPipeline`].
            num_images_per_prompt (`int`, defaults to 1): Outputs per (image, label) pair.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (final tokens).
            return_dict (`bool`, defaults to True): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): As in [`FlexVARPipeline`]; called at every scale, kept
                ones included (with the input's tokens).
            round_to_multiple (`bool`, defaults to True): Without `height` / `width`, resize an input whose sides are
                not multiples of 16 to the nearest multiples; False refuses such an input (ValueError).

        Returns:
            [`ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        self.check_inputs(
            output_type, callback_on_step_end_tensor_inputs, guidance_scale, guidance_schedule, top_k, top_p,
            temperature, generator, callback_on_step_end, return_dict,
        )
        self.num_kept_scales(strength, 1)  # checks strength before any work
        labels, image_index, (height, width), device = self.prepare_outputs(
            image, class_labels, num_images_per_prompt, height, width, num_inference_steps, guidance_scale, top_k,
            round_to_multiple,
        )
        pixels = self.prepare_image(image, height, width, round_to_multiple, device)
        scales = self.scheduler.scales
        num_kept = self.num_kept_scales(strength, len(scales))
        tokens = self.image_tokens(self.encode_image(pixels), scales[:num_kept]) if num_kept else []
        known_tokens = [grid[image_index] for grid in tokens] + [None] * (len(scales) - num_kept)

        indices = self.generate_tokens(
            labels,
            guidance_scale,
            guidance_schedule,
            top_k,
            top_p,
            temperature,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            known_tokens=known_tokens,
        )
        images = self.decode(indices, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
