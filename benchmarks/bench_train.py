"""
Training throughput, ours against the original FlexVAR trainer's step.

One step is what a training loop does per batch once the batch is on the GPU: VQ encoding and multi-scale
quantisation at the step's scales (frozen VQ model, no gradients), the teacher-forcing forward pass, cross-entropy,
the backward pass, gradient clipping at 2.0 and an AdamW (0.9, 0.95) step. Data loading and logging are left out.
Random weights of the released sizes (vocabulary 8912, code dim 32, 1000 classes, the default VQ-16), random pixels
in [-1, 1] and random labels; nothing is downloaded.

- ours: `flexvar_hf.training.flexvar_loss.training_loss` + `loss.backward()` +
  `flexvar_hf.training.optim.clip_and_step` over `build_optimizer`, the functions `examples/train.py` runs per step,
  set up as it sets them up under `--mixed_precision bf16 --allow_tf32`: the transformer's forward under bfloat16
  autocast (as accelerate wraps it), the VQ encoder's weights in bfloat16, the codebook search in float32.
- original (`--original PATH`, a checkout of github.com/jiaosiyu1999/FlexVAR with its `trainer.py`, never committed
  here): its `VARTrainer.train_step` on its own `FlexVAR`, `VQ-16`, `AmpOptimizer` and `filter_params` parameter
  groups, as its train.py builds them (fused AdamW, TF32 on). Its published training commands (scripts/train.sh) pass
  `--fp16=1`: float16 autocast with a GradScaler; `--original_amp bf16` times its bfloat16 setting too.

Both run the published 10-step schedule (1,2,3,4,5,6,8,10,13,16: 680 tokens at 256x256) on every step; `ours_random`
draws a new schedule per step from `FlexVARScaleScheduler.sample_training_scales` (as training does; fewer tokens on
average) and `original_random` from the original's `gen_curr_patch_nums` (256x256 only). `tokenise_ms` times the
no-grad VQ part of a fixed-schedule step alone. Tokens per step = batch * tokens of the
step's scales; tokens/s and images/s are totals over the timed steps after warm-up; peak memory is
`max_memory_reserved` over the timed steps.

    python benchmarks/bench_train.py --original .orig --gradient_checkpointing --json train.json
    python benchmarks/bench_train.py --device cpu --tiny --original .orig   # a quick check of the code paths
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import types
from pathlib import Path

import torch

from bench_generate import CODE_DIM, DEPTHS, NUM_CLASSES, VOCAB_SIZE
from flexvar_hf import FlexVARScaleScheduler, FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.training.flexvar_loss import build_teacher_inputs, training_loss
from flexvar_hf.training.optim import build_optimizer, clip_and_step

LEARNING_RATE, WEIGHT_DECAY, BETAS, MAX_GRAD_NORM, CLASS_DROPOUT = 1e-4, 0.05, (0.9, 0.95), 2.0, 0.1
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The original train.py's `nowd_keys` (its parameter groups come from utils.lr_control.filter_params with these).
ORIGINAL_NOWD_KEYS = {
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="d16", choices=sorted(DEPTHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--random_warmup", type=int, default=30,
        help="Warm-up steps of the random-schedule runs (each a new schedule; new shapes cost more at first).",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Time ours with it too.")
    parser.add_argument("--torch_compile", action="store_true", help="Time ours with compiled blocks too.")
    parser.add_argument("--no_random", action="store_true", help="Skip the random-schedule runs.")
    parser.add_argument("--original", type=Path, default=None, help="Checkout of the original FlexVAR code.")
    parser.add_argument(
        "--original_amp", nargs="+", default=["fp16"], choices=sorted(AMP_DTYPES),
        help="The original's AMP settings to time (fp16: its published --fp16=1, with a GradScaler).",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="Debug: depth 2, width 128, batch 2, 64x64.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.resolution = min(args.batch, 2), min(args.resolution, 64)
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
        args.random_warmup = min(args.random_warmup, 2)
    return args


def model_size(args: argparse.Namespace) -> tuple[int, int, int]:
    """(depth, width, heads)."""
    if args.tiny:
        return 2, 128, 2
    depth = DEPTHS[args.size]
    return depth, 64 * depth, depth


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, schedules: list[list[int]], warmup: int, batch: int, device: torch.device) -> dict:
    """Run `step(sides)` for `warmup` schedules, then time one step per remaining schedule."""
    for sides in schedules[:warmup]:
        step(sides)
    synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timed = schedules[warmup:]
    start = time.perf_counter()
    for sides in timed:
        last = step(sides)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = batch * sum(sum(side * side for side in sides) for sides in timed)
    return {
        "ms_per_step": seconds / len(timed) * 1e3,
        "tokens_per_step": tokens / len(timed),
        "tokens_per_s": tokens / seconds,
        "images_per_s": batch * len(timed) / seconds,
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "last_grad_norm": float(last) if last is not None else None,
        "steps": len(timed),
    }


def time_call(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Mean milliseconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters * 1e3


class OursTrainer:
    """Our transformer, VQ model and optimizer, one step as examples/train.py's (bf16 mixed precision)."""

    def __init__(
        self,
        depth: int,
        width: int,
        heads: int,
        device: torch.device,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
    ):
        torch.manual_seed(0)
        self.device = device
        self.transformer = FlexVARTransformer2DModel(
            num_layers=depth,
            hidden_size=width,
            num_attention_heads=heads,
            num_classes=NUM_CLASSES,
            vocab_size=VOCAB_SIZE,
            code_dim=CODE_DIM,
        ).to(device)
        self.transformer.train()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if torch_compile:  # as examples/train.py --torch_compile
            self.transformer.compile_repeated_blocks(dynamic=True)
        # accelerate's mixed precision: the prepared model's forward runs under autocast, parameters stay float32.
        self.transformer.forward = torch.autocast(device.type, dtype=torch.bfloat16)(self.transformer.forward)
        self.vqvae = FlexVQModel(num_codes=VOCAB_SIZE, code_dim=CODE_DIM).requires_grad_(False).eval()
        self.vqvae.to(device, dtype=torch.bfloat16)
        self.vqvae.quantize.to(torch.float32)  # as examples/train.py: codebook search in float32
        self.optimizer = build_optimizer(self.transformer, LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=BETAS)
        self.dropout_generator = torch.Generator().manual_seed(1)
        self.loss = None

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, sides: list[int]) -> torch.Tensor:
        output = training_loss(
            self.transformer, self.vqvae, [(side, side) for side in sides], pixels, labels, NUM_CLASSES,
            CLASS_DROPOUT, generator=self.dropout_generator,
        )
        output.loss.backward()
        self.loss = output.loss.detach()
        return clip_and_step(self.optimizer, self.transformer.parameters(), MAX_GRAD_NORM)

    def tokenise(self, pixels: torch.Tensor, sides: list[int]):
        """The step's no-grad part alone: VQ encoding, quantisation at every scale, teacher-forcing inputs."""
        return build_teacher_inputs(self.vqvae, [(side, side) for side in sides], pixels=pixels)


