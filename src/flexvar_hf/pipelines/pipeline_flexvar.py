"""FlexVARPipeline: class-conditional image generation at any size, aspect ratio and number of steps."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from ..models import FlexVARKVCache, FlexVARTransformer2DModel, FlexVQModel
from ..scales import ScaleLike, flatten_grid, is_int, num_tokens, resize_codes
from ..schedulers import FlexVARScaleScheduler
from ..schedulers.scheduling_flexvar import GeneratorLike, check_generator
from ..utils.validation import check_callable, check_choice, check_flag, check_int, shown
from .fast_sampling import FastTokenGenerator, loop_device
from .generic_loading import class_name_entry, plain_class_name, write_pipeline_module

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# `torch.compile` modes that leave CUDA graphs to fast sampling, which captures the whole generation as one.
FAST_SAMPLING_COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
GIB = 2**30


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can still take: the free CUDA memory plus what PyTorch's caching allocator
    holds unused, or the host's `MemAvailable` for the CPU; None where unknown (other devices, no /proc/meminfo)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class FlexVARPipeline(DiffusionPipeline):
    r"""
    Class-conditional generation with FlexVAR: each step predicts the complete token map of the next scale, so one
    model generates any resolution, aspect ratio and number of steps.

    Args:
        transformer ([`FlexVARTransformer2DModel`]): Predicts the tokens of each scale.
        vqvae ([`FlexVQModel`]): Turns the final token grid into pixels.
        scheduler ([`FlexVARScaleScheduler`]): Owns the scale schedule, guidance schedule and token sampling.
        id2label (`dict[int, str]`, *optional*): Class names ("tench, Tinca tinca"), used by `get_label_ids` and
            for passing names as `class_labels`.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = ["indices"]

    def __init__(
        self,
        transformer: FlexVARTransformer2DModel,
        vqvae: FlexVQModel,
        scheduler: FlexVARScaleScheduler,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, scheduler=scheduler)
        id2label = {int(key): value for key, value in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)
        self.fast_token_generator: FastTokenGenerator | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per token side (16 for the released tokenizer), as the scheduler's token grids use it."""
        return self.scheduler.config.vae_scale_factor

    @property
    def default_sample_size(self) -> int:
        """Default image side in pixels: the training size, `transformer.config.sample_size * vae_scale_factor`."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name ("tench, Tinca tinca"); empty when the pipeline was saved without names."""
        return {int(key): value for key, value in (self.config.id2label or {}).items()}

    @property
    def labels(self) -> dict[str, int]:
        """Every comma-separated class name -> class id, sorted by name (as DiTPipeline)."""
        names = {}
        for class_id, value in self.id2label.items():
            for name in value.split(","):
                names[name.strip()] = class_id
        return dict(sorted(names.items()))

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Map class names (any of the comma-separated synonyms) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        labels = self.labels
        if not labels:
            raise ValueError(
                f"This pipeline has no class names (id2label), got {names}; pass class ids as ints (`class_labels`)."
            )
        unknown = [name for name in names if name not in labels]
        if unknown:
            raise ValueError(
                f"Unknown class names {unknown} (`class_labels`); see `pipe.labels` for the {len(labels)} accepted "
                "names."
            )
        return [labels[name] for name in names]

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DiffusionPipeline:
        """
        A pipeline of this class on the loaded modules of `pipeline` (the same objects, nothing copied), e.g.
        `FlexVARInpaintPipeline.from_pipe(pipe)` or back with `FlexVARPipeline.from_pipe(inpaint_pipe)`.

        diffusers casts the shared modules to `dtype` (float32 by default), which would also change them in
        `pipeline`; here they keep their dtype when they share one and no `dtype` / `torch_dtype` is passed.
        """
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            dtypes = {module.dtype for module in pipeline.components.values() if isinstance(module, torch.nn.Module)}
            if len(dtypes) == 1:
                kwargs["dtype"] = dtypes.pop()
        return super().from_pipe(pipeline, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Saved folders that diffusers' generic `DiffusionPipeline.from_pretrained` also loads (see `generic_loading`)

    def save_config(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' `save_config` (what `save_pretrained` and `push_to_hub` write `model_index.json` with), plus
        `flexvar_pipeline.py`, through which `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` finds
        this class."""
        write_pipeline_module(save_directory, type(self).__name__)
        super().save_config(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """The config as diffusers writes it, with `_class_name` in the list form `["flexvar_pipeline", name]`."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = class_name_entry(type(self).__name__)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # Every config diffusers reads for this class (local `load_config` and hub `download`) passes here: the
        # list-form `_class_name` becomes the plain name, so that this class loads the folder without remote code.
        return plain_class_name(super()._dict_from_json_file(json_file))

    # ------------------------------------------------------------------------------------------------------------
    # Input checks

    def prepare_class_labels(
        self, class_labels, num_images_per_prompt: int = 1, device: torch.device | None = None
    ) -> torch.LongTensor:
        """int (Python or numpy), class name, list of them, or a 1-D integer tensor or array -> LongTensor
        (B * num_images_per_prompt,) on `device` (default: the execution device)."""
        num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        labels = None
        if isinstance(class_labels, (torch.Tensor, np.ndarray)) and class_labels.ndim <= 1:
            labels = class_labels.reshape(-1).tolist()
        elif is_int(class_labels) or isinstance(class_labels, str):
            labels = [class_labels]
        elif isinstance(class_labels, Sequence):
            labels = list(class_labels)
        if not labels:
            raise ValueError(
                "`class_labels` must be an int, a class name, or a non-empty list (or 1-D tensor) of them, got "
                f"{shown(class_labels)}."
            )
        labels = [self.get_label_ids(label)[0] if isinstance(label, str) else label for label in labels]
        num_classes = self.transformer.config.num_classes
        bad = [label for label in labels if not is_int(label) or not 0 <= label < num_classes]
        if bad:
            bad = bad[:10] + (["..."] if len(bad) > 10 else [])
            raise ValueError(f"`class_labels` must be ints in [0, {num_classes}) or known class names, got {bad}.")
        labels = torch.tensor(labels, dtype=torch.long, device=self._execution_device if device is None else device)
        return labels.repeat_interleave(num_images_per_prompt)

    @staticmethod
    def check_output_type(output_type: str) -> None:
        check_choice("output_type", output_type, OUTPUT_TYPES)

    def check_inputs(
        self,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
        guidance_scale: float,
        guidance_schedule: str | None,
        top_k: int,
        top_p: float,
        temperature: float,
        generator: GeneratorLike = None,
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ) -> None:
        """Raise ValueError for an unknown output type, a bad callback, callback tensor name, generator or
        `return_dict`, or bad sampling arguments."""
        self.check_output_type(output_type)
        check_callable("callback_on_step_end", callback_on_step_end)
        names = callback_on_step_end_tensor_inputs
        if (
            isinstance(names, str)
            or not isinstance(names, Sequence)
            or not all(isinstance(name, str) and name in self._callback_tensor_inputs for name in names)
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names from {self._callback_tensor_inputs}, "
                f"got {shown(names)}."
            )
        check_flag("return_dict", return_dict)
        check_generator(generator)
        self.scheduler.check_sampling_args(guidance_scale, guidance_schedule, top_k, top_p, temperature)

    def memory_estimate(self, num_images: int, guided: bool, top_k: int) -> dict[str, int]:
        """
        Bytes of the largest allocations of generating `num_images` images at the scheduler's current scales: the
        key/value cache (exactly what `init_kv_cache` allocates, for `2 * num_images` rows with guidance), the
        transformer's activations, float32 logits and sampling candidates and noise (`top_k` kept per token) at the
        last (largest) scale, and a few full-resolution activations of the VQ decoder (or encoder). A lower bound of
        the peak, not a measurement.
        """
        config, vq_config = self.transformer.config, self.vqvae.config
        scales = self.scheduler.scales
        rows = num_images * (2 if guided else 1)
        # Element sizes read off one weight each: `ModelMixin.dtype` walks every module (fast calls avoid that).
        itemsize = self.transformer.proj_out.weight.element_size()
        last = scales[-1][0] * scales[-1][1]
        kept = config.vocab_size if top_k <= 0 else min(top_k, config.vocab_size)
        pixels = last * self.vae_scale_factor**2
        channels = vq_config.base_channels * vq_config.channel_multipliers[0]
        vq_itemsize = self.vqvae.quant_conv.weight.element_size()
        return {
            "key/value cache": config.num_layers * rows * num_tokens(scales) * 2 * config.hidden_size * itemsize,
            "transformer activations": rows * last * config.hidden_size * int(config.mlp_ratio + 3) * itemsize,
            "logits and sampling": num_images * last * (config.vocab_size * 4 + kept * 20),
            "image encoding/decoding": num_images * pixels * channels * 3 * vq_itemsize,
        }

    def check_memory_budget(self, num_images: int, guided: bool, top_k: int, device: torch.device) -> None:
        """ValueError, saying why, when `memory_estimate` exceeds the memory available on `device`
        (`available_memory`); nothing is checked where that is unknown."""
        available = available_memory(torch.device(device))
        estimate = self.memory_estimate(num_images, guided, top_k)
        needed = sum(estimate.values())
        if available is not None and needed > available:
            height, width = (side * self.vae_scale_factor for side in self.scheduler.scales[-1])
            parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in estimate.items())
            raise ValueError(
                f"Generating {num_images} image(s) of {height}x{width} pixels needs at least {needed / GIB:.1f} GiB "
                f"on {device} ({parts} GiB), but about {available / GIB:.1f} GiB are available there: generate fewer "
                "images per call (`class_labels`, `num_images_per_prompt`, `image`) or smaller ones (`height`, "
                "`width`)."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def next_scale_inputs(self, indices: torch.Tensor, next_scale: tuple[int, int]) -> torch.Tensor:
        """(B, h, w) tokens -> (B, h'*w', code_dim): their code vectors resized bicubic to the next scale."""
        codes = self.vqvae.indices_to_codes(indices)
        return flatten_grid(resize_codes(codes, next_scale))

    def generate_tokens(
        self,
        class_labels: torch.LongTensor,
        guidance_scale: float,
        guidance_schedule: str | None,
        top_k: int,
        top_p: float,
        temperature: float,
        generator: GeneratorLike,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("indices",),
        known_tokens: Sequence[torch.LongTensor | None] | None = None,
        keep_masks: Sequence[torch.BoolTensor | None] | None = None,
        step_noise: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.LongTensor:
        """
        Run the scale loop for the scales set on the scheduler; returns the final (B, h, w) token grid.

        Image-conditioned pipelines pass, per scale, `known_tokens[i]` (LongTensor (B, h_i, w_i)) and `keep_masks[i]`
        (BoolTensor (B or 1, h_i, w_i), True = keep the known token). After `scheduler.step`, kept positions are
        replaced by the known tokens; a scale with known tokens and no mask is kept whole and not sampled. The merged
        tokens are what the callback sees and what the next scale is conditioned on. The transformer only runs up to
        the last scale that samples anything (it must still see kept scales, whose keys and values later scales
        attend to). Without `known_tokens` every token is sampled, as in plain generation.

        `step_noise[i]`, if given, is the sampling noise of step i (`scheduler.sampling_noise_shape`), used instead of
        drawing it from `generator`; the fast sampler draws it outside its CUDA graph. `generator` may be a list of
        one generator per image (`len(class_labels)` of them, `check_generator`).
        """
        check_generator(generator, len(class_labels))
        scales = self.scheduler.scales
        known_tokens, keep_masks = self.check_known_tokens(known_tokens, keep_masks, scales, len(class_labels))
        fully_known = [known is not None and keep is None for known, keep in zip(known_tokens, keep_masks)]
        last_sampled = max((i for i, full in enumerate(fully_known) if not full), default=-1)
        guided = guidance_scale != 1.0
        unconditional = torch.full_like(class_labels, self.transformer.config.num_classes)
        model_labels = torch.cat((class_labels, unconditional)) if guided else class_labels
        kv_cache: FlexVARKVCache | None = None
        if last_sampled >= 0:
            kv_cache = self.transformer.init_kv_cache(len(model_labels), num_tokens(scales[: last_sampled + 1]))

        scale_inputs = None
        with self.progress_bar(total=len(scales)) as progress_bar:
            for step_index, scale in enumerate(scales):
                known, keep = known_tokens[step_index], keep_masks[step_index]
                if step_index <= last_sampled:
                    # Guidance is combined in the transformer, before its linear head (see its `guidance_scale`).
                    step_guidance = (
                        self.scheduler.guidance_scale_at(step_index, guidance_scale, guidance_schedule)
                        if guided
                        else None
                    )
                    logits = self.transformer(
                        model_labels, [scale], scale_inputs, kv_cache=kv_cache, guidance_scale=step_guidance
                    ).logits
                if fully_known[step_index]:
                    indices = known
                else:
                    indices = self.scheduler.step(
                        logits,
                        step_index,
                        top_k=top_k,
                        top_p=top_p,
                        temperature=temperature,
                        generator=generator,
                        noise=None if step_noise is None else step_noise[step_index],
                    ).indices
                    if known is not None:
                        indices = torch.where(keep, known, indices)
                if callback_on_step_end is not None:
                    step_tensors = {"indices": indices}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(
                        self, step_index, self.scheduler.timesteps[step_index], callback_kwargs
                    )
                    indices = self.callback_indices(callback_outputs, indices)
                if step_index < last_sampled:
                    scale_inputs = self.next_scale_inputs(indices, scales[step_index + 1])
                    if guided:
                        scale_inputs = torch.cat((scale_inputs, scale_inputs))
                progress_bar.update()
        return indices

    def callback_indices(self, callback_outputs, indices: torch.LongTensor) -> torch.LongTensor:
        """The tokens of a step after `callback_on_step_end` returned `callback_outputs`: its "indices" when it returns
        a dict with them (checked: an integer tensor of the step's shape `(B, h, w)` with ids in [0, vocab_size)),
        else `indices`."""
        if callback_outputs is None:
            return indices
        if not isinstance(callback_outputs, dict):
            raise ValueError(f"`callback_on_step_end` must return a dict (or None), got {shown(callback_outputs)}.")
        replaced = callback_outputs.get("indices", indices)
        if replaced is indices:
            return indices
        vocab_size = self.transformer.config.vocab_size
        if (
            not isinstance(replaced, torch.Tensor)
            or replaced.dtype.is_floating_point
            or replaced.dtype in (torch.bool, torch.complex64, torch.complex128)
            or replaced.shape != indices.shape
            or (replaced.numel() and not 0 <= int(replaced.min()) <= int(replaced.max()) < vocab_size)
        ):
            if isinstance(replaced, torch.Tensor):
                described = f"{replaced.dtype} {tuple(replaced.shape)}"
            else:
                described = shown(replaced)
            raise ValueError(
                f"`callback_on_step_end` returned \"indices\" that are not token ids of this step: expected an "
                f"integer tensor of shape {tuple(indices.shape)} with values in [0, {vocab_size}), got {described}."
            )
        return replaced.to(device=indices.device, dtype=torch.long)

    @staticmethod
    def check_known_tokens(
        known_tokens: Sequence[torch.LongTensor | None] | None,
        keep_masks: Sequence[torch.BoolTensor | None] | None,
        scales: Sequence[tuple[int, int]],
        batch_size: int,
    ) -> tuple[list, list]:
        """Validate the per-scale `known_tokens` / `keep_masks` of `generate_tokens`; None becomes a list of Nones."""
        known_tokens = [None] * len(scales) if known_tokens is None else list(known_tokens)
        keep_masks = [None] * len(scales) if keep_masks is None else list(keep_masks)
        if len(known_tokens) != len(scales) or len(keep_masks) != len(scales):
            raise ValueError(
                f"`known_tokens` and `keep_masks` need one entry per scale ({len(scales)}), got "
                f"{len(known_tokens)} and {len(keep_masks)}."
            )
        for (height, width), known, keep in zip(scales, known_tokens, keep_masks):
            if keep is not None and known is None:
                raise ValueError(f"A keep mask at scale {(height, width)} needs known tokens at that scale.")
            if known is not None and tuple(known.shape) != (batch_size, height, width):
                raise ValueError(
                    f"Known tokens at scale {(height, width)} must have shape {(batch_size, height, width)}, "
                    f"got {tuple(known.shape)}."
                )
            if keep is not None and (
                keep.dtype != torch.bool or keep.ndim != 3 or keep.shape[0] not in (1, batch_size)
                or tuple(keep.shape[1:]) != (height, width)
            ):
                raise ValueError(
                    f"The keep mask at scale {(height, width)} must be a bool tensor of shape "
                    f"({batch_size} or 1, {height}, {width}), got {keep.dtype} {tuple(keep.shape)}."
                )
        return known_tokens, keep_masks

    def enable_fast_sampling(
        self,
        use_cuda_graph: bool | None = None,
        max_graphs: int = 4,
        torch_compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        """
        Generate through `FastTokenGenerator`: the scale loop and the VQ decoding are captured into one CUDA graph
        per setting (batch size, scales, sampling arguments) and replayed. The first call of a setting costs about
        two plain calls (warm-up and capture); later ones launch the whole generation at once. Tokens equal
        the plain path's for the same generator. Calls with `callback_on_step_end` take the plain path. Captured
        graphs hold their memory until `disable_fast_sampling()` (at most `max_graphs` are kept). The whole pipeline
        must sit on one device: CPU offloading is refused.

        Args:
            use_cuda_graph (`bool`, *optional*): Capture graphs; defaults to whether the transformer is on CUDA.
                False runs the same static-buffer loop eagerly.
            max_graphs (`int`, defaults to 4): Settings whose graphs are kept.
            torch_compile (`bool`, defaults to False): Also `torch.compile` the transformer's blocks (regional
                compilation: `transformer.compile_repeated_blocks(dynamic=True)`, one compiled block for every layer
                and scale, which fuses the normalisations, modulations, residuals and activations between the
                matrix products) and the VQ decoder (`vqvae.decoder.compile()`, its weights moved to channels-last
                memory format so that the compiled convolutions need no layout conversions; its GroupNorms then
                reduce large inputs channel by channel, `models.normalization`). The first call of a new
                setting then also compiles (tens of seconds on a GPU, see docs/performance.md), with one Inductor
                heuristic changed: LayerNorms over rows of up to 2048 elements compile to one-pass kernels
                (`utils.inductor`; Inductor's limit is 1024, below d24's width). The modules stay compiled after
                `disable_fast_sampling()`; calls that take the plain path (`callback_on_step_end`) compile new
                shapes with Inductor's defaults, and at small batches run slower than with eager blocks, since each
                compiled block call costs host time that only the replayed graph hides.
            compile_mode (`str`, *optional*): `torch.compile`'s `mode` for both, with `torch_compile=True`: None
                (its default) or "max-autotune-no-cudagraphs" (Triton matrix-product kernels chosen by timing, with
                the following elementwise work fused into them; minutes of start-up, and measured slower than the
                default at d24 batch 1 on an H100). Modes that capture their own CUDA graphs are refused: the whole
                generation is already captured as one.
        """
        max_graphs = check_int("max_graphs", max_graphs, minimum=1)
        torch_compile = check_flag("torch_compile", torch_compile)
        if use_cuda_graph is not None:
            check_flag("use_cuda_graph", use_cuda_graph)
        if compile_mode not in FAST_SAMPLING_COMPILE_MODES:
            raise ValueError(
                f"`compile_mode` must be one of {FAST_SAMPLING_COMPILE_MODES}, got {compile_mode!r} (modes with their "
                "own CUDA graphs cannot run inside fast sampling's captured graph)."
            )
        if compile_mode is not None and not torch_compile:
            raise ValueError(f"`compile_mode={compile_mode!r}` needs `torch_compile=True`.")
        device = loop_device(self)
        execution_device = self._execution_device
        if (device.type, device.index or 0) != (execution_device.type, execution_device.index or 0):
            raise ValueError(
                f"Fast sampling runs where the transformer's weights are ({device}), but this pipeline executes on "
                f"{execution_device}, as with CPU offloading, which fast sampling does not support. Move the whole "
                "pipeline with `pipe.to(device)` instead."
            )
        if use_cuda_graph is None:
            use_cuda_graph = device.type == "cuda"
        if use_cuda_graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the pipeline on a CUDA device, it is on {device}.")
        self.fast_token_generator = FastTokenGenerator(
            self, use_cuda_graph=use_cuda_graph, max_graphs=max_graphs, compiled=torch_compile
        )
        if torch_compile:
            self.transformer.compile_repeated_blocks(dynamic=True, mode=compile_mode)
            # Only the decoding modules: the encoder stays contiguous for the eager encoding of the image-to-image
            # pipelines that share this VQ model (eager convolutions measured slower channels-last).
            for module in (self.vqvae.post_quant_conv, self.vqvae.decoder):
                module.to(memory_format=torch.channels_last)
            self.vqvae.decoder.compile(mode=compile_mode)

    def disable_fast_sampling(self) -> None:
        """Back to the plain loop; frees the captured graphs."""
        self.fast_token_generator = None

    @torch.no_grad()
    def decode(self, indices: torch.LongTensor, output_type: str = "pil", pixels: torch.Tensor | None = None):
        """Final token grid -> images of `output_type` ("latent" returns the tokens); `pixels`, if given, are the
        already decoded (B, 3, H, W) tokens."""
        if output_type == "latent":
            return indices
        if pixels is None:
            pixels = self.vqvae.decode_indices(indices).sample
        return self.image_processor.postprocess(pixels.float(), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        scales: Sequence[ScaleLike] | None = None,
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
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes.

        Args:
            class_labels (`int`, `str`, `list[int | str]` or `torch.LongTensor`):
                Class ids in `[0, transformer.config.num_classes)` or class names (see `pipe.labels`); a list or a
                1-D tensor generates one image per entry (times `num_images_per_prompt`).
            height (`int`, *optional*):
                Image height in pixels, a positive multiple of the scheduler's `vae_scale_factor` (16 for the
                released models). Default: the size the model was trained at, `transformer.config.sample_size *
                vae_scale_factor` (256 for the released models); any other size and aspect ratio works too, within
                the scheduler's size budget `max_tokens_per_image` (tokens of one image over all scales: 32768 by
                default, e.g. 1024x1024 with up to about 30 steps). A call whose estimated memory
                (`memory_estimate`: key/value cache, logits, decoding) exceeds what the device has available is
                refused at once as well (ValueError).
            width (`int`, *optional*):
                Image width in pixels, as `height`.
            num_inference_steps (`int`, *optional*): Number of scales. None picks the published schedule for the
                size (10 steps at 256x256, 15 at 512x512) or the scheduler's rule elsewhere.
            scales (`list`, *optional*): Explicit scales (int sides or (h, w) token-grid pairs). They set the
                image size (the last scale times `vae_scale_factor`) and the number of steps: `height`, `width` and
                `num_inference_steps` must then be left out or agree with them (ValueError otherwise).
            guidance_scale (`float`, defaults to 3.5): Classifier-free guidance `uncond + g * (cond - uncond)`; 1
                disables it. 3.5 with the linear schedule is the paper's ImageNet setting (the original's cfg 2.5).
            guidance_schedule (`str`, *optional*): "linear" ramps g from 1 at the first step to `guidance_scale`
                (the original evaluation schedule); "constant" uses `guidance_scale` at every step. None: the
                model's own, `scheduler.config.guidance_schedule` ("linear" for the released models).
            top_k (`int`, defaults to 900): Sample among the `top_k` most likely tokens; 0 disables the filter.
            top_p (`float`, defaults to 0.95): Then among the most likely tokens holding `top_p` of the probability;
                0 disables the filter.
            temperature (`float`, defaults to 1.0): Softmax temperature.
            num_images_per_prompt (`int`, defaults to 1): Images per class label.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For reproducible sampling. A list
                holds one generator per image (`len(class_labels) * num_images_per_prompt` of them): each image
                then draws its noise from its own generator alone, so it comes out as it would alone or in any
                other batch with that generator (up to the floating-point effects of the batch size on GPUs).
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (the final
                token grid, LongTensor (B, h, w)).
            return_dict (`bool`, defaults to True): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called as `callback(pipe, step_index, timestep, kwargs)`
                after each scale with the tensors named in `callback_on_step_end_tensor_inputs`; a returned dict
                with "indices" replaces the chosen tokens of that scale.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `("indices",)`): Tensors passed to the
                callback: "indices", the scale's tokens, LongTensor `(B, h, w)`.

        Returns:
            [`ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        self.check_inputs(
            output_type, callback_on_step_end_tensor_inputs, guidance_scale, guidance_schedule, top_k, top_p,
            temperature, generator, callback_on_step_end, return_dict,
        )
        fast = self.fast_token_generator is not None and callback_on_step_end is None
        device = self.fast_token_generator.device if fast else self._execution_device
        labels = self.prepare_class_labels(class_labels, num_images_per_prompt, device)
        check_generator(generator, len(labels))
        if scales is None:  # explicit scales set the size; given sides must then agree (set_timesteps checks)
            height = self.default_sample_size if height is None else height
            width = self.default_sample_size if width is None else width
        self.scheduler.set_timesteps(num_inference_steps, height=height, width=width, scales=scales, device=device)
        self.check_memory_budget(len(labels), guidance_scale != 1, top_k, device)

        sampling = (guidance_scale, guidance_schedule, top_k, top_p, temperature)
        pixels = None
        if fast:
            decode = output_type != "latent"
            indices, pixels = self.fast_token_generator(labels, *sampling, generator=generator, decode=decode)
        else:
            indices = self.generate_tokens(
                labels, *sampling, generator, callback_on_step_end, callback_on_step_end_tensor_inputs
            )
        images = self.decode(indices, output_type, pixels=pixels)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
