#!/usr/bin/env python
"""Train FlexVAR from scratch or fine-tune a FlexVARPipeline on an image dataset, with accelerate.

    accelerate launch examples/train.py --pretrained_model_name_or_path flexvar-d16 --train_data_dir my_images \
        --resolution 256 --train_batch_size 32 --max_train_steps 10000 --output_dir flexvar-finetuned
    accelerate launch examples/train.py --vqvae_model_name_or_path flexvar-d16 --vqvae_subfolder vqvae --depth 16 \
        --dataset_name my/dataset --resolution 256 --random_crop --random_flip --output_dir flexvar-d16-scratch

`python examples/train.py ...` runs it in one process. The recipe is the original trainer's by default (item by
item in docs/training.md): the VQ model frozen, images tokenised on the fly at a random scale schedule per batch
(the original's distribution), teacher forcing with the code vectors of each scale resized to the next, class-label
dropout for classifier-free guidance, stochastic depth, cross-entropy averaged per token, AdamW (0.9, 0.95) with
weight decay 0.05 on the original's parameter groups, its learning-rate scaling and "lin0" schedule, gradient
clipping at 2. The run ends with a complete FlexVARPipeline folder in `OUTPUT_DIR/pipeline`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from flexvar_hf import FlexVARPipeline, FlexVARScaleScheduler, FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.models.block_causal import TRAINING_ATTENTION_BACKENDS
from flexvar_hf.training.checkpointing import (
    load_checkpoint,
    resolve_checkpoint,
    resume_position,
    save_checkpoint,
    time_is_up,
)
from flexvar_hf.training.data import (
    ImageDataset,
    ImageTransform,
    add_data_args,
    build_dataloader,
    check_data_args,
    check_labels,
    crop_mode,
    label_info,
    load_image_dataset,
    sample_seed,
    set_dataloader_epoch,
)
from flexvar_hf.training.distributed import end_training, gather_model, shards_weights
from flexvar_hf.training.flexvar_loss import token_accuracy, training_loss
from flexvar_hf.training.growth import grow_depth, init_config
from flexvar_hf.training.latent_cache import (
    CachedLatentDataset,
    build_latent_dataloader,
    check_cacheable,
    prepare_latent_cache,
)
from flexvar_hf.training.master_weights import float32_mean_allreduce_hook
from flexvar_hf.training.metrics import StepMetrics
from flexvar_hf.training.optim import build_optimizer, clip_and_step, flexvar_lr_factor, flexvar_warmup_steps
from flexvar_hf.utils.io import atomic_directory, check_run_folder
from flexvar_hf.utils.model_card import flexvar_model_card

logger = get_logger(__name__, log_level="INFO")

PIPELINE_SUBFOLDER = "pipeline"
# Where the gradients are whole on every process (no sharding): the clip factor can go into the optimizer's update.
PLAIN_OR_DDP = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
    "flexvar",
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.HelpFormatter)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A FlexVARPipeline folder or hub id to fine-tune (transformer, VQ model, scheduler and class names).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained pipeline on the hub.")
    model.add_argument(
        "--vqvae_model_name_or_path",
        type=str,
        default=None,
        help="Train from scratch on this FlexVQModel (a folder or hub id; see --vqvae_subfolder).",
    )
    model.add_argument(
        "--vqvae_subfolder",
        type=str,
        default=None,
        help="Subfolder of --vqvae_model_name_or_path holding the VQ model, e.g. 'vqvae' for a pipeline folder.",
    )
    model.add_argument(
        "--depth",
        type=int,
        default=None,
        help="From scratch: transformer depth d, with width 64*d and d heads as the released models (16/20/24/30).",
    )
    model.add_argument(
        "--transformer_config",
        type=str,
        default=None,
        help="From scratch: a JSON file of FlexVARTransformer2DModel config values (e.g. a saved config.json).",
    )
    model.add_argument(
        "--grow_num_layers",
        type=int,
        default=None,
        help="Fine-tuning: first deepen the pretrained transformer to this many layers. New blocks are spread evenly "
        "between the old ones with zero AdaLN gates, so training starts from the same outputs.",
    )
    model.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="From scratch: number of classes; default: the transformer config's if it sets it, else the data's.",
    )

    add_data_args(parser, labels=True)

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="flexvar-model", help="Checkpoints, logs and the model.")
    training.add_argument("--seed", type=int, default=0, help="Seed of initialisation, data order and scales.")
    training.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    training.add_argument("--num_train_epochs", type=int, default=100)
    training.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimisation steps; overrides --num_train_epochs."
    )
    training.add_argument(
        "--max_train_minutes", type=float, default=None,
        help="Stop (checkpoint and save the pipeline) once training has run this long; the schedules still span "
        "--max_train_steps.",
    )
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    training.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the transformer's blocks (regional compilation with dynamic shapes: one graph for every "
        "layer and scale schedule; LayerNorm rows up to 2048 wide in one pass, see flexvar_hf.utils.inductor) and "
        "the cross-entropy over the vocabulary; the first steps compile.",
    )
    training.add_argument(
        "--training_attention",
        type=str,
        default="sdpa",
        choices=TRAINING_ATTENTION_BACKENDS,
        help="How the block-causal attention is computed (the same function): 'sdpa' one masked call, 'flex' "
        "FlexAttention skipping masked blocks (CUDA; compiled), 'per_scale' one unmasked call per scale.",
    )
    training.add_argument(
        "--fused_adamw", action="store_true", help="PyTorch's fused AdamW kernel (CUDA), as the original's --afuse."
    )
    training.add_argument(
        "--bf16_weights",
        action="store_true",
        help="Keep the linear layers' weights in bfloat16 with float32 masters in the optimizer (MasterWeightAdamW, "
        "its update compiled on CUDA): the same forward pass, gradients and AdamW update as float32 weights under "
        "bf16 autocast, without casting the weights and their gradients every step. Needs --mixed_precision bf16 "
        "and --gradient_accumulation_steps 1; replaces --fused_adamw. On several processes the mean gradient of a "
        "bfloat16 weight is rounded to bfloat16 once.",
    )
    training.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image (and its flip, with --random_flip) once with the frozen VQ encoder, store the "
        "latents in OUTPUT_DIR/latent_cache and train from them; the scales are still quantised every step. Needs "
        "centre crops (not --random_crop).",
    )
    training.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Peak learning rate per 256 images with --scale_lr (the default), else for the whole batch. Default: "
        "the published command's for the depth, 1e-4 up to depth 20, 8e-5 deeper.",
    )
    training.add_argument(
        "--scale_lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Use learning_rate * total_batch_size / 256 (the original's rule); --no-scale_lr takes it as is.",
    )
    training.add_argument(
        "--lr_scheduler",
        type=str,
        default="flexvar",
        choices=LR_SCHEDULERS,
        help="'flexvar' is the original's: linear warmup from 0.5%% of the peak, the peak for 5%% of the rest, then "
        "linear to --lr_end_fraction of it. The others are diffusers' schedules.",
    )
    training.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=None,
        help="Warmup steps; default: 1/50 of the training steps for 'flexvar' (the original's), else 0.",
    )
    training.add_argument(
        "--lr_end_fraction",
        type=float,
        default=None,
        help="'flexvar' schedule: final learning rate over the peak (the original's --wpe); default: the published "
        "command's for the depth, 0.1 up to depth 20, 0.01 deeper.",
    )
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.95)
    training.add_argument("--adam_epsilon", type=float, default=1e-8)
    training.add_argument(
        "--weight_decay",
        type=float,
        default=0.05,
        help="On every parameter of 2 or more dimensions but the start token, position grid and attention "
        "temperatures (the original's groups, class embedding included).",
    )
    training.add_argument(
        "--exclude_embeddings_from_weight_decay",
        action="store_true",
        help="No weight decay on the class embedding (the original decays it).",
    )
    training.add_argument("--max_grad_norm", type=float, default=2.0, help="Gradient clipping; <= 0 turns it off.")
    training.add_argument(
        "--class_dropout_prob",
        type=float,
        default=0.1,
        help="Probability of replacing a label by the unconditional one (for classifier-free guidance).",
    )
    training.add_argument("--label_smoothing", type=float, default=0.0)
    training.add_argument(
        "--drop_path_rate",
        type=float,
        default=None,
        help="Stochastic depth of the last block (linearly from 0 at the first), per sample and update, as the "
        "original; default: its 0.1 * depth / 24.",
    )
    training.add_argument(
        "--init_adaln_gate",
        type=float,
        default=None,
        help="From scratch: initial factor of the AdaLN gate weights (the original's --alng); default: the published "
        "command's for the depth, 1e-3 up to depth 20, 1e-4 deeper.",
    )
    training.add_argument(
        "--keep_final_scale",
        action="store_true",
        help="Never drop the final scale when a random schedule is over the token budget (the original drops it in "
        "about a third of the draws).",
    )
    training.add_argument(
        "--scale_weight_power",
        type=float,
        default=0.0,
        help="Weight each token's loss by (tokens of its scale) ** -power, normalised to mean 1: 0 is the original's "
        "per-token mean, 1 weighs every scale alike, between moves weight to the coarse scales.",
    )
    training.add_argument(
        "--input_token_noise",
        type=float,
        default=0.0,
        help="Fraction of the teacher-forcing input tokens replaced by another image's token at the same "
        "position (targets stay true), so the model learns to correct coarse scales whose independently drawn tokens "
        "do not fit together, as its own draws at generation time. Needs a batch of 2 or more. 0: the original.",
    )
    training.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    training.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    training.add_argument(
        "--use_ema", action="store_true", help="Keep an EMA of the weights; the saved model uses it."
    )
    training.add_argument("--ema_max_decay", type=float, default=0.9999)
    training.add_argument("--ema_inv_gamma", type=float, default=1.0)
    training.add_argument("--ema_power", type=float, default=0.75)

    run = parser.add_argument_group("logging, checkpoints, validation, hub")
    run.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Accelerate trackers: "tensorboard", "wandb", "all", "none".',
    )
    run.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, inside --output_dir.")
    run.add_argument("--tracker_project_name", type=str, default="flexvar-train")
    run.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    run.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the metrics back from the GPU every N steps (every step is still logged, with its own values; "
        "the tokens/s are over the N steps). 1 waits for the GPU every step.",
    )
    run.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    run.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='"latest" (the newest checkpoint in --output_dir, or a fresh start if none) or a checkpoint folder.',
    )
    run.add_argument("--validation_steps", type=int, default=None, help="Generate validation images every N steps.")
    run.add_argument(
        "--validation_class_labels",
        type=str,
        nargs="+",
        default=None,
        help="Class ids (or class names) of the validation images.",
    )
    run.add_argument("--validation_height", type=int, default=None, help="Default: the training height.")
    run.add_argument("--validation_width", type=int, default=None, help="Default: the training width.")
    run.add_argument("--validation_num_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    run.add_argument("--validation_guidance_scale", type=float, default=3.5)
    run.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline with a model card.")
    run.add_argument("--hub_model_id", type=str, default=None, help="Default: the name of --output_dir.")
    run.add_argument("--hub_token", type=str, default=None)
    run.add_argument("--hub_private_repo", action="store_true")
    run.add_argument(
        "--hub_license", type=str, default="mit",
        help="License in the model card's metadata (a hub license id; the released FlexVAR weights are MIT).",
    )
    run.add_argument("--local_rank", type=int, default=-1, help="Set by distributed launchers.")

    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    return args


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep + os.sep in path or Path(path).exists()


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Every check that needs no loading; raises ValueError with what to change. Returns (height, width)."""
    if (args.pretrained_model_name_or_path is None) == (args.vqvae_model_name_or_path is None):
        raise ValueError(
            "Pass exactly one of --pretrained_model_name_or_path (fine-tune a FlexVARPipeline) and "
            "--vqvae_model_name_or_path (train a new transformer from scratch on that VQ model)."
        )
    for flag, path in (
        ("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
        ("--vqvae_model_name_or_path", args.vqvae_model_name_or_path),
    ):
        if path is not None and _looks_local(path) and not Path(path).expanduser().is_dir():
            raise ValueError(f"{flag} {path!r} is not an existing folder.")
    if args.pretrained_model_name_or_path is not None:
        given = [flag for flag, value in (("--depth", args.depth), ("--transformer_config", args.transformer_config),
                                          ("--vqvae_subfolder", args.vqvae_subfolder)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when training from scratch; fine-tuning keeps the sizes "
                             "of --pretrained_model_name_or_path (--grow_num_layers deepens it).")
    elif args.grow_num_layers is not None:
        raise ValueError("--grow_num_layers deepens a pretrained transformer: pass --pretrained_model_name_or_path.")
    else:
        if (args.depth is None) == (args.transformer_config is None):
            raise ValueError("Training from scratch needs exactly one of --depth and --transformer_config.")
        if args.depth is not None and args.depth < 1:
            raise ValueError(f"--depth must be positive, got {args.depth}.")
        if args.transformer_config is not None:
            read_transformer_config(args.transformer_config)
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num_classes must be positive, got {args.num_classes}.")

    resolution = check_data_args(args)
    if max(resolution) < 32:
        raise ValueError(f"--resolution must be at least 32 pixels on its long side (two scales), got {resolution}.")

    positive = {
        "--train_batch_size": args.train_batch_size,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps,
        "--num_train_epochs": args.num_train_epochs,
        "--checkpointing_steps": args.checkpointing_steps,
        "--logging_steps": args.logging_steps,
    }
    for flag, value in (("--max_train_steps", args.max_train_steps), ("--validation_steps", args.validation_steps)):
        if value is not None:
            positive[flag] = value
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be positive, got {value}.")
    if args.max_train_minutes is not None and args.max_train_minutes <= 0:
        raise ValueError(f"--max_train_minutes must be positive, got {args.max_train_minutes}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}.")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    check_recipe_args(args)
    if not 0 <= args.class_dropout_prob < 1:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}.")
    if not args.scale_weight_power >= 0:
        raise ValueError(f"--scale_weight_power must be >= 0, got {args.scale_weight_power}.")
    if not 0 <= args.input_token_noise < 1:
        raise ValueError(f"--input_token_noise must be in [0, 1), got {args.input_token_noise}.")
    if args.input_token_noise and args.train_batch_size < 2:
        raise ValueError("--input_token_noise mixes tokens across the images of a batch: use --train_batch_size >= 2.")
    if args.validation_steps is not None and not args.validation_class_labels:
        raise ValueError("--validation_steps needs --validation_class_labels (class ids or names).")
    for flag, value in (
        ("--validation_height", args.validation_height),
        ("--validation_width", args.validation_width),
    ):
        if value is not None and (value < 16 or value % 16):
            raise ValueError(f"{flag} must be a positive multiple of 16, got {value}.")
    check_run_folder(args.output_dir, PIPELINE_SUBFOLDER)  # a folder, whose pipeline sub-folder the run may replace
    resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)  # ValueError if an explicit one is missing
    return resolution