def import_original(checkout: Path):
    """The original's modules from `checkout`. Its utils.misc (imported by trainer.py for MetricLogger and
    TensorboardLogger, which train_step only uses to log) needs pytz and typed-argument-parser; where those are
    missing it is replaced by a stub, as this benchmark never logs."""
    sys.path.insert(0, str(checkout.resolve()))
    try:
        import utils.misc  # noqa: F401
    except ImportError:
        stub = types.ModuleType("utils.misc")
        stub.MetricLogger = stub.TensorboardLogger = object
        sys.modules["utils.misc"] = stub
    import trainer
    import utils.lr_control as lr_control
    from models.flexvar import FlexVAR
    from models.vq_llama import VQ_models
    from utils.amp_sc import AmpOptimizer

    return types.SimpleNamespace(
        FlexVAR=FlexVAR, VQ_models=VQ_models, AmpOptimizer=AmpOptimizer, lr_control=lr_control,
        VARTrainer=trainer.VARTrainer,
    )


class OriginalTrainer:
    """The original FlexVAR, VQ-16 and trainer as its train.py builds them for `--depth d --fp16 1|2`, random
    weights; one step is `VARTrainer.train_step` (its scale draw, VQ encoding, forward, loss, backward, clipping and
    AdamW step through `AmpOptimizer`)."""

    def __init__(self, checkout: Path, depth: int, width: int, heads: int, amp: str, device: torch.device,
                 patch_nums: tuple[int, ...]):
        orig = import_original(checkout)
        torch.manual_seed(0)
        self.vqvae = orig.VQ_models["VQ-16"](codebook_size=VOCAB_SIZE, codebook_embed_dim=CODE_DIM)
        self.vqvae.eval().requires_grad_(False).to(device)
        # build_vae_var's arguments (models/__init__.py), with train.sh's --alng=1e-3 for d16/d20.
        self.model = orig.FlexVAR(
            vae_local=self.vqvae, num_classes=NUM_CLASSES, depth=depth, embed_dim=width, num_heads=heads,
            drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, shared_aln=False,
            cond_drop_rate=CLASS_DROPOUT, token_dropout_p=0.05, attn_l2_norm=True, patch_nums=patch_nums,
            flash_if_available=True, fused_if_available=True,
        ).to(device)
        self.model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
        self.model.train()
        orig.lr_control.print = lambda *args, **kwargs: None  # filter_params prints with dist's `force=` keyword
        names, params, groups = orig.lr_control.filter_params(self.model, nowd_keys=ORIGINAL_NOWD_KEYS)
        for group in groups:  # what its lr_wd_annealing sets each step, here at the peak
            group["lr"], group["weight_decay"] = LEARNING_RATE, WEIGHT_DECAY * group["wd_sc"]
        optimizer = torch.optim.AdamW(
            groups, lr=LEARNING_RATE, weight_decay=0.0, betas=BETAS, fused=device.type == "cuda"
        )
        var_opt = orig.AmpOptimizer(
            mixed_precision={"fp16": 1, "bf16": 2}[amp], optimizer=optimizer, names=names, paras=params,
            grad_clip=MAX_GRAD_NORM, n_gradient_accumulation=1,
        )
        self.trainer = orig.VARTrainer(
            device=device, patch_nums=patch_nums, resos=tuple(16 * pn for pn in patch_nums), vae_local=self.vqvae,
            var_wo_ddp=self.model, var=self.model, var_opt=var_opt, label_smooth=0.0,
        )
        self.metric_logger = types.SimpleNamespace(log_iters=10**9, update=lambda **kwargs: None)
        self.random_schedule = self.trainer.gen_curr_patch_nums
        self.fixed_sides = list(patch_nums)
        self.last_sides = None

    def draw_sides(self) -> list[int]:
        """The original's own random schedule (Python's `random`), remembered for the token count."""
        self.last_sides = self.random_schedule()
        return self.last_sides

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, sides: list[int] | None) -> torch.Tensor:
        """`sides` None: the trainer draws its own schedule (`draw_sides`); else that fixed schedule."""
        self.trainer.gen_curr_patch_nums = self.draw_sides if sides is None else (lambda: list(sides))
        grad_norm, _ = self.trainer.train_step(
            it=1, g_it=1, stepping=True, metric_lg=self.metric_logger, tb_lg=None, inp_B3HW=pixels,
            label_B=labels, prog_si=-1, prog_wp_it=1.0,
        )
        return grad_norm

    def tokenise(self, pixels: torch.Tensor, sides: list[int]):
        """The step's no-grad part alone: its `encode_var_wo_firstL` (run outside autocast, as train_step does)."""
        with torch.no_grad():
            return self.trainer.encode_var_wo_firstL(pixels, list(sides))


