from .pipeline_flexvar import FlexVARPipeline
from .pipeline_flexvar_img2img import FlexVARImg2ImgPipeline
from .pipeline_flexvar_inpaint import FlexVARInpaintPipeline, FlexVAROutpaintPipeline

__all__ = ["FlexVARImg2ImgPipeline", "FlexVARInpaintPipeline", "FlexVAROutpaintPipeline", "FlexVARPipeline"]
