"""In-painting and out-painting with FlexVAR: regenerate the masked tokens at every scale, keep the rest.

At every scale the tokens outside the mask are the input image's tokens at that scale and only the masked ones are
sampled, so the model is conditioned on a consistent image at each step; no extra training is needed.

Mask reduction (the same for in-painting and out-painting):

1. The pixel mask (white = regenerate) is binarised at 0.5 and resized (nearest) to the output size. At the final
   scale a token is regenerated when *any* pixel of its 16x16 patch is white, so every white pixel is regenerated
   and every kept token covers only black pixels.
2. At a coarser scale `(h, w)`, a token is regenerated when at least `mask_threshold` (default 0.5, "most") of its
   area is regenerated at the final scale: the final-scale mask is area-resized to `(h, w)` (the same adaptive
   average pooling that resizes the latents before quantisation) and compared with the threshold.
3. Before the multi-scale quantisation, the latents of the final-scale tokens to regenerate are set to zero; the
   quantiser normalises each pooled vector, so a kept coarse token describes only the kept part of its area.

The kept final-scale tokens are therefore exactly the input's tokens `quantize(encode(image))`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..models import FlexVARTransformer2DModel, FlexVQModel
from ..scales import ScaleLike, is_int
from ..schedulers import FlexVARScaleScheduler
from ..schedulers.scheduling_flexvar import GeneratorLike
from ..utils.validation import check_agreement, check_flag, check_number
from .pipeline_flexvar_img2img import FlexVARImg2ImgPipeline, image_batch_and_size, pixel_values

MASK_SHAPES = (
    "PIL image(s), a numpy array (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1), or a tensor (H, W), (B, H, W) or "
    "(B, 1, H, W)"
)


def mask_to_tensor(mask_image) -> torch.Tensor | list[PIL.Image.Image]:
    """
    A mask input -> a float tensor `(B, 1, H, W)` in [0, 1] (values read by `pixel_values`: uint8 as 0..255, bools as
    0/1, floats in [0, 1]), or a list of PIL images left to the mask processor. Raises ValueError for an empty,
    multi-channel or out-of-range mask.
    """
    if isinstance(mask_image, PIL.Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)):
        if len(mask_image) == 0:
            raise ValueError("`mask_image` is an empty list.")
        if all(isinstance(item, PIL.Image.Image) for item in mask_image):
            if any(0 in item.size for item in mask_image):
                raise ValueError("`mask_image` is empty (0 pixels).")
            return list(mask_image)
        if any(isinstance(item, PIL.Image.Image) for item in mask_image):
            raise ValueError("`mask_image` mixes PIL images with arrays or tensors; pass a list of one kind.")
        masks = [mask_to_tensor(item) for item in mask_image]
        sizes = {tuple(mask.shape[-2:]) for mask in masks}
        if len(sizes) > 1:
            raise ValueError(f"The masks of a `mask_image` list must have one size (H, W); got {sorted(sizes)}.")
        return torch.cat(masks)
    if isinstance(mask_image, np.ndarray):
        array = mask_image
        if array.ndim == 3 and array.shape[-1] in (3, 4) or array.ndim == 4 and array.shape[-1] != 1:
            raise ValueError(f"`mask_image` must be single-channel ({MASK_SHAPES}); got an array {array.shape}.")
        tensor = pixel_values(array, "mask_image", mask=True)
        if tensor.ndim == 3 and tensor.shape[-1] == 1 or tensor.ndim == 4:  # (H, W, 1) / (B, H, W, 1): channels last
            tensor = tensor.movedim(-1, -3)
    elif isinstance(mask_image, torch.Tensor):
        tensor = mask_image
        if tensor.ndim == 4 and tensor.shape[1] != 1:
            raise ValueError(
                f"`mask_image` must be single-channel ({MASK_SHAPES}); got a tensor {tuple(tensor.shape)}."
            )
    else:
        raise ValueError(f"`mask_image` must be {MASK_SHAPES}; got {type(mask_image).__name__}.")
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4:
        raise ValueError(f"`mask_image` must be {MASK_SHAPES}; got shape {tuple(mask_image.shape)}.")
    if tensor.numel() == 0:
        raise ValueError(f"`mask_image` is empty: shape {tuple(mask_image.shape)}.")
    return pixel_values(tensor, "mask_image", mask=True)


class FlexVARInpaintPipeline(FlexVARImg2ImgPipeline):
    r"""
    In-painting with FlexVAR: regenerate the white area of `mask_image` and keep the rest of `image`, with no extra
    training. At every scale the tokens outside the mask are the input's tokens at that scale and only masked tokens
    are sampled; the kept final-scale tokens are exactly the input's. See this module's docstring for how the pixel
    mask is reduced to each token grid.

    An all-white mask regenerates everything (plain generation of the class). A mask with no white pixel (after
    binarising at 0.5) has nothing to regenerate and is refused with a ValueError; for the VQ reconstruction use
    [`FlexVARImg2ImgPipeline`] with `strength=0`.

    Decoding mixes pixels across token borders and the VQ reconstruction is lossy, so the decoded kept area is close
    to but not exactly the input; `preserve_unmasked=True` pastes the input's pixels back outside the mask.

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
        # Masks: grayscale, resized (nearest for arrays and tensors) to the image, no [-1, 1] shift, binarised at 0.5.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_resize=True,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Masks

    def prepare_mask(
        self, mask_image, num_images: int, height: int, width: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """
        Mask input (white = regenerate; PIL, numpy or tensor, any size) -> float32 `(B, 1, height, width)` of 0/1 on
        `device` (default: the execution device), `B` being 1 (one mask for all images) or `num_images`.
        """
        mask = self.mask_processor.preprocess(mask_to_tensor(mask_image), height=height, width=width)
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(f"`mask_image` became a mask of shape {tuple(mask.shape)}, expected (B, 1, {height}, "
                             f"{width}); pass single-channel masks ({MASK_SHAPES}).")
        if mask.shape[0] not in (1, num_images):
            raise ValueError(
                f"Got {mask.shape[0]} masks for {num_images} images: pass one mask per image or one for all."
            )
        return mask.to(device=self._execution_device if device is None else device, dtype=torch.float32)

    def regenerate_mask(self, mask: torch.Tensor) -> torch.BoolTensor:
        """
        Pixel mask `(B, 1, H, W)` -> final-scale tokens to regenerate `(B, H / 16, W / 16)`: a token is regenerated
        when any pixel of its 16x16 patch is white. Refuses a mask with nothing to regenerate.
        """
        regenerate = F.max_pool2d(mask, kernel_size=self.vae_scale_factor)[:, 0] > 0.5
        empty = (~regenerate.flatten(1).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"`mask_image` {empty} has no white pixel (after binarising at 0.5): nothing to regenerate. White "
                "marks the area to regenerate; for the VQ reconstruction use FlexVARImg2ImgPipeline with strength=0."
            )
        return regenerate

    @staticmethod
    def check_editing_args(mask_threshold: float, preserve_unmasked: bool, output_type: str) -> None:
        """ValueError for a `mask_threshold` outside (0, 1], a non-bool `preserve_unmasked`, or `preserve_unmasked`
        with `output_type="latent"` (tokens have no pixels to paste back)."""
        check_number("mask_threshold", mask_threshold, 0, 1, open_minimum=True)
        check_flag("preserve_unmasked", preserve_unmasked)
        if output_type == "latent":
            given = {"preserve_unmasked": preserve_unmasked}
            check_agreement("output_type='latent'", {"preserve_unmasked": False}, given)

    @staticmethod
    def keep_masks_for_scales(
        regenerate: torch.BoolTensor, scales: Sequence[tuple[int, int]], mask_threshold: float = 0.5
    ) -> list[torch.BoolTensor]:
        """
        Final-scale tokens to regenerate `(B, h, w)` -> per scale, the tokens to keep `(B, h_i, w_i)`: those of which
        less than `mask_threshold` of the area (area-resized final mask) is regenerated. The last scale must be the
        final grid; there a token is kept exactly when it is not regenerated.
        """
        if tuple(scales[-1]) != tuple(regenerate.shape[-2:]):
            grid = tuple(regenerate.shape[-2:])
            raise ValueError(f"The last scale {tuple(scales[-1])} must be the mask's token grid {grid}.")
        area = regenerate[:, None].float()
        keep_masks = [F.interpolate(area, size=scale, mode="area")[:, 0] < mask_threshold for scale in scales[:-1]]
        return keep_masks + [~regenerate]

    def masked_image_tokens(
        self, latents: torch.Tensor, regenerate: torch.BoolTensor, scales: Sequence[ScaleLike]
    ) -> list[torch.LongTensor]:
        """The image's tokens at every scale with the latents of the regenerated final-scale tokens set to zero."""
        return self.image_tokens(latents * ~regenerate[:, None], scales)

    # ------------------------------------------------------------------------------------------------------------
    # Generation shared with out-painting

    def generate_masked(
        self,
        labels: torch.LongTensor,
        image_index: torch.LongTensor,
        latents: torch.Tensor,
        regenerate: torch.BoolTensor,
        mask_threshold: float,
        sampling: dict,
    ) -> torch.LongTensor:
        """
        Run the scale loop keeping the image's tokens outside `regenerate`.

        Args:
            labels (`torch.LongTensor` of shape `(N,)`), image_index (`torch.LongTensor` of shape `(N,)`): Class and
                input image of each output.
            latents (`torch.Tensor` of shape `(B, code_dim, h, w)`): Encoder latents of the input images.
            regenerate (`torch.BoolTensor` of shape `(B or 1, h, w)`): Final-scale tokens to generate.
            sampling (`dict`): Arguments of `generate_tokens` after `class_labels`.

        Returns:
            Final tokens `(N, h, w)`.
        """
        scales = self.scheduler.scales
        regenerate = regenerate.expand(len(latents), -1, -1)
        tokens = self.masked_image_tokens(latents, regenerate, scales)
        keep_masks = self.keep_masks_for_scales(regenerate, scales, mask_threshold)
        known_tokens = [grid[image_index] for grid in tokens]
        # A scale where every token is kept is not sampled at all (keep mask None).
        keep_masks = [None if keep.all() else keep[image_index] for keep in keep_masks]
        return self.generate_tokens(labels, **sampling, known_tokens=known_tokens, keep_masks=keep_masks)

    def decode_blended(
        self,
        indices: torch.LongTensor,
        output_type: str,
        pixels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        """
        Decode the final tokens; with `pixels` `(N, 3, H, W)` in [-1, 1] and `mask` `(N or 1, 1, H, W)`, keep the
        decoded pixels where the mask is white and `pixels` elsewhere. "latent" returns the tokens.
        """
        if output_type == "latent" or pixels is None:
            return self.decode(indices, output_type)
        decoded = self.vqvae.decode_indices(indices).sample.float()
        return self.decode(indices, output_type, pixels=torch.where(mask > 0.5, decoded, pixels))

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        mask_image: PipelineImageInput,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
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
        mask_threshold: float = 0.5,
        preserve_unmasked: bool = False,
        round_to_multiple: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Regenerate the white area of `mask_image` in `image` as the given classes.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The input, as for [`FlexVARImg2ImgPipeline`].
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                White (>= 0.5) = regenerate, black = keep; PIL (any mode), numpy or tensor in [0, 1] (uint8 arrays
                in [0, 255]), any size: resized to the output size. One mask per image or one for all.
            class_labels (`int`, `str`, `list[int | str]` or `torch.LongTensor`):
                Class ids or names; one per image, one for all images, or several for one image.
            height (`int`, *optional*):
                Output height in pixels (a multiple of 16); image and mask are resized to it. Default: the input's
                height, see `round_to_multiple`.
            width (`int`, *optional*):
                Output width in pixels, as `height`.
            num_inference_steps (`int`, *optional*): Number of scales; None picks the default for the output size.
            guidance_scale, guidance_schedule, top_k, top_p, temperature, generator: Sampling, as in
                [`FlexVARPipeline`].
            num_images_per_prompt (`int`, defaults to 1): Outputs per (image, label) pair.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (final tokens).
            return_dict (`bool`, defaults to True): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): As in [`FlexVARPipeline`]; sees the merged tokens.
            mask_threshold (`float`, defaults to 0.5): In (0, 1]; a token of a coarser scale is regenerated when at
                least this fraction of its area is regenerated at the final scale. Lower values regenerate more
                context around the mask at coarse scales.
            preserve_unmasked (`bool`, defaults to False): Paste the input's pixels back where the mask is black.
            round_to_multiple (`bool`, defaults to True): See [`FlexVARImg2ImgPipeline`].

        Returns:
            [`ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        self.check_inputs(
            output_type, callback_on_step_end_tensor_inputs, guidance_scale, guidance_schedule, top_k, top_p,
            temperature, generator, callback_on_step_end, return_dict,
        )
        self.check_editing_args(mask_threshold, preserve_unmasked, output_type)
        labels, image_index, (height, width), device = self.prepare_outputs(
            image, class_labels, num_images_per_prompt, height, width, num_inference_steps, guidance_scale, top_k,
            round_to_multiple,
        )
        mask = self.prepare_mask(mask_image, image_batch_and_size(image)[0], height, width, device=device)
        regenerate = self.regenerate_mask(mask)
        pixels = self.prepare_image(image, height, width, round_to_multiple, device)
        sampling = dict(
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        indices = self.generate_masked(
            labels, image_index, self.encode_image(pixels), regenerate, mask_threshold, sampling
        )
        if preserve_unmasked:
            mask = mask if len(mask) == 1 else mask[image_index]
            images = self.decode_blended(indices, output_type, pixels[image_index], mask)
        else:
            images = self.decode_blended(indices, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class FlexVAROutpaintPipeline(FlexVARInpaintPipeline):
    r"""
    Out-painting and image expansion with FlexVAR: place `image` on a larger or differently shaped canvas (e.g.
    256x256 -> 256x512, or centred in 512x512) and generate the new area with the in-painting mechanism, at any size
    the scale schedule supports.

    The input is encoded on its own and its latents are placed on a canvas of zero latents at `offset` (a multiple of
    16 pixels, i.e. whole tokens), so the kept final-scale tokens are exactly the input's tokens
    `quantize(encode(image))` at their new position, and coarse kept tokens describe only the image. Everything
    outside the image is regenerated; coarser scales follow the in-painting rule with `mask_threshold`.

    Args:
        transformer ([`FlexVARTransformer2DModel`]): Predicts the tokens of each scale.
        vqvae ([`FlexVQModel`]): Tokenises the input image and turns the final token grid into pixels.
        scheduler ([`FlexVARScaleScheduler`]): Owns the scale schedule, guidance schedule and token sampling.
        id2label (`dict[int, str]`, *optional*): Class names, as for [`FlexVARPipeline`].
    """

    def canvas_offset(
        self, image_size: tuple[int, int], canvas_size: tuple[int, int], offset: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """
        `(top, left)` of the image on the canvas in pixels: `offset` checked (non-negative multiples of 16, image
        inside the canvas), or by default centred and rounded down to whole tokens: `(H - h) // 2 // 16 * 16`.
        Refuses a canvas smaller than the image or of its size (nothing to generate).
        """
        (height, width), factor = canvas_size, self.vae_scale_factor
        if height < image_size[0] or width < image_size[1]:
            raise ValueError(
                f"The canvas (`height` x `width` = {height}x{width}) must be at least the image's size "
                f"({image_size[0]}x{image_size[1]})."
            )
        if tuple(canvas_size) == tuple(image_size):
            raise ValueError(
                f"The canvas ({height}x{width}) is the image's size: nothing to generate. Pass a larger `height` or "
                "`width`."
            )
        if offset is None:
            return tuple((canvas - side) // 2 // factor * factor for side, canvas in zip(image_size, canvas_size))
        if (
            not isinstance(offset, Sequence)
            or len(offset) != 2
            or not all(is_int(value) for value in offset)
            or any(value < 0 or value % factor for value in offset)
        ):
            raise ValueError(
                f"`offset` must be (top, left) in pixels, non-negative multiples of {factor}; got {offset!r}."
            )
        top, left = offset
        if top + image_size[0] > canvas_size[0] or left + image_size[1] > canvas_size[1]:
            raise ValueError(
                f"The {image_size[0]}x{image_size[1]} image at `offset` {(top, left)} does not fit in the "
                f"{canvas_size[0]}x{canvas_size[1]} canvas."
            )
        return top, left

    def prepare_canvas(
        self, pixels: torch.Tensor, height: int, width: int, offset: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """
        Place pixels `(B, 3, h, w)` on a `height` x `width` canvas.

        Returns:
            `(canvas, mask, (top, left))`: the canvas `(B, 3, height, width)` in [-1, 1], mid-grey (0) outside the
            image; the mask `(1, 1, height, width)`, 1 (white, regenerate) outside the image and 0 on it; the offset.
        """
        top, left = self.canvas_offset(tuple(pixels.shape[-2:]), (height, width), offset)
        bottom, right = top + pixels.shape[-2], left + pixels.shape[-1]
        canvas = pixels.new_zeros(len(pixels), 3, height, width)
        canvas[:, :, top:bottom, left:right] = pixels
        mask = pixels.new_ones(1, 1, height, width)
        mask[:, :, top:bottom, left:right] = 0
        return canvas, mask, (top, left)

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        offset: tuple[int, int] | None = None,
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
        mask_threshold: float = 0.5,
        preserve_unmasked: bool = False,
        round_to_multiple: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Place `image` on a `height` x `width` canvas and generate the rest of the canvas as the given classes.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The input, as for [`FlexVARImg2ImgPipeline`]; used at its own size (sides rounded to multiples of 16
                as there).
            class_labels (`int`, `str`, `list[int | str]` or `torch.LongTensor`):
                Class ids or names; one per image, one for all images, or several for one image.
            height (`int`, *optional*):
                Canvas height in pixels, a multiple of 16, at least the image's; by default the image's. The canvas
                must be larger than the image in at least one side.
            width (`int`, *optional*):
                Canvas width in pixels, as `height`.
            offset (`tuple[int, int]`, *optional*): `(top, left)` of the image on the canvas in pixels, multiples of
                16. Default: centred, rounded down to whole tokens.
            num_inference_steps (`int`, *optional*): Number of scales; None picks the default for the canvas size.
            guidance_scale, guidance_schedule, top_k, top_p, temperature, generator: Sampling, as in
                [`FlexVARPipeline`].
            num_images_per_prompt, output_type, return_dict, callback_on_step_end, mask_threshold: As in
                [`FlexVARInpaintPipeline`].
            preserve_unmasked (`bool`, defaults to False): Paste the input's pixels back on the image's area.
            round_to_multiple (`bool`, defaults to True): See [`FlexVARImg2ImgPipeline`].

        Returns:
            [`ImagePipelineOutput`] with `images` of the canvas size, or a tuple `(images,)`.
        """
        self.check_inputs(
            output_type, callback_on_step_end_tensor_inputs, guidance_scale, guidance_schedule, top_k, top_p,
            temperature, generator, callback_on_step_end, return_dict,
        )
        self.check_editing_args(mask_threshold, preserve_unmasked, output_type)
        # The canvas: `height` / `width`, a missing side the image's (as the output size of the other pipelines).
        labels, image_index, (height, width), device = self.prepare_outputs(
            image, class_labels, num_images_per_prompt, height, width, num_inference_steps, guidance_scale, top_k,
            round_to_multiple,
        )
        image_size = self.output_size(*image_batch_and_size(image)[1:], None, None, round_to_multiple)
        self.canvas_offset(image_size, (height, width), offset)  # the image fits, before any image work
        pixels = self.prepare_image(image, None, None, round_to_multiple, device)
        canvas, mask, (top, left) = self.prepare_canvas(pixels, height, width, offset)

        factor = self.vae_scale_factor
        image_latents = self.encode_image(pixels)
        latents = image_latents.new_zeros(*image_latents.shape[:2], height // factor, width // factor)
        rows = slice(top // factor, top // factor + image_latents.shape[-2])
        cols = slice(left // factor, left // factor + image_latents.shape[-1])
        latents[:, :, rows, cols] = image_latents
        regenerate = self.regenerate_mask(mask)
        sampling = dict(
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        indices = self.generate_masked(labels, image_index, latents, regenerate, mask_threshold, sampling)
        if preserve_unmasked:
            images = self.decode_blended(indices, output_type, canvas[image_index], mask)
        else:
            images = self.decode_blended(indices, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
