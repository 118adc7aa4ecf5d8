"""Train a `FlexVQModel` (the FlexVAR tokenizer) with accelerate.

    accelerate launch examples/train_vq.py --train_data_dir data/digits128 --resolution 128 \
        --base_channels 64 --channel_multipliers 1 2 2 2 --num_codes 4096 --code_dim 8 \
        --train_batch_size 64 --max_train_steps 20000 --mixed_precision bf16 --output_dir runs/vq-digits

Losses (`flexvar_hf.training.vq_losses`): L1 + L2 pixel reconstruction, codebook and commitment losses on
L2-normalised codes with the straight-through estimator (LlamaGen's `codebook_l2_norm` quantizer, which FlexVAR's
tokenizer uses), and FlexVAR's multi-scale training: each step also area-downsamples the latent map to
`--num_extra_scales` random smaller scales, quantises each and decodes it at its own resolution against the
area-downsampled image, so that the codes of every scale the transformer predicts decode to plausible images.
Codes left unused for `--restart_dead_codes_steps` steps are moved onto random encoder outputs (optional).
LlamaGen and FlexVAR add LPIPS (VGG) and a PatchGAN discriminator; their weights cannot be had offline, so this
script has neither: reconstructions are sharp in shape but smoother in texture than theirs.

Running conventions as `examples/train.py`: the data arguments of `flexvar_hf.training.data` (an imagefolder or a
hub dataset; no labels needed), checkpoints every `--checkpointing_steps` in `OUTPUT_DIR/checkpoint-STEP` written
atomically and pruned to `--checkpoints_total_limit`, `--resume_from_checkpoint latest|PATH`, logging through
`--report_to` (tensorboard by default) in `OUTPUT_DIR/logs`, validation on the dataset's `test` split (PSNR at the
full and at smaller scales, codebook usage, a PNG of reconstructions) and the final model saved with
`save_pretrained` atomically in `OUTPUT_DIR/vqvae` (load it with `FlexVQModel.from_pretrained(OUTPUT_DIR,
subfolder="vqvae")`, or pass `OUTPUT_DIR/vqvae` to `examples/train.py --vqvae_model_name_or_path`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image

from flexvar_hf import FlexVQModel
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
    crop_mode,
    load_image_dataset,
)
from flexvar_hf.training.distributed import end_training
from flexvar_hf.training.optim import clip_and_step
from flexvar_hf.training.vq_losses import (
    CodeUsageTracker,
    FlexVQTrainingModule,
    codebook_usage,
    downsample_pixels,
    restart_dead_codes,
    sample_extra_scales,
)
from flexvar_hf.utils.io import atomic_directory, check_run_folder

logger = get_logger(__name__, log_level="INFO")

MODEL_ARGS = ("base_channels", "channel_multipliers", "layers_per_block", "z_channels", "num_codes", "code_dim",
              "norm_num_groups")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, labels=False, default_resolution="256")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Start from this FlexVQModel (folder or hub id) instead of a new one.")
    model.add_argument("--subfolder", type=str, default=None, help="Subfolder of the pretrained model.")
    model.add_argument("--base_channels", type=int, default=128)
    model.add_argument("--channel_multipliers", type=int, nargs="+", default=[1, 1, 2, 2, 4],
                       help="One per level; n levels downsample by 2^(n-1) (5 levels: 16 pixels per token).")
    model.add_argument("--layers_per_block", type=int, default=2)
    model.add_argument("--z_channels", type=int, default=256)
    model.add_argument("--num_codes", type=int, default=8912)
    model.add_argument("--code_dim", type=int, default=32)
    model.add_argument("--norm_num_groups", type=int, default=32)

    loss = parser.add_argument_group("loss")
    loss.add_argument("--l1_weight", type=float, default=1.0)
    loss.add_argument("--l2_weight", type=float, default=1.0)
    loss.add_argument("--codebook_weight", type=float, default=1.0)
    loss.add_argument("--commitment_weight", type=float, default=0.25, help="beta of the commitment loss.")
    loss.add_argument("--num_extra_scales", type=int, default=1,
                      help="Random smaller latent scales decoded per step besides the full one (0: plain VQ).")
    loss.add_argument("--extra_scale_weight", type=float, default=1.0, help="Weight of each extra scale's loss.")
    loss.add_argument("--min_extra_side", type=int, default=1, help="Smallest long side (tokens) of extra scales.")
    loss.add_argument("--restart_dead_codes_steps", type=int, default=0,
                      help="Every this many steps move codes unused since the last time onto encoder outputs "
                           "(0: never).")
    loss.add_argument("--restart_dead_codes_until", type=float, default=0.75,
                      help="Restart dead codes only during this fraction of --max_train_steps.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="runs/flexvq")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=32, help="Per device.")
    train.add_argument("--num_train_epochs", type=int, default=10)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--max_train_minutes", type=float, default=None,
                       help="Stop (checkpoint and save) once training has run this long.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by GPUs x accumulation x batch size / 256.")
    train.add_argument("--lr_scheduler", type=str, default="cosine",
                       help='One of diffusers\' schedules: "linear", "cosine", "constant", "constant_with_warmup"...')
    train.add_argument("--lr_warmup_steps", type=int, default=500)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all", "none".')
    train.add_argument("--logging_dir", type=str, default="logs", help="Under --output_dir.")
    train.add_argument("--logging_steps", type=int, default=50)
    train.add_argument("--checkpointing_steps", type=int, default=1000)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    train.add_argument("--validation_split", type=str, default="test",
                       help="Split of the same dataset used for validation (skipped when it does not exist).")
    train.add_argument("--num_validation_images", type=int, default=256)
    train.add_argument("--validation_steps", type=int, default=2000, help="Also validated at the end.")
    train.add_argument("--save_dtype", type=str, default="float32", choices=["float32", "float16", "bfloat16"],
                       help="Dtype of the final saved model.")
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None and args.base_channels % args.norm_num_groups:
        parser.error("--base_channels must be a multiple of --norm_num_groups.")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "logging_steps",
                 "validation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive.")
    if args.num_extra_scales < 0:
        parser.error("--num_extra_scales must be >= 0.")
    return args


def build_model(args: argparse.Namespace) -> FlexVQModel:
    if args.pretrained_model_name_or_path is not None:
        return FlexVQModel.from_pretrained(args.pretrained_model_name_or_path, subfolder=args.subfolder,
                                           cache_dir=args.cache_dir)
    config = {name: getattr(args, name) for name in MODEL_ARGS}
    config["channel_multipliers"] = tuple(config["channel_multipliers"])
    return FlexVQModel(**config)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (computed on [0, 1])."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def validate(model: FlexVQModel, pixels: torch.Tensor, batch_size: int, image_path: Path | None = None) -> dict:
    """Reconstruction metrics of `pixels` (N, 3, H, W) in [-1, 1]: full-scale L1 / MSE / PSNR, PSNR of latents
    area-downsampled to a quarter, half and three quarters of the long side (decoded at that resolution, against
    the downsampled images), and codebook usage. Writes originals over reconstructions to `image_path`."""
    model.eval()
    factor = model.downsample_factor
    sums: dict[str, float] = {}
    all_indices = []
    first_batch = None
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(model.device, model.dtype)
        latents = model.encode(batch).latents
        indices = model.quantize(latents)
        all_indices.append(indices.cpu())
        reconstruction = model.decode_indices(indices).sample.float()
        batch = batch.float()
        values = {
            "l1": (reconstruction.clamp(-1, 1) - batch).abs().flatten(1).mean(1) / 2,
            "mse": ((reconstruction.clamp(-1, 1) - batch) / 2).pow(2).flatten(1).mean(1),
            "psnr": psnr(reconstruction, batch),
        }
        height, width = latents.shape[-2:]
        for fraction in (0.25, 0.5, 0.75):
            scale = (max(1, round(height * fraction)), max(1, round(width * fraction)))
            small = model.decode_indices(model.quantize(F.interpolate(latents, size=scale, mode="area"))).sample
            target = downsample_pixels(batch, (scale[0] * factor, scale[1] * factor))
            values[f"psnr_scale_{scale[0]}x{scale[1]}"] = psnr(small.float(), target)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value.sum().item()
        if first_batch is None:
            first_batch = (batch[:8], reconstruction[:8])
    metrics = {key: value / len(pixels) for key, value in sums.items()}
    usage, perplexity = codebook_usage(torch.cat(all_indices), model.config.num_codes)
    metrics.update(codebook_usage=usage, codebook_perplexity=perplexity)
    if image_path is not None and first_batch is not None:
        originals, reconstructions = (to_uint8(t) for t in first_batch)
        rows = [np.concatenate(list(originals), axis=1), np.concatenate(list(reconstructions), axis=1)]
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(image_path)
    model.train()
    return metrics


def load_validation_pixels(args, resolution: tuple[int, int]) -> torch.Tensor | None:
    """Up to `--num_validation_images` images of the validation split, centre-cropped to `resolution`."""
    if not args.validation_split or args.num_validation_images <= 0:
        return None
    try:
        dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                                     split=args.validation_split, image_column=args.image_column)
    except ValueError as error:
        logger.warning(f"No validation: {error}")
        return None
    dataset = dataset.select(range(0, len(dataset), max(1, len(dataset) // args.num_validation_images)))
    dataset = dataset.select(range(min(args.num_validation_images, len(dataset))))
    transform = ImageTransform(resolution, crop="center")
    return torch.stack([transform(example[args.image_column]) for example in dataset])


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = check_run_folder(args.output_dir, "vqvae")  # a folder, whose vqvae sub-folder the run may replace
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir /
                                                                                         args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(args)
    factor = model.downsample_factor
    resolution = check_data_args(args, multiple_of=factor)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()

    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir,
                                 image_column=args.image_column, max_train_samples=args.max_train_samples,
                                 seed=args.seed, image_check=args.image_check,
                                 num_proc=args.dataloader_num_workers or None)
    transform = ImageTransform(resolution, crop=crop_mode(args), random_flip=args.random_flip,
                               min_crop_fraction=args.random_crop_min_fraction)
    train_dataset = ImageDataset(dataset, transform, args.image_column, seed=args.seed)
    loader = build_dataloader(train_dataset, args.train_batch_size, seed=args.seed,
                              num_workers=args.dataloader_num_workers, drop_last=True,
                              pin_memory=torch.cuda.is_available())
    sampler = loader.sampler
    validation_pixels = load_validation_pixels(args, resolution) if accelerator.is_main_process else None

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= accelerator.num_processes * args.gradient_accumulation_steps * args.train_batch_size / 256
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    batches_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    trainer = FlexVQTrainingModule(
        model, l1_weight=args.l1_weight, l2_weight=args.l2_weight, codebook_weight=args.codebook_weight,
        commitment_weight=args.commitment_weight, extra_scale_weight=args.extra_scale_weight,
    )
    trainer, optimizer, loader, lr_scheduler = accelerator.prepare(trainer, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(trainer).vqvae

    global_step = 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        global_step = load_checkpoint(accelerator, checkpoint)["global_step"]
        accelerator.print(f"Resumed from {checkpoint} at step {global_step}")
    first_epoch, skip_batches = resume_position(global_step, updates_per_epoch, args.gradient_accumulation_steps)

    if accelerator.is_main_process and args.report_to != "none":
        config = {key: (str(value) if isinstance(value, (list, tuple)) else value) for key, value in
                  vars(args).items() if value is None or isinstance(value, (int, float, str, bool, list, tuple))}
        accelerator.init_trackers("train_vq", config=config)

    num_params = sum(p.numel() for p in unwrapped.parameters())
    logger.info(f"FlexVQModel with {num_params / 1e6:.2f}M parameters, {factor} pixels per token, "
                f"{unwrapped.config.num_codes} codes of {unwrapped.config.code_dim} dims")
    logger.info(f"{len(dataset)} images at {resolution[0]}x{resolution[1]}, {batches_per_epoch} batches per epoch "
                f"per process, {max_train_steps} steps ({num_epochs} epochs), starting at step {global_step}")

    tracker = CodeUsageTracker(unwrapped.config.num_codes, accelerator.device)
    latent_size = (resolution[0] // factor, resolution[1] // factor)
    start_time, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
    stop = global_step >= max_train_steps
    metrics = {}
    for epoch in range(first_epoch, num_epochs):
        if stop:
            break
        sampler.set_epoch(epoch)
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
        for batch in epoch_loader:
            with accelerator.accumulate(trainer):
                pixels = batch["pixel_values"].to(accelerator.device)
                # Same scales on every process and after resuming: drawn from (seed, step).
                scale_generator = torch.Generator().manual_seed((args.seed or 0) * 1_000_003 + global_step)
                extra = sample_extra_scales(latent_size, args.num_extra_scales, args.min_extra_side,
                                            scale_generator)
                with accelerator.autocast():
                    output = trainer(pixels, extra)
                accelerator.backward(output.loss)
                clip_and_step(optimizer, trainer.parameters(), args.max_grad_norm, lr_scheduler,
                              clip=accelerator.sync_gradients, clip_grad_norm_=accelerator.clip_grad_norm_)
                tracker.update(output.indices)
            window_images += len(pixels) * accelerator.num_processes

            if not accelerator.sync_gradients:
                continue
            global_step += 1

            restart_every = args.restart_dead_codes_steps
            if restart_every and global_step % restart_every == 0 and \
                    global_step <= args.restart_dead_codes_until * max_train_steps:
                counts = accelerator.reduce(tracker.counts, reduction="sum")
                latents = accelerator.gather(output.latents.detach().float().contiguous())
                generator = torch.Generator().manual_seed((args.seed or 0) + 7 * global_step)
                moved = restart_dead_codes(unwrapped.quantize, counts, latents, generator)
                tracker.reset()
                if moved:
                    logger.info(f"step {global_step}: moved {moved} unused codes onto encoder outputs")

            if global_step % args.logging_steps == 0 or global_step == 1:
                usage, perplexity = codebook_usage(output.indices, unwrapped.config.num_codes)
                elapsed = time.perf_counter() - window_start
                logs = {
                    "loss": accelerator.reduce(output.loss.detach(), reduction="mean").item(),
                    "reconstruction_loss": output.reconstruction_loss.item(),
                    "full_scale_reconstruction_loss": output.full_scale_reconstruction_loss.item(),
                    "codebook_loss": output.codebook_loss.item(),
                    "commitment_loss": output.commitment_loss.item(),
                    "batch_codebook_usage": usage,
                    "batch_codebook_perplexity": perplexity,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "images_per_second": window_images / max(elapsed, 1e-9),
                }
                accelerator.log(logs, step=global_step)
                logger.info(f"step {global_step}/{max_train_steps} epoch {epoch} " +
                            " ".join(f"{key} {value:.4g}" for key, value in logs.items()))
                window_start, window_images = time.perf_counter(), 0

            out_of_time = time_is_up(accelerator, start_time, args.max_train_minutes)
            stop = global_step >= max_train_steps or out_of_time
            if global_step % args.checkpointing_steps == 0 or stop:
                save_checkpoint(accelerator, output_dir, global_step, total_limit=args.checkpoints_total_limit,
                                state={"epoch": epoch})
            if accelerator.is_main_process and validation_pixels is not None and \
                    (global_step % args.validation_steps == 0 or stop):
                metrics = validate(unwrapped, validation_pixels, args.train_batch_size,
                                   output_dir / "validation" / f"step-{global_step:07d}.png")
                accelerator.log({f"validation/{key}": value for key, value in metrics.items()}, step=global_step)
                logger.info(f"validation at step {global_step}: " +
                            " ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
            if stop:
                if out_of_time:
                    logger.info(f"Stopping after {args.max_train_minutes} minutes at step {global_step}.")
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = unwrapped.to(getattr(torch, args.save_dtype))
        with atomic_directory(output_dir / "vqvae", overwrite=True) as staging:
            final.save_pretrained(staging)
            summary = {
                "global_step": global_step,
                "train_minutes": round((time.perf_counter() - start_time) / 60, 2),
                "validation": metrics,
            }
            (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info(f"Saved {output_dir / 'vqvae'} at step {global_step}")
    # The prepared objects go before the process group (a hang at exit otherwise: see `end_training`).
    trainer = optimizer = loader = epoch_loader = lr_scheduler = None
    end_training(accelerator)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
