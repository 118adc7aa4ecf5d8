from .pipeline_flexvar import FlexVARPipeline

__all__ = ["FlexVARPipeline"]