# Defaults of the original's published training commands (scripts/train.sh) that differ with the depth: its d16/d20
# commands pass --tblr=1e-4 --wpe=0.1 --alng=1e-3, its d24 command --tblr=8e-5 --wpe=0.01 --alng=1e-4.
PUBLISHED_RECIPES = {
    "up_to_20": {"learning_rate": 1e-4, "lr_end_fraction": 0.1, "init_adaln_gate": 1e-3},
    "deeper": {"learning_rate": 8e-5, "lr_end_fraction": 0.01, "init_adaln_gate": 1e-4},
}


def check_recipe_args(args: argparse.Namespace) -> None:
    """ValueError for recipe and speed flags out of range or in conflict."""
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if args.lr_end_fraction is not None and not 0 <= args.lr_end_fraction <= 1:
        raise ValueError(f"--lr_end_fraction must be in [0, 1], got {args.lr_end_fraction}.")
    if args.drop_path_rate is not None and not 0 <= args.drop_path_rate < 1:
        raise ValueError(f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}.")
    if args.init_adaln_gate is not None and not args.init_adaln_gate > 0:
        raise ValueError(f"--init_adaln_gate must be positive, got {args.init_adaln_gate}.")
    if args.bf16_weights and (args.gradient_accumulation_steps != 1 or args.fused_adamw):
        raise ValueError(
            "--bf16_weights needs --gradient_accumulation_steps 1 (it would sum gradients in bfloat16) and replaces "
            "--fused_adamw (drop it)."
        )
    if args.cache_latents and crop_mode(args) != "center":
        raise ValueError("--cache_latents stores one latent per image and flip, so it needs centre crops: drop "
                         "--random_crop.")


