"""Training checkpoints on top of `accelerate`: atomic saves, pruning, finding the latest one and resuming.

A checkpoint is the folder `output_dir/checkpoint-{step}` written by `accelerator.save_state` (models, optimizers,
LR schedulers, gradient scaler, per-process RNG states and every object registered with
`accelerator.register_for_checkpointing`, e.g. a diffusers `EMAModel`) plus `training_state.json` with the global
step and whatever the training script adds. It is written under a temporary name and renamed into place once
complete, so a run killed while saving leaves the earlier checkpoints as they were, and `latest_checkpoint` only ever
sees complete ones. Nothing here knows about a particular model: `examples/train.py` and `examples/train_vq.py` both
use it.

Typical use in a training script:

```python
accelerator.register_for_checkpointing(ema_model)  # optional: anything with state_dict/load_state_dict
model, optimizer, dataloader, lr_scheduler = accelerator.prepare(...)
global_step = 0
checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)  # ValueError if PATH is missing
if checkpoint is not None:
    global_step = load_checkpoint(accelerator, checkpoint)["global_step"]
first_epoch, skip = resume_position(global_step, num_update_steps_per_epoch, args.gradient_accumulation_steps)
...
if global_step % args.checkpointing_steps == 0:
    save_checkpoint(accelerator, args.output_dir, global_step, total_limit=args.checkpoints_total_limit)
```
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_FILE",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "resume_position",
    "time_is_up",
]


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """`output_dir/checkpoint-{step}`."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(step)}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as `(step, path)`, oldest first.

    Only folders named exactly `checkpoint-{step}` that hold `training_state.json` count; temporary folders of a
    save in progress or of a killed run (`.checkpoint-{step}.tmp`, `.checkpoint-{step}.old`) are ignored.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(resume_from_checkpoint: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """Turn a `--resume_from_checkpoint` value into a checkpoint folder.

    Args:
        resume_from_checkpoint: None (start fresh), "latest" (the newest complete checkpoint in `output_dir`, or None
            when there is none yet, so the same command both starts and resumes a run), a path to a checkpoint
            folder, or the name of one inside `output_dir` (e.g. "checkpoint-500").
        output_dir: The run's output folder.

    Raises:
        ValueError: If an explicit checkpoint does not exist or is not a complete checkpoint.
    """
    if resume_from_checkpoint is None or str(resume_from_checkpoint) == "":
        return None
    if str(resume_from_checkpoint) == "latest":
        return latest_checkpoint(output_dir)
    candidates = [Path(resume_from_checkpoint), Path(output_dir) / str(resume_from_checkpoint)]
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / STATE_FILE).is_file():
                raise ValueError(
                    f"{str(candidate)!r} is not a complete training checkpoint (it has no {STATE_FILE}); "
                    f"pass a `{CHECKPOINT_PREFIX}<step>` folder written by this script, or 'latest'."
                )
            return candidate
    available = [path.name for _, path in list_checkpoints(output_dir)]
    raise ValueError(
        f"Checkpoint to resume from {str(resume_from_checkpoint)!r} does not exist (looked for "
        f"{' and '.join(repr(str(c)) for c in candidates)}). Checkpoints in {str(output_dir)!r}: "
        f"{available or 'none'}. Pass an existing checkpoint folder or 'latest'."
    )


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; returns the deleted folders.

    None or 0 keeps everything. Call it after a save has completed, never before, so a failed save never costs an
    old checkpoint.
    """
    if not total_limit or total_limit < 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _renames_on_this_process(accelerator) -> bool:
    """The process that renames the staged folder: one per node when every node saves its own copy, else one."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Save the accelerate state atomically as `output_dir/checkpoint-{step}`; every process must call it.

    The state goes to `output_dir/.checkpoint-{step}.tmp` first (`accelerator.save_state`), then `training_state.json`
    (`{"global_step": step, **state}`) is written and the folder renamed to `checkpoint-{step}`, replacing an older
    one of the same step. Afterwards the oldest checkpoints beyond `total_limit` are deleted.

    Args:
        accelerator (`accelerate.Accelerator`): After `prepare`; objects to save with the checkpoint (an EMA model)
            must have been passed to `accelerator.register_for_checkpointing` before.
        output_dir: The run's output folder.
        step (`int`): Global optimisation step reached; the folder's name.
        total_limit (`int`, *optional*): Keep at most this many checkpoints (None or 0: all).
        state (`Mapping`, *optional*): Extra JSON-serialisable values stored in `training_state.json`.

    Returns:
        The checkpoint folder.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError("save_checkpoint names checkpoints itself; create the Accelerator without "
                         "`ProjectConfiguration(automatic_checkpoint_naming=True)`.")
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    staging = output_dir / f".{final.name}.tmp"
    renamer = _renames_on_this_process(accelerator)
    if renamer:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left over from a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if renamer:
        payload = {"global_step": int(step), **dict(state or {})}
        (staging / STATE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if final.exists():
            retired = output_dir / f".{final.name}.old"
            shutil.rmtree(retired, ignore_errors=True)
            final.rename(retired)
            staging.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(final)
        prune_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` (`accelerator.load_state`) and return its
    `training_state.json` (at least `{"global_step": int}`).

    Models, optimizers and LR schedulers must be prepared, and registered objects registered in the same order as
    when saving. RNG states are restored too. Objects restored through `register_for_checkpointing` come back on the
    CPU (e.g. the shadow weights of a diffusers `EMAModel`): move them to the device afterwards.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{str(path)!r} is not a complete training checkpoint (it has no {STATE_FILE}).")
    state = json.loads(state_file.read_text())
    accelerator.load_state(str(path))
    state["global_step"] = int(state["global_step"])
    return state


def resume_position(
    global_step: int, num_update_steps_per_epoch: int, gradient_accumulation_steps: int = 1
) -> tuple[int, int]:
    """Where in the data a run that has done `global_step` optimisation steps goes on: `(epoch, batches_to_skip)`.

    Assumes the training loop syncs gradients every `gradient_accumulation_steps` batches and at the end of each
    epoch (accelerate's default), so an epoch has `ceil(batches / gradient_accumulation_steps)` optimisation steps.
    Skip the batches of the first epoch with `accelerator.skip_first_batches(dataloader, batches_to_skip)`.
    """
    if num_update_steps_per_epoch < 1:
        raise ValueError(f"`num_update_steps_per_epoch` must be positive, got {num_update_steps_per_epoch}.")
    epoch, step_in_epoch = divmod(int(global_step), int(num_update_steps_per_epoch))
    return epoch, step_in_epoch * int(gradient_accumulation_steps)


def time_is_up(accelerator, start_time: float, max_minutes: float | None) -> bool:
    """Whether any process has trained for more than `max_minutes` since `start_time` (`time.perf_counter()`).

    Every process gets the same answer, so all of them stop at the same step (a time-boxed run, e.g. a job with a
    wall-clock limit, then checkpoints and saves instead of being killed). None means no limit. With one process
    the answer needs no device round trip (no synchronisation with the GPU); with several it is a reduction.
    """
    if max_minutes is None:
        return False
    late = time.perf_counter() - start_time > 60 * max_minutes
    if accelerator.num_processes == 1:
        return late
    return bool(accelerator.reduce(torch.tensor(float(late), device=accelerator.device), reduction="sum").item())
