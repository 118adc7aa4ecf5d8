from .scheduling_flexvar import FlexVARScaleScheduler, FlexVARSchedulerOutput

__all__ = ["FlexVARScaleScheduler", "FlexVARSchedulerOutput"]
