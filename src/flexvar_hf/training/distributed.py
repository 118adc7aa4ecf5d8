"""The trained model as a plain module, whatever accelerate's distributed setup sharded or wrapped.

Under DDP every process holds the whole model, and `accelerator.unwrap_model` is all it takes. Under FSDP (or
DeepSpeed ZeRO-3) each process holds a shard of every weight, and a module's weights are gathered only around its
`forward`: code that calls the model in another way (generation, which keeps the AdaLN terms in its key/value
cache) or saves it needs the full weights gathered first, which is a collective call that every process must make.

At the end of a run the prepared objects must be freed before the process group is destroyed: see `end_training`.
"""

from __future__ import annotations

import gc

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import ModelMixin

from flexvar_hf.training.growth import init_config


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the prepared model's weights (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def gather_model(
    accelerator: Accelerator, model: torch.nn.Module, model_class: type[ModelMixin]
) -> ModelMixin | None:
    """The prepared `model` with its full weights, for generating with or saving it.

    Call it on every process. Without sharding it is `accelerator.unwrap_model(model)` itself (no copy) on every
    process. With sharding, the full weights are gathered (`accelerator.get_state_dict`) into a new `model_class`
    with the model's config on the main process (FSDP turns the prepared model's own class into a subclass of its
    own), and the other processes get None.
    """
    unwrapped = accelerator.unwrap_model(model)
    if not shards_weights(accelerator):
        return unwrapped
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    gathered = model_class.from_config(init_config(unwrapped))
    gathered.load_state_dict(state_dict)
    return gathered.to(accelerator.device)


def end_training(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` (trackers finished, process group destroyed) once the accelerator holds none of
    the objects it prepared. Call it on every process, after setting the script's own references to what
    `accelerator.prepare` returned to None.

    A distributed model wrapper (DDP's reducer, FSDP) holds the process group. Were it still alive when
    `end_training` unregisters the group, the wrapper would hold the group's last reference and free it later
    (when the script's function returns) with the GIL held. Gloo's destructor then waits for its worker threads, one
    of which may be freeing a tensor of a finished collective and needs the GIL to drop its Python object: a
    deadlock that hangs the process as the script's function returns (seen with torch 2.13 on the CPU). With the
    wrapper freed first, the group's last reference goes with `torch.distributed.destroy_process_group`, whose
    destructor releases the GIL.
    """
    accelerator.free_memory()  # drops the accelerator's own lists of prepared models, optimizers and loaders
    gc.collect()  # modules with hooks can sit in reference cycles
    accelerator.end_training()
