from .transformer_flexvar import FlexVARKVCache, FlexVARTransformer2DModel, FlexVARTransformerOutput
from .vq_model import FlexVQModel, VQEncoderOutput

__all__ = [
    "FlexVARKVCache",
    "FlexVARTransformer2DModel",
    "FlexVARTransformerOutput",
    "FlexVQModel",
    "VQEncoderOutput",
]
