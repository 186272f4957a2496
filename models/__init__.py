"""genkernels.models: drop-in layers and reference models that run on genkernels' fused ops."""
from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput

__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerOutput"]