def release(device: torch.device) -> None:
    """Free what the last trainer left (call after dropping every reference to it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: pass --device cpu (with --tiny) to check the code paths.")
    torch.backends.cuda.matmul.allow_tf32 = True  # ours: --allow_tf32; the original: its default --tf32=True
    torch.backends.cudnn.allow_tf32 = True
    depth, width, heads = model_size(args)
    scheduler = FlexVARScaleScheduler()
    scheduler.set_timesteps(None, height=args.resolution, width=args.resolution)
    fixed = [height for height, _ in scheduler.scales]
    steps = args.warmup + args.iters
    generator = torch.Generator().manual_seed(0)
    random_schedules = [
        [height for height, _ in scheduler.sample_training_scales(args.resolution, args.resolution, generator)]
        for _ in range(args.random_warmup + args.iters)
    ]
    pixels = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=generator).mul(2).sub(1)
    pixels = pixels.to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(device)

    results = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {key: str(value) for key, value in vars(args).items()},
        "model": {"depth": depth, "width": width, "heads": heads},
        "fixed_schedule": fixed,
        "runs": [],
    }

    def record(mode: str, schedule: str, precision: str, stats: dict) -> None:
        run = {"mode": mode, "schedule": schedule, "precision": precision, "batch": args.batch, **stats}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)

    ours_modes = [("ours", {})]
    ours_modes += [("ours_ckpt", {"gradient_checkpointing": True})] if args.gradient_checkpointing else []
    ours_modes += [("ours_compiled", {"torch_compile": True})] if args.torch_compile else []
    for mode, options in ours_modes:
        ours = OursTrainer(depth, width, heads, device, **options)
        results["model"]["params_m"] = sum(p.numel() for p in ours.transformer.parameters()) / 1e6

        def ours_step(sides, ours=ours):
            return ours.step(pixels, labels, sides)

        stats = timed_steps(ours_step, [fixed] * steps, args.warmup, args.batch, device)
        stats["tokenise_ms"] = time_call(lambda ours=ours: ours.tokenise(pixels, fixed), 2, args.iters, device)
        stats["params_m"] = results["model"]["params_m"]
        record(mode, "fixed", "bf16 autocast", stats)
        if not args.no_random:
            stats = timed_steps(ours_step, random_schedules, args.random_warmup, args.batch, device)
            record(mode, "random", "bf16 autocast", stats)
        results.setdefault("last_loss", {})[mode] = float(ours.loss)
        del ours, ours_step
        release(device)

    if args.original is not None:
        for amp in args.original_amp:
            original = OriginalTrainer(args.original, depth, width, heads, amp, device, tuple(fixed))
            precision = f"{amp} autocast" + (" + GradScaler" if amp == "fp16" else "")

            def original_step(sides, original=original):
                return original.step(pixels, labels, sides)

            stats = timed_steps(original_step, [fixed] * steps, args.warmup, args.batch, device)
            stats["tokenise_ms"] = time_call(
                lambda original=original: original.tokenise(pixels, fixed), 2, args.iters, device
            )
            stats["params_m"] = sum(p.numel() for p in original.model.parameters()) / 1e6
            record(f"original_{amp}", "fixed", precision, stats)
            if not args.no_random and fixed[-1] == 16:  # its gen_curr_patch_nums always ends at 16 (256x256)
                random.seed(0)
                drawn = []

                def original_random_step(_sides, original=original, drawn=drawn):
                    grad_norm = original.step(pixels, labels, None)
                    drawn.append(original.last_sides)
                    return grad_norm

                stats = timed_steps(
                    original_random_step, random_schedules, args.random_warmup, args.batch, device
                )  # the schedules passed are ignored: the trainer draws its own
                timed = drawn[args.random_warmup:]
                tokens = args.batch * sum(sum(side * side for side in sides) for sides in timed)
                seconds = stats["ms_per_step"] * len(timed) / 1e3
                stats.update(tokens_per_step=tokens / len(timed), tokens_per_s=tokens / seconds)
                record(f"original_{amp}", "random", precision, stats)
                del original_random_step
            del original, original_step
            release(device)

    print_table(results["runs"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(runs: list[dict]) -> None:
    base = next((run for run in runs if run["mode"].startswith("original") and run["schedule"] == "fixed"), None)
    print(
        f"\n{'mode':15} {'schedule':8} {'precision':26} {'ms/step':>8} {'tok/step':>9} {'tokens/s':>10} "
        f"{'img/s':>7} {'peak GiB':>9} {'vs ' + (base['mode'] if base else 'original'):>16}"
    )
    for run in runs:
        ratio = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        peak = f"{run['peak_gib']:.2f}" if run["peak_gib"] is not None else "-"
        print(
            f"{run['mode']:15} {run['schedule']:8} {run['precision']:26} {run['ms_per_step']:8.1f} "
            f"{run['tokens_per_step']:9.0f} {run['tokens_per_s']:10.0f} {run['images_per_s']:7.1f} {peak:>9} "
            f"{ratio:>16}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
