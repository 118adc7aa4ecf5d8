"""flexvar-hf: FlexVAR scale-wise autoregressive image generation for Hugging Face diffusers."""

from .models import FlexVARKVCache, FlexVARTransformer2DModel, FlexVARTransformerOutput, FlexVQModel, VQEncoderOutput
from .pipelines import FlexVARImg2ImgPipeline, FlexVARInpaintPipeline, FlexVAROutpaintPipeline, FlexVARPipeline
from .schedulers import FlexVARScaleScheduler, FlexVARSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "FlexVARImg2ImgPipeline",
    "FlexVARInpaintPipeline",
    "FlexVARKVCache",
    "FlexVAROutpaintPipeline",
    "FlexVARPipeline",
    "FlexVARScaleScheduler",
    "FlexVARSchedulerOutput",
    "FlexVARTransformer2DModel",
    "FlexVARTransformerOutput",
    "FlexVQModel",
    "VQEncoderOutput",
]