def fill_recipe_defaults(args: argparse.Namespace, num_layers: int) -> None:
    """Set the depth-dependent defaults left as None: the published command's values for `num_layers`
    (`PUBLISHED_RECIPES`), the original's drop path rate 0.1 * depth / 24 and its warmup of 1/50 of the steps."""
    recipe = PUBLISHED_RECIPES["up_to_20" if num_layers <= 20 else "deeper"]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path_rate is None:
        args.drop_path_rate = 0.1 * num_layers / 24


def read_transformer_config(path: str) -> dict:
    """The JSON object of --transformer_config, without diffusers' private keys."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--transformer_config {path!r} is not an existing file.")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--transformer_config {path!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"--transformer_config {path!r} must hold a JSON object of config values.")
    return {key: value for key, value in config.items() if not key.startswith("_")}


def load_models(args: argparse.Namespace, data_num_classes: int):
    """(transformer, vqvae, scheduler, id2label of the pretrained pipeline or None)."""
    if args.pretrained_model_name_or_path is not None:
        pipe = FlexVARPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        transformer, vqvae, scheduler = pipe.transformer, pipe.vqvae, pipe.scheduler
        if args.num_classes is not None and args.num_classes != transformer.config.num_classes:
            raise ValueError(
                f"--num_classes {args.num_classes} differs from the pretrained transformer's "
                f"{transformer.config.num_classes} classes; fine-tuning cannot change the number of classes."
            )
        if args.grow_num_layers is not None:
            transformer = grow_depth(transformer, args.grow_num_layers)
        return transformer, vqvae, scheduler, pipe.id2label or None

    vqvae = FlexVQModel.from_pretrained(
        args.vqvae_model_name_or_path, subfolder=args.vqvae_subfolder, cache_dir=args.cache_dir
    )
    if args.transformer_config is not None:
        config = read_transformer_config(args.transformer_config)
    else:
        config = {"num_layers": args.depth, "hidden_size": 64 * args.depth, "num_attention_heads": args.depth}
    num_classes = args.num_classes or config.get("num_classes") or data_num_classes
    config.update(num_classes=num_classes)
    for key, value in (("vocab_size", vqvae.config.num_codes), ("code_dim", vqvae.config.code_dim)):
        if config.setdefault(key, value) != value:
            raise ValueError(f"--transformer_config has {key}={config[key]} but the VQ model has {value}.")
    try:
        transformer = FlexVARTransformer2DModel.from_config(config)
    except TypeError as error:
        raise ValueError(f"Bad transformer config {config}: {error}") from error
    scheduler = FlexVARScaleScheduler(vae_scale_factor=vqvae.downsample_factor)
    return transformer, vqvae, scheduler, None


def load_fp32_vqvae(args: argparse.Namespace) -> FlexVQModel:
    """The VQ model as stored (for the saved pipeline when training ran it in reduced precision)."""
    if args.pretrained_model_name_or_path is not None:
        return FlexVQModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vqvae", revision=args.revision, cache_dir=args.cache_dir
        )
    return FlexVQModel.from_pretrained(
        args.vqvae_model_name_or_path, subfolder=args.vqvae_subfolder, cache_dir=args.cache_dir
    )


def validation_label_ids(values: list[str] | None, num_classes: int, id2label: dict[int, str] | None) -> list[int]:
    """--validation_class_labels (ids or class names) -> class ids; ValueError for unknown names or ids."""
    names = {}
    for class_id, value in (id2label or {}).items():
        names[value] = class_id
        for name in value.split(","):
            names.setdefault(name.strip(), class_id)
    ids = []
    for value in values or []:
        if value.lstrip("-").isdigit():
            class_id = int(value)
        elif value in names:
            class_id = names[value]
        else:
            raise ValueError(f"--validation_class_labels: {value!r} is neither a class id nor a known class name.")
        if not 0 <= class_id < num_classes:
            raise ValueError(
                f"--validation_class_labels: {class_id} is outside the model's classes [0, {num_classes})."
            )
        ids.append(class_id)
    return ids


def tracker_config(args: argparse.Namespace) -> dict:
    """Arguments as scalar hyperparameters (TensorBoard accepts int, float, str and bool only)."""
    config = {}
    for key, value in vars(args).items():
        if key == "hub_token":
            continue
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


def log_validation(args, accelerator, model, vqvae, scheduler, id2label, ema_model, step):
    """Generate one image per --validation_class_labels with `model` (the trained transformer with its full
    weights, from `gather_model`), save PNGs and log them to the trackers (main process)."""
    if ema_model is not None:
        ema_model.store(model.parameters())
        ema_model.copy_to(model.parameters())
    model.eval()
    try:
        pipe = FlexVARPipeline(transformer=model, vqvae=vqvae, scheduler=scheduler, id2label=id2label)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        height, width = args.resolution_hw
        images = pipe(
            args.validation_label_ids,
            height=args.validation_height or height,
            width=args.validation_width or width,
            num_inference_steps=args.validation_num_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            generator=generator,
        ).images
    finally:
        model.train()
        if ema_model is not None:
            ema_model.restore(model.parameters())

    folder = Path(args.output_dir) / "validation" / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for index, (label, image) in enumerate(zip(args.validation_class_labels, images)):
        image.save(folder / f"{index:02d}-{label}.png")
    arrays = np.stack([np.asarray(image) for image in images])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(image, caption=str(label))
                                for label, image in zip(args.validation_class_labels, images)]},
                step=step,
            )
    return images


def write_model_card(folder: Path, args: argparse.Namespace, repo_id: str | None, pipe: FlexVARPipeline) -> None:
    """`folder/README.md`: the shared FlexVAR card (`flexvar_hf.utils.model_card`) with this run's data, length and
    last training loss."""
    base_model = args.pretrained_model_name_or_path
    data = args.dataset_name or Path(args.train_data_dir).name
    how = f"Fine-tuned from `{base_model}`" if base_model else "Trained from scratch"
    ema = ", EMA weights" if args.use_ema else ""
    height, width = args.resolution_hw
    description = (
        f"{how} on `{data}` at {height}x{width} with flexvar-hf's `examples/train.py` for {args.final_step} steps "
        f"(batch {args.total_batch_size}, learning rate {args.effective_learning_rate:g}{ema})."
    )
    loss = "not logged (no step ran)" if args.final_loss is None else f"{args.final_loss:.4f}"
    results = (
        f"Training loss at the last step: {loss} (the training objective, token cross-entropy over all scales, on "
        "that step's teacher-forced batch with label dropout). No sample-quality evaluation ran with the training."
    )
    card = flexvar_model_card(
        pipe,
        repo_id or str(Path(args.output_dir, PIPELINE_SUBFOLDER)),
        title=repo_id or Path(args.output_dir).name,
        description=description,
        results=results,
        license=args.hub_license,
        base_model=base_model if base_model and not _looks_local(base_model) else None,
        datasets=[args.dataset_name] if args.dataset_name else None,
        tags=["diffusers-training"],
    )
    card.save(folder / "README.md")


def mixed_precision_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen VQ model (and of the autocast) under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_lr_scheduler(args: argparse.Namespace, optimizer, steps_for_scheduler: int, num_processes: int):
    """--lr_scheduler over `steps_for_scheduler` scheduler steps (the prepared scheduler steps once per process per
    optimisation step). Fills in the default --lr_warmup_steps: 1/50 of the optimisation steps for 'flexvar'."""
    total_steps = steps_for_scheduler // num_processes
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = flexvar_warmup_steps(total_steps) if args.lr_scheduler == "flexvar" else 0
    if args.lr_scheduler != "flexvar":
        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * num_processes,
            num_training_steps=steps_for_scheduler,
        )
    warmup, end = args.lr_warmup_steps, args.lr_end_fraction
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: flexvar_lr_factor(step // num_processes, total_steps, warmup, end)
    )


def latent_training_data(args: argparse.Namespace, accelerator: Accelerator, dataset, vqvae, resolution):
    """--cache_latents: the VQ latents of every image (and flip) from OUTPUT_DIR/latent_cache, encoded first where
    missing, as (`CachedLatentDataset`, its loader) in place of the image dataset and loader."""
    vqvae.to(accelerator.device, dtype=mixed_precision_dtype(accelerator))
    images = ImageDataset(dataset, ImageTransform(resolution), args.image_column, args.label_column, seed=args.seed)
    check_cacheable(images.transform)
    latents = prepare_latent_cache(
        accelerator, Path(args.output_dir) / "latent_cache", images, vqvae, args.random_flip,
        args.train_batch_size, args.dataloader_num_workers,
    )
    labels = torch.tensor(dataset[args.label_column], dtype=torch.long)
    cached = CachedLatentDataset(latents, labels, seed=args.seed)
    loader = build_latent_dataloader(
        cached, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    return cached, loader


def use_expandable_segments() -> None:
    """Let PyTorch's CUDA caching allocator grow and shrink its segments (`expandable_segments:True`) unless the user
    configured the allocator (`PYTORCH_CUDA_ALLOC_CONF` or `PYTORCH_ALLOC_CONF`). Random schedules give a new
    sequence length nearly every step, and with fixed segments the allocator's reserve grows far above what the
    tensors hold (benchmarks/RESULTS.md, "sixth session"). Read when CUDA starts, so this runs before the
    `Accelerator` is made."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(args: argparse.Namespace) -> dict:
    """Run the training described by `args` (from `parse_args`). Returns a summary: `global_step`, `losses` (per
    optimisation step, averaged over processes and accumulation), `pipeline_dir`, `resumed_from` (the checkpoint or
    None), `transformer` (the trained model, raw weights; None on the other processes when FSDP sharded it) and
    `ema_model` (the `EMAModel` or None)."""
    height, width = check_args(args)
    args.resolution_hw = (height, width)
    output_dir = Path(args.output_dir)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    use_expandable_segments()

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        # Batches (from pinned memory on CUDA machines) go to the GPU without the host waiting for the GPU to finish
        # the previous step, which a blocking copy would make it do at every step.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    plain_or_ddp = accelerator.distributed_type in PLAIN_OR_DDP
    if args.bf16_weights and (accelerator.mixed_precision != "bf16" or not plain_or_ddp):
        raise ValueError(
            "--bf16_weights needs bf16 mixed precision (its weights are what bf16 autocast computes with) on one "
            f"process or under DDP; got {accelerator.mixed_precision} mixed precision, {accelerator.distributed_type}."
        )
    if args.use_ema and shards_weights(accelerator):
        # EMAModel keeps a full copy of the weights next to the sharded ones, and accelerate saves it from the main
        # process alone; the original trainer keeps no EMA either.
        raise ValueError("--use_ema is not supported when FSDP or DeepSpeed ZeRO-3 shards the weights; drop it.")

    # Data and models, checked against each other before any training work.
    with accelerator.main_process_first():
        dataset = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.cache_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            max_train_samples=args.max_train_samples,
            seed=args.seed,
            image_check=args.image_check,
            num_proc=args.dataloader_num_workers or None,
        )
    labels = label_info(dataset, args.label_column)
    transformer, vqvae, scheduler, pretrained_id2label = load_models(args, labels.num_classes)
    num_classes = transformer.config.num_classes
    check_labels(labels, num_classes)
    if transformer.config.vocab_size != vqvae.config.num_codes or transformer.config.code_dim != vqvae.config.code_dim:
        raise ValueError("The transformer's vocab_size/code_dim do not match the VQ model's num_codes/code_dim.")
    factor = vqvae.downsample_factor
    if height % factor or width % factor or scheduler.config.vae_scale_factor != factor:
        raise ValueError(f"--resolution must be a multiple of the VQ model's {factor} pixels per token.")
    # The saved pipeline's default image size becomes the training size (the longer side for non-square training).
    transformer.register_to_config(sample_size=max(height, width) // factor)
    id2label = {**(pretrained_id2label or {}), **(labels.id2label or {})} or None
    args.validation_label_ids = validation_label_ids(args.validation_class_labels, num_classes, id2label)

    repo_id = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token,
                private=args.hub_private_repo,
            ).repo_id

    vqvae.requires_grad_(False).eval()
    transformer.train()
    fill_recipe_defaults(args, transformer.config.num_layers)
    if args.pretrained_model_name_or_path is None:
        transformer.initialize_weights(adaln_gate_gain=args.init_adaln_gate)
    if args.training_attention == "flex" and accelerator.device.type != "cuda":
        raise ValueError("--training_attention flex needs a CUDA GPU (FlexAttention has no backward pass on the CPU); "
                         "use sdpa or per_scale.")
    transformer.set_training_attention(args.training_attention)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.torch_compile:
        from flexvar_hf.utils.inductor import wide_row_inductor  # imports Inductor

        transformer.compile_repeated_blocks(dynamic=True, backend=wide_row_inductor)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * total_batch_size / 256 if args.scale_lr else args.learning_rate
    args.total_batch_size, args.effective_learning_rate = total_batch_size, learning_rate
    optimizer = build_optimizer(
        transformer,
        learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=args.fused_adamw or None,
        decay_embeddings=not args.exclude_embeddings_from_weight_decay,
        bf16_weights=args.bf16_weights,
    )
    # With --bf16_weights the model holds bfloat16 copies; the EMA, validation and the saved model take the float32
    # masters.
    float32_weights = optimizer.float32_weights if args.bf16_weights else lambda parameters: list(parameters)

    transform = ImageTransform(
        (height, width), crop=crop_mode(args), random_flip=args.random_flip,
        min_crop_fraction=args.random_crop_min_fraction,
    )
    train_dataset = ImageDataset(dataset, transform, args.image_column, args.label_column, seed=args.seed)
    train_dataloader = build_dataloader(
        train_dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    if args.cache_latents:
        train_dataset, train_dataloader = latent_training_data(args, accelerator, dataset, vqvae, (height, width))

    # Scheduler lengths as in diffusers' scripts: the prepared scheduler steps once per process per step.
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    if args.max_train_steps is None:
        steps_for_scheduler = (
            args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
        ) * accelerator.num_processes
    else:
        steps_for_scheduler = args.max_train_steps * accelerator.num_processes
    lr_scheduler = build_lr_scheduler(args, optimizer, steps_for_scheduler, accelerator.num_processes)

    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            float32_weights(transformer.parameters()),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=FlexVARTransformer2DModel,
            model_config=transformer.config,
        )
        accelerator.register_for_checkpointing(ema_model)

    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
    if args.bf16_weights and accelerator.distributed_type != DistributedType.NO:
        transformer.register_comm_hook(None, float32_mean_allreduce_hook)  # DDP: average bfloat16 in float32
    # A fused AdamW applies the clip factor inside its update kernel (a pass over the gradients fewer) where the
    # gradients are whole and unscaled: no fp16 GradScaler, no FSDP or DeepSpeed sharding. --bf16_weights always.
    fold_clip = args.bf16_weights or (
        args.fused_adamw and accelerator.scaler is None and plain_or_ddp
    )

    weight_dtype = mixed_precision_dtype(accelerator)
    vqvae.to(accelerator.device, dtype=weight_dtype)
    vqvae.quantize.to(torch.float32)  # nearest-code search and code vectors stay in float32

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}, classes = {num_classes}, resolution = {height}x{width}")
    logger.info(f"  Num epochs = {num_train_epochs}, optimisation steps = {max_train_steps}")
    logger.info(f"  Batch size per device = {args.train_batch_size}, total = {total_batch_size}")
    logger.info(f"  Learning rate = {learning_rate:g}, gradient accumulation = {args.gradient_accumulation_steps}")
    logger.info(f"  Parameters = {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M")

    global_step = 0
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}")
        global_step = load_checkpoint(accelerator, checkpoint)["global_step"]
        if ema_model is not None:
            ema_model.to(accelerator.device)
    elif args.resume_from_checkpoint == "latest":
        logger.info("No checkpoint in the output folder yet; starting a new run.")
    first_epoch, batches_to_skip = resume_position(
        global_step, num_update_steps_per_epoch, args.gradient_accumulation_steps
    )

    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    losses: list[float] = []
    metrics = StepMetrics(accelerator.device)
    micro_step = 0
    start_time = time.perf_counter()

    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        set_dataloader_epoch(loader, epoch)
        for batch in loader:
            # Per-step randomness from (seed, step, micro-batch): a resumed run draws the same scales and dropout.
            scale_generator = torch.Generator().manual_seed(sample_seed(args.seed, global_step, micro_step))
            dropout_generator = torch.Generator().manual_seed(
                sample_seed(args.seed + 1 + accelerator.process_index, global_step, micro_step)
            )
            with accelerator.accumulate(transformer):
                scales = scheduler.sample_training_scales(
                    height, width, generator=scale_generator, keep_final_scale=args.keep_final_scale
                )
                step = training_loss(
                    transformer, vqvae, scales, batch.get("pixel_values"), batch["labels"], num_classes,
                    args.class_dropout_prob, args.label_smoothing, generator=dropout_generator,
                    scale_weight_power=args.scale_weight_power, input_token_noise=args.input_token_noise,
                    latents=batch.get("latents"), drop_path_rate=args.drop_path_rate, compile_loss=args.torch_compile,
                )
                loss, logits, teacher = step.loss, step.logits, step.teacher
                accelerator.backward(loss)
                norm = clip_and_step(
                    optimizer, transformer.parameters(), args.max_grad_norm, lr_scheduler,
                    clip=accelerator.sync_gradients, clip_grad_norm_=accelerator.clip_grad_norm_,
                    fold_clip=fold_clip,
                )

            accuracy, last_accuracy = token_accuracy(logits.detach(), teacher.targets, teacher.last_scale_tokens)
            metrics.add_micro_batch(loss, accuracy, last_accuracy, teacher.targets)
            micro_step += 1

            if not accelerator.sync_gradients:
                continue
            if ema_model is not None:
                ema_model.step(float32_weights(accelerator.unwrap_model(transformer).parameters()))
            global_step += 1
            micro_step = 0
            progress_bar.update(1)

            metrics.end_step(global_step, norm, lr_scheduler.get_last_lr()[0], len(scales))
            out_of_time = time_is_up(accelerator, start_time, args.max_train_minutes)
            checkpoint_due = global_step % args.checkpointing_steps == 0 or out_of_time
            validation_due = bool(args.validation_steps) and global_step % args.validation_steps == 0
            # Metrics are read back (a GPU synchronisation) only every --logging_steps steps and before anything
            # that synchronises anyway.
            last_step = global_step >= max_train_steps
            if global_step % args.logging_steps == 0 or checkpoint_due or validation_due or last_step:
                for step_number, logs in metrics.flush(accelerator.reduce):
                    losses.append(logs["loss"])
                    accelerator.log(logs, step=step_number)
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['token_accuracy']:.3f}",
                                         lr=f"{logs['lr']:.2e}")
            if checkpoint_due:
                save_checkpoint(
                    accelerator, output_dir, global_step, total_limit=args.checkpoints_total_limit,
                    state={"epoch": epoch},
                )
            if validation_due:
                model = gather_model(accelerator, transformer, FlexVARTransformer2DModel)  # on every process
                if accelerator.is_main_process:
                    # Generation runs without autocast: the float32 weights, for the time of the validation.
                    with optimizer.optimizer.float32_model() if args.bf16_weights else nullcontext():
                        log_validation(args, accelerator, model, vqvae, scheduler, id2label, ema_model, global_step)
            if out_of_time:
                logger.info(f"Stopping after {args.max_train_minutes} minutes at step {global_step}.")
                max_train_steps = global_step
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    if args.bf16_weights:  # the trained model (saved and returned) gets its float32 weights back
        optimizer.optimizer.restore_float32_weights()
    pipeline_dir = output_dir / PIPELINE_SUBFOLDER
    model = gather_model(accelerator, transformer, FlexVARTransformer2DModel)  # on every process
    if accelerator.is_main_process:
        final_model = model
        if ema_model is not None:  # the saved pipeline gets the EMA weights; the trained model keeps its own
            final_model = FlexVARTransformer2DModel.from_config(init_config(model))
            ema_model.copy_to(final_model.parameters())
        final_vqvae = vqvae if weight_dtype == torch.float32 else load_fp32_vqvae(args)
        pipe = FlexVARPipeline(transformer=final_model, vqvae=final_vqvae, scheduler=scheduler, id2label=id2label)
        args.final_step, args.final_loss = global_step, (losses[-1] if losses else None)
        with atomic_directory(pipeline_dir, overwrite=True) as staging:
            pipe.save_pretrained(staging)
            write_model_card(staging, args, repo_id, pipe)
        logger.info(f"Saved the pipeline to {pipeline_dir}")
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id, folder_path=pipeline_dir, commit_message="End of training", token=args.hub_token
            )
    accelerator.wait_for_everyone()
    # The prepared objects go before the process group (a hang at exit otherwise: see `end_training`).
    transformer = optimizer = lr_scheduler = train_dataloader = loader = None
    end_training(accelerator)
    return {
        "global_step": global_step,
        "losses": losses,
        "pipeline_dir": str(pipeline_dir),
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "transformer": model,
        "ema_model": ema_model,
    }


if __name__ == "__main__":
    main(parse_args())
